"""ToProVAR's per-token keep rule as one ONNX-exportable module (the single source of truth).

    Hn_i   = N H_i / sum_j H_j                       (mean-normalised entropy, mean 1)
    q_i    = phi(s) R_l Hn_i                         (phi_r = phi(s) R_l is one input scalar)
    P_keep = 1 - clip(a_min + (a_max - a_min) q_i, 0, 1)
    k      = min(N, bucket * ceil(max(round(sum_i P_keep), max(1, ceil(k_min N))) / bucket))
    order  = token indices by P_keep descending (ties: lower index first)

Why mean-normalised: the paper's Eq. 5 divides by the sum, so Hn sums to 1, q_i ~ 1/N and P_keep ->
1 - a_min for every token as N grows (4096 tokens at 1024x1024): token pruning would vanish at exactly
the scales where it matters. N H_i / sum_j H_j keeps the paper's ranking and ratios between tokens,
has mean 1 at every scale, so a_min / a_max mean the same at every N, and a token at the mean entropy in
the last scale of a Detail layer (phi R = 1) is pruned with probability a_max.

The module uses only exportable tensor ops (no Python control flow on values): ``k`` is computed in
float32 and cast; ``order`` puts equal P_keep in ascending index order. While exporting, ``order`` is an
exact rank computation (``descending_order``: the same on ONNX Runtime and TensorRT, whose TopK tie
order is unspecified); in eager PyTorch it is the equal stable sort (the only branch, on export mode,
never on values).
"""
from __future__ import annotations

import torch
import torch.nn as nn


class TokenKeepPiece(nn.Module):
    """entropy (n,) or (1, n) float32, phi_r (1,) float32 -> p_keep (n,) float32, k (1,) int64,
    order (n,) int64 (descending P_keep). a_min, a_max, k_min are float32 buffers; bucket is static."""

    def __init__(self, a_min: float, a_max: float, k_min: float, bucket: int):
        super().__init__()
        self.register_buffer("a_min", torch.tensor([a_min], dtype=torch.float32))
        self.register_buffer("a_max", torch.tensor([a_max], dtype=torch.float32))
        self.register_buffer("k_min", torch.tensor([k_min], dtype=torch.float32))
        self.bucket = int(bucket)

    def forward(self, entropy: torch.Tensor, phi_r: torch.Tensor):
        h = entropy.float().reshape(-1)
        n = torch.ones_like(h).sum()  # N as float32, shape-dynamic
        hn = h * (n / h.sum().clamp_min(1e-12))
        q = phi_r.float().reshape(1) * hn
        p_keep = 1.0 - torch.clamp(self.a_min + (self.a_max - self.a_min) * q, 0.0, 1.0)
        k_lo = torch.clamp(torch.ceil(self.k_min * n - 1e-3), min=1.0)
        k = torch.maximum(torch.round(p_keep.sum()).reshape(1), k_lo)
        k = torch.minimum(torch.ceil(k / self.bucket) * self.bucket, n.reshape(1))
        if torch.onnx.is_in_onnx_export() or torch.compiler.is_exporting():
            order = descending_order(p_keep)
        else:  # eager: the same permutation (tested), O(n log n)
            order = torch.sort(p_keep, descending=True, stable=True).indices
        return p_keep, k.to(torch.int64), order


def descending_order(p: torch.Tensor) -> torch.Tensor:
    """Indices of ``p`` (n,) by descending value, equal values by ascending index, as exportable ops
    (what an exported TokenKeepPiece computes; eager PyTorch uses the equal stable sort).

    rank_i = #{j : p_j > p_i} + #{j < i : p_j == p_i} (a permutation), then order[rank_i] = i. This is
    O(n^2) compares (n <= 4107 tokens per scale: 17M booleans) but exact and the same on every backend,
    unlike TopK/sort whose tie order is not specified by TensorRT (ties are common: P_keep clips at 0).
    """
    idx = torch.ones_like(p, dtype=torch.int64).cumsum(0) - 1
    before = (p.unsqueeze(0) > p.unsqueeze(1)) | ((p.unsqueeze(0) == p.unsqueeze(1)) & (idx.unsqueeze(0) < idx.unsqueeze(1)))
    rank = before.to(torch.int64).sum(dim=1)
    return torch.zeros_like(idx).scatter(0, rank, idx)


def ascending_first(order: torch.Tensor, k: int) -> torch.Tensor:
    """``order[:k]`` of a permutation ``order`` (n,) int64, in ascending order: (k,) int64.

    No sort and no host read: the chosen tokens' mask, compacted by ``nonzero_static`` (its size is k, so
    it needs no count on the host; on CUDA a fixed chain of small kernels), is ``order[:k].sort().values``
    exactly.
    """
    chosen = torch.zeros(order.numel(), dtype=torch.bool, device=order.device).index_fill_(0, order[:k], True)
    return torch.nonzero_static(chosen, size=k).squeeze(1)


def select_kept(piece: TokenKeepPiece, entropy: torch.Tensor, phi_r: torch.Tensor, k: int) -> torch.Tensor:
    """The k tokens with the largest P_keep (``piece``'s order), ascending: (k,) int64 (k known on the host:
    a pinned operating point). Compiled with torch.compile by the policy when the backend is compiled.
    (A selection without the sort, kthvalue plus running counts, measured slower under whole-scale graphs on
    the H200: bench/results/e2e_notes.md.)"""
    return ascending_first(piece(entropy, phi_r)[2], k)


__all__ = ["TokenKeepPiece", "ascending_first", "descending_order", "select_kept"]
