"""2D rotary position embedding of Infinity (adjacent-pair rotation, row then column frequencies).

Token (i, j) of an h x w scale sits at grid position (round(i*GH/h), round(j*GW/w)) (float32) of the GH x GW
grid of the 1M schedule's last scale; the first half of the rotated pairs use the row frequency, the
second half the column frequency, theta_k = 10000^(-2k/(d/2)).
"""
from __future__ import annotations

import torch


def rope_angles(head_dim: int, schedule: list[tuple[int, int]], grid: tuple[int, int],
                base: float = 10000.0) -> list[torch.Tensor]:
    """Per scale, the rotation angles (h*w, head_dim/2) float32, row-major token order."""
    half = head_dim // 2
    inv_freq = 1.0 / (base ** (torch.arange(0, half, 2, dtype=torch.int64).float() / half))
    gh, gw = grid
    out = []
    for h, w in schedule:
        # positions i * (GH / h) rounded half to even, the product in float32 as the official code computes it:
        # in float64 it differs where the exact value is k + 1/2 (e.g. 15 * 111/90 at the 54x18 scale of h/w 3)
        rows = (torch.arange(h, dtype=torch.float32) * torch.tensor(gh / h, dtype=torch.float32)).round()
        cols = (torch.arange(w, dtype=torch.float32) * torch.tensor(gw / w, dtype=torch.float32)).round()
        ang_r = torch.outer(rows, inv_freq)[:, None, :].expand(h, w, -1)
        ang_c = torch.outer(cols, inv_freq)[None, :, :].expand(h, w, -1)
        out.append(torch.cat([ang_r, ang_c], dim=-1).reshape(h * w, half))
    return out


def rope_tables(head_dim: int, schedule: list[tuple[int, int]], grid: tuple[int, int]) -> list[torch.Tensor]:
    """Per scale, cos/sin stacked: (2, h*w, head_dim/2) float32 (what a block takes as ``rope``)."""
    return [torch.stack([a.cos(), a.sin()]) for a in rope_angles(head_dim, schedule, grid)]


def apply_rope(x: torch.Tensor, rope: torch.Tensor) -> torch.Tensor:
    """Rotate adjacent pairs of x (..., d) by rope (2, ..., d/2) (cos, sin; broadcast against x without its
    last dim, e.g. x (B, N, H, d) and rope (2, N, 1, d/2)); computed in float32, x's dtype out."""
    cos, sin = rope[0].float(), rope[1].float()
    xf = x.float().unflatten(-1, (-1, 2))
    x0, x1 = xf[..., 0], xf[..., 1]
    out = torch.stack([cos * x0 - sin * x1, sin * x0 + cos * x1], dim=-1)
    return out.flatten(-2).to(x.dtype)
