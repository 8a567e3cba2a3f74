"""HART (mit-han-lab/hart, ``hart-0.7b-1024px``): the second VAR family.

Checkpoint-compatible PyTorch modules of the released model: the llama-style transformer with 2D RoPE and
Qwen2 context tokens (``transformer.py``), the residual diffusion MLP and its iDDPM sampler (``diffusion.py``),
the hybrid tokenizer's codebook and decoder (``tokenizer.py``), the Qwen2 text encoder (``text.py``) and the
graph pieces the shared orchestrator runs (``pieces.py``). What differs from Infinity is only here; the
orchestrator, policies, export and backends are shared (``toprovar.model.families``).
"""
