"""Teacher forcing of the Infinity transformer on tokenized images: inputs, labels and the bitwise loss.

The inputs are built with the same pieces generation uses (``accumulate_codes``, ``next_scale_input``,
``first_input``, ``embed_scale``), so the model learns exactly the inputs it sees at inference.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..model.infinity import Infinity
from ..model.quant import accumulate_codes, next_scale_input


def init_for_training(model: Infinity) -> Infinity:
    """Re-initialise a freshly built model for training, after the official recipe: linear weights and
    embeddings truncated-normal (std sqrt(1/(3C))), biases zero, the head and the residual gates small
    (AdaLN gammas 1e-3 x their random init, head weights x 0.02), the shared AdaLN projection x 0.5."""
    std = math.sqrt(1 / model.cfg.width / 3)
    for m in model.modules():
        if isinstance(m, nn.Linear):
            nn.init.trunc_normal_(m.weight, std=std)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
    with torch.no_grad():
        model.head.weight.mul_(0.02)
        model.shared_ada_lin[1].weight.mul_(0.5)
        for b in model.blocks:
            b.ada_gss[:, :, 2:].mul_(0.5)
            b.ada_gss[:, :, :2].mul_(1e-3)
    return model.train().requires_grad_(True)


def teacher_inputs(model: Infinity, cond: torch.Tensor, bits: list[torch.Tensor],
                   schedule: list[tuple[int, int]]) -> torch.Tensor:
    """The transformer's input for all scales at once, (B, N, C) float32, N = sum h*w.

    cond (B, C) float32 from ``Infinity.condition``; bits per scale (B, h, w, d) {0, 1} (``quantize_multiscale``).
    Scale 0 is ``first_input(cond)``; scale k > 0 embeds the summed codes of scales < k resized to scale k.
    """
    final = schedule[-1]
    xs, summed = [model.first_input(cond)], None
    for k in range(1, len(schedule)):
        summed = accumulate_codes(summed, bits[k - 1], final)
        xs.append(model.embed_scale(next_scale_input(summed, schedule[k]), k))
    return torch.cat(xs, dim=1)


def bit_labels(bits: list[torch.Tensor]) -> torch.Tensor:
    """Bits per scale (B, h, w, d) -> labels (B, N, d) int64, row-major tokens, coarse to fine."""
    return torch.cat([b.flatten(1, 2) for b in bits], dim=1).long()


def bitwise_loss(logits: torch.Tensor, labels: torch.Tensor, counts: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Cross-entropy of logits (B, N, d, 2) against labels (B, N, d), each scale's mean weighted by
    sqrt(h*w) (coarse scales, which fix the layout, are not drowned by the last one).

    Returns (loss, per-scale mean losses (S,) float32; read on the host only when logged).
    """
    ce = F.cross_entropy(logits.float().flatten(0, 2), labels.flatten(), reduction="none").view(labels.shape)
    per_scale = torch.stack([c.mean() for c in ce.split(counts, dim=1)])
    w = [math.sqrt(n) for n in counts]  # host floats: no host-to-device copy per step
    return sum(wi * p for wi, p in zip(w, per_scale)) / sum(w), per_scale
