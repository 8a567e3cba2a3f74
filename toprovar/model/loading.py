"""Building a model's PyTorch parts from a config name and weight files (random, seeded, when none)."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from ..config import ModelConfig, get_config
from ..inputs import file_problem
from . import families
from .text import TextEncoder, t5_text_encoder, tiny_text_encoder


@dataclass
class ModelParts:
    """The transformer, the VAE decoder and the text encoder (None: generate from features) of one model."""
    cfg: ModelConfig
    model: torch.nn.Module  # Infinity or HART (``toprovar.model.families``)
    decoder: torch.nn.Module
    text_encoder: TextEncoder | None
    random_parts: list[str]  # parts with random (seeded) weights: "transformer", "VAE", "text encoder"

    @property
    def random_weights(self) -> bool:
        return bool(self.random_parts)


def load_parts(model: str = "tiny", checkpoint: str | None = None, vae: str | None = None,
               t5: str | None = None, device: str = "cpu", dtype: torch.dtype = torch.float32,
               seed: int = 0, text_encoder: bool = True, weights: str | None = None,
               keep_fp32_params: bool = False, vae_dtype: torch.dtype | None = None) -> ModelParts:
    """Build from a config name; real weights from ``checkpoint``/``vae``/``t5``, else random (seeded).

    A config with packaged weights (``shapes``) loads them, the transformer from ``checkpoint`` when given;
    ``weights`` names another directory of that layout (model / vae / text_encoder ``.safetensors``, as written
    by tools/train_small.py). text_encoder=False builds no text encoder: generate from precomputed features.
    keep_fp32_params: see ``Infinity.to_inference_dtype`` (a non-float32 ``dtype`` only).
    vae_dtype: the decoder's dtype; None: ``dtype`` on CUDA, float32 on the CPU. A BSQ decoder runs its
    upsample convs in the subpixel layout (``BSQDecoder.set_layout``; same weights and state dict).
    HART: ``vae`` is the tokenizer checkpoint (decoder and codebook), ``t5`` the Qwen2 text encoder directory.
    """
    cfg = get_config(model)
    files = cfg.weight_files(weights, checkpoint)
    text_weights = files["text_encoder"] if files else None
    if files:
        checkpoint, vae = files["model"], vae or files["vae"]
    if cfg.is_hart and bool(checkpoint) != bool(vae):
        raise ValueError(f"--checkpoint/--tokenizer: {cfg.name} needs both the transformer and the tokenizer "
                         f"checkpoint (the codebook lives in the tokenizer), or neither (random weights)")
    for arg, path in (("--checkpoint", checkpoint), ("--vae", vae)):  # fail before building anything
        # HART's checkpoint and tokenizer may be the official directories (llm/, tokenizer/): checked on loading
        problem = path and not (cfg.is_hart and Path(path).is_dir()) and file_problem(path)
        if problem:
            raise FileNotFoundError(f"{arg}: {path}: {problem}")
    if not text_encoder:
        te = None
    elif cfg.is_hart:
        from .hart.text import qwen2_text_encoder, tiny_qwen2_encoder
        if t5:
            te = qwen2_text_encoder(t5, cfg.text_maxlen, device=device)
        elif cfg.text_encoder == "tiny-qwen2":
            te = tiny_qwen2_encoder(cfg.text_channels, cfg.text_maxlen, seed=seed).to(device)
        else:
            raise ValueError(f"--text-encoder: model {cfg.name} needs a local Qwen2 directory (--text-encoder DIR)")
    elif t5:
        te = t5_text_encoder(t5, cfg.text_maxlen, device=device)
    elif cfg.text_encoder == "tiny":
        te = tiny_text_encoder(cfg.text_channels, cfg.text_maxlen, seed=seed, weights=text_weights).to(device)
    else:
        raise ValueError(f"--t5: model {cfg.name} needs a local flan-t5-xl directory (--t5 DIR)")
    # random weights are drawn on the CPU so a seed gives the same model on every device
    net = families.build_model(cfg, seed=seed, device="cpu" if cfg.is_hart or not checkpoint else "meta")
    if checkpoint:
        net = net.to_empty(device="cpu") if not cfg.is_hart else net
        net.load_checkpoint(checkpoint)
    dec = families.load_decoder(cfg, vae, net) if vae else families.build_decoder(cfg, seed=seed)
    if dtype != torch.float32:
        net.to_inference_dtype(dtype, keep_fp32_params)
    net = net.to(device)
    if hasattr(dec, "set_layout"):
        dec.set_layout(subpixel=True)  # re-arranged in float32, then cast
    if vae_dtype is None:
        vae_dtype = dtype if torch.device(device).type == "cuda" else torch.float32
    dec = dec.to(device, vae_dtype).eval().requires_grad_(False)
    random_parts = [name for name, given in (("transformer", checkpoint), ("VAE", vae),
                                             ("text encoder", te is None or t5 or text_weights)) if not given]
    return ModelParts(cfg, net, dec, te, random_parts)
