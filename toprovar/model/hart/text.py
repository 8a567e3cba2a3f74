"""HART's text path: a Qwen2 decoder (``transformers``, from a local directory) whose last hidden states are the
context tokens, as the official ``encode_prompts`` computes them: the prompt tokens padded (right) to
``context_token`` (300) positions, optionally preceded by a system prompt whose positions are cut off again,
features of every position including the padding (the transformer attends to all of them).

``encode(prompts) -> (features (B, L, C_text) float32, lengths (B,) int32)`` with L = ``max_length`` always.
Encodings are cached per distinct prompt (least recently used dropped beyond ``CACHE_SIZE``): a prompt's
features do not depend on its batch-mates (right padding, causal attention), so a repeated prompt is not
encoded again.
A prompt longer than the limit is an error (the official code truncates silently).

The official ``sample.py`` prepends a fixed system prompt (``use_llm_system_prompt``); put its text in
``<text encoder dir>/toprovar_system_prompt.txt`` to reproduce that (not shipped here).
"""
from __future__ import annotations

from collections import OrderedDict
from pathlib import Path

import torch

from ..text import ByteTokenizer, tokenize_batch

SYSTEM_PROMPT_FILE = "toprovar_system_prompt.txt"
CACHE_SIZE = 64


class QwenTextEncoder(torch.nn.Module):
    """A Qwen2 model with its tokenizer; prompts padded to ``max_length`` with ``pad_id``."""

    def __init__(self, model: torch.nn.Module, tokenize, pad_id: int, max_length: int, label: str,
                 system_ids: list[int] | None = None):
        super().__init__()
        self.model, self.tokenize, self.pad_id = model, tokenize, pad_id
        self.max_length, self.label, self.system_ids = max_length, label, list(system_ids or [])
        self.cache: OrderedDict[str, tuple[torch.Tensor, torch.Tensor]] = OrderedDict()  # prompt -> (L, C), ()

    @property
    def width(self) -> int:
        return self.model.config.hidden_size

    @torch.no_grad()
    def encode(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """prompts -> features (B, L, C_text) float32, lengths (B,) int32 (cached per prompt)."""
        new = [p for p in dict.fromkeys(prompts) if p not in self.cache]
        if new:
            feats, lengths = self._encode(new)
            for p, f, n in zip(new, feats, lengths):
                self.cache[p] = (f, n)
        for p in prompts:
            self.cache.move_to_end(p)
        out = [self.cache[p] for p in prompts]
        while len(self.cache) > CACHE_SIZE:
            self.cache.popitem(last=False)
        return torch.stack([f for f, _ in out]), torch.stack([n for _, n in out])

    def _encode(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        ids, mask = tokenize_batch(self.tokenize, prompts, self.max_length, self.label)
        B, L = ids.shape
        full_ids = torch.full((B, self.max_length), self.pad_id, dtype=torch.long)
        full_mask = torch.zeros(B, self.max_length, dtype=torch.long)
        full_ids[:, :L] = torch.where(mask.bool(), ids, torch.full_like(ids, self.pad_id))
        full_mask[:, :L] = mask
        n_sys = len(self.system_ids)
        if n_sys:
            sys_ids = torch.tensor(self.system_ids, dtype=torch.long).expand(B, -1)
            full_ids = torch.cat([sys_ids, full_ids], dim=1)
            full_mask = torch.cat([torch.ones(B, n_sys, dtype=torch.long), full_mask], dim=1)
        dev = next(self.model.parameters()).device
        out = self.model(input_ids=full_ids.to(dev), attention_mask=full_mask.to(dev), output_hidden_states=True)
        feats = out.hidden_states[-1][:, n_sys:].float()
        return feats, full_mask[:, n_sys:].sum(1).to(torch.int32).to(dev)


def tiny_qwen2_encoder(width: int, max_length: int, seed: int = 0) -> QwenTextEncoder:
    """A 2-layer Qwen2 of ``width`` channels with a byte tokenizer (pad id 0), randomly initialised from ``seed``."""
    from ..importable import prepare_transformers_import
    prepare_transformers_import()
    from transformers import Qwen2Config, Qwen2Model
    cfg = Qwen2Config(vocab_size=ByteTokenizer.vocab_size, hidden_size=width, intermediate_size=2 * width,
                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                      pad_token_id=0, attn_implementation="eager")
    state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        model = Qwen2Model(cfg).eval().requires_grad_(False)
    finally:
        torch.random.set_rng_state(state)
    tok = ByteTokenizer()
    return QwenTextEncoder(model, lambda p: tok(p)[:-1] or [1], 0, max_length, "tiny (random Qwen2)")


def qwen2_text_encoder(path: str | Path, max_length: int = 300, dtype: torch.dtype = torch.float32,
                       device: str | torch.device = "cpu") -> QwenTextEncoder:
    """Qwen2 (e.g. the release's Qwen2-VL-1.5B-Instruct text model) from a local directory with its tokenizer."""
    path = Path(path)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"--text-encoder: {path} is not a Qwen2 directory (no config.json)")
    from ..importable import prepare_transformers_import
    prepare_transformers_import()
    from transformers import AutoModel, AutoTokenizer
    tok = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    model = AutoModel.from_pretrained(str(path), local_files_only=True, torch_dtype=dtype).to(device).eval()
    sys_file = path / SYSTEM_PROMPT_FILE
    system_ids = tok(sys_file.read_text())["input_ids"] if sys_file.is_file() else None
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    return QwenTextEncoder(model, lambda p: tok(p)["input_ids"], pad, max_length, path.name, system_ids)
