"""Bitwise sampling with CFG, temperature and top-k/top-p, driven by a given uniform noise.

Each bit is a 2-class distribution. Official semantics: logits / tau; with CFG the mixed logits
cfg*cond + (1-cfg)*uncond; top-k keeps the k largest classes (k >= 2: no effect; k = 1: greedy);
top-p (when > 0) removes the smaller class when its probability is <= 1 - top_p. A bit is 1 when u < p(1), so
a backend that is given the same uniform noise draws the same bits (the official code draws with
torch.multinomial, whose CPU and CUDA streams differ anyway).
"""
from __future__ import annotations

import math
from typing import Sequence

import torch


def mix_cfg(logits: torch.Tensor, cfg: torch.Tensor | float, batch: int) -> torch.Tensor:
    """logits (2B, ...) [cond; uncond] -> cfg * cond + (1 - cfg) * uncond (B, ...); (B, ...) passes."""
    if logits.shape[0] == batch:
        return logits
    return cfg * logits[:batch] + (1 - cfg) * logits[batch:]


def sample_bits(logits: torch.Tensor, uniform: torch.Tensor, cfg: torch.Tensor | float,
                tau: torch.Tensor | float, top_p: torch.Tensor | float, top_k: int = 0) -> torch.Tensor:
    """logits (B' , n, bits, 2) float32 with B' in {B, 2B}; uniform (B, n, bits) in [0, 1).

    Returns bits (B, n, bits) float32 in {0, 1}.
    """
    batch = uniform.shape[0]
    lg = mix_cfg(logits.float() / tau, cfg, batch)
    p1 = torch.sigmoid(lg[..., 1] - lg[..., 0])
    greedy = (p1 > 0.5).float()
    if top_k == 1:
        return greedy
    p_small = torch.minimum(p1, 1 - p1)
    p1 = torch.where((p_small <= 1 - top_p) & (top_p > 0), greedy, p1)
    return (uniform < p1).float()


def check_sampling(cfg: float | Sequence[float], tau: float | Sequence[float], top_p: float, n_scales: int) -> None:
    """ValueError (one line naming the argument) unless every cfg is finite and >= 0, every tau finite and > 0,
    top_p in [0, 1], and a per-scale list has exactly ``n_scales`` values."""
    for name, value, ok, want in (("cfg", cfg, lambda v: v >= 0, ">= 0"), ("tau", tau, lambda v: v > 0, "> 0")):
        vals = [value] if isinstance(value, (int, float)) else list(value)
        if len(vals) != 1 and len(vals) != n_scales:
            raise ValueError(f"--{name}: {len(vals)} values given for {n_scales} scales (give one value or "
                             f"exactly {n_scales})")
        bad = [v for v in vals if not (isinstance(v, (int, float)) and math.isfinite(v) and ok(v))]
        if bad:
            raise ValueError(f"--{name}: {bad[0]} is not a finite number {want}")
    if not (isinstance(top_p, (int, float)) and 0.0 <= top_p <= 1.0):
        raise ValueError(f"--top-p: {top_p} is outside [0, 1] (0 turns top-p off)")
