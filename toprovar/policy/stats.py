"""The entropy statistics of ToProVAR as pure functions (shared by the policy and calibration).

All entropies are per-token head-mean self-attention entropies in nats (what a block returns with
``entropy="mean"``), float32. Where a policy has a batch of prompts it averages the conditional rows
first, so the whole batch shares one decision.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def low_entropy_ratio(entropy: torch.Tensor) -> torch.Tensor:
    """rho = |{i : H_i < mean(H)}| / N over the last dim (paper Eq. 3 / 7): (..., N) -> (...) float32."""
    h = entropy.float()
    return (h < h.mean(dim=-1, keepdim=True)).float().mean(dim=-1)


def pruning_depth(rhos: list[float], tau: float) -> int | None:
    """D = min{s : rho_s >= tau}, or None when rho never reaches tau (then nothing is pruned)."""
    for s, r in enumerate(rhos):
        if r >= tau:
            return s
    return None


def principal_ratio(entropy_map: torch.Tensor, center: bool = False) -> float:
    """sigma1 / sigma2 of an h x w entropy map (paper: varrho = sigma1/sigma2).

    A map with fewer than two singular values or sigma2 == 0 (rank 1) gives +inf. ``center``
    subtracts the map's mean first.
    """
    m = entropy_map.detach().double().cpu()  # a small matrix: the CPU SVD avoids a GPU solver start-up
    if m.dim() != 2:
        raise ValueError(f"entropy map: expected (h, w), got {tuple(m.shape)}")
    if center:
        m = m - m.mean()
    s = torch.linalg.svdvals(m)
    if s.numel() < 2:
        return math.inf
    s1, s2 = float(s[0]), float(s[1])
    if s2 <= s1 * 1e-12:
        return math.inf
    return s1 / s2


def layer_score(ratio: float, beta: float) -> float:
    """R = exp(-beta (varrho - 1)) (paper Eq. 4): 1 for varrho = 1 (Detail layer), -> 0 as varrho grows."""
    if math.isinf(ratio):
        return 0.0
    return math.exp(-beta * (ratio - 1.0))


def scale_factor(si: int, num_scales: int) -> float:
    """phi(s) = s / S_max with the 1-based scale s = si + 1: 1/S at the first scale, 1 at the last."""
    return (si + 1) / num_scales


def upsample_entropy(entropy: torch.Tensor, src: tuple[int, int], dst: tuple[int, int]) -> torch.Tensor:
    """(..., h*w) entropy on the src grid -> (..., H*W) on the dst grid by bilinear interpolation
    (align_corners=False, the interpolation the summed codes use between scales); leading dims: per prompt."""
    lead = entropy.shape[:-1]
    if tuple(src) == tuple(dst):
        return entropy.float().reshape(*lead, -1)
    m = entropy.float().reshape(-1, 1, *src)
    return F.interpolate(m, size=tuple(dst), mode="bilinear", align_corners=False).reshape(*lead, -1)


def min_kept(n: int, k_min: float, bucket: int) -> int:
    """The smallest kept count: max(1, ceil(k_min n)) rounded up to a multiple of ``bucket``, capped at n.

    ceil has a 1e-3 tolerance so that a k_min n meant as an integer (0.1 * 640) is not pushed up by
    float error; ``TokenKeepPiece`` computes the same in float32.
    """
    lo = max(1, math.ceil(k_min * n - 1e-3))
    return min(n, -(-lo // bucket) * bucket)


__all__ = ["low_entropy_ratio", "pruning_depth", "principal_ratio", "layer_score", "scale_factor",
           "upsample_entropy", "min_kept"]
