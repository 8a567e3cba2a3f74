"""Chunked reference for attention with per-query softmax entropy.

Never holds more than ``max_chunk_elems`` scores of the N x N matrix at once. It is the CPU path of
``toprovar.ops.attention_with_entropy`` and the oracle the CUDA kernel is checked against. It computes in
float32 on CUDA and in float64 on the CPU: float32 score rounding alone (|s| eps ~ 3e-7) puts random
inputs at ~1e-6 from the exact entropy, and the CPU path is meant to be exact to 1e-6.

Entropy in nats, centered streaming-free form per chunk of queries (all keys at once per chunk):
    H_i = ln l_i - (sum_j p_ij (s_ij - m_i)) / l_i,   p_ij = exp(s_ij - m_i),  l_i = sum_j p_ij
which equals -sum_j a_ij ln a_ij for a_ij = softmax_j(s_ij). Masked keys contribute nothing; a fully
masked row gives O = 0 and H = 0; H is clamped to [0, ln N_valid].
"""
from __future__ import annotations

import torch

DEFAULT_MAX_CHUNK_ELEMS = 1 << 24  # 64 MiB of float32 scores per chunk


def key_mask_from_lengths(key_lengths: torch.Tensor | None, batch: int, n_keys: int,
                          device: torch.device) -> torch.Tensor | None:
    """(B,) int lengths -> (B, 1, 1, Nk) bool, True where the key is valid; None when no mask."""
    if key_lengths is None:
        return None
    if key_lengths.shape != (batch,):
        raise ValueError(f"key_lengths: expected shape ({batch},), got {tuple(key_lengths.shape)}")
    ar = torch.arange(n_keys, device=device)
    return (ar[None, :] < key_lengths.to(device)[:, None]).view(batch, 1, 1, n_keys)


def like_q(o: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """O laid out as the entropy op promises: with q's strides when its head dim is q's (q may be a
    (B, N, H, d)-major view: then O is too, and merging its heads is free), else contiguous."""
    if o.shape != q.shape or o.stride() == q.stride():
        return o
    return torch.empty_like(q, dtype=o.dtype).copy_(o)


def attention_entropy_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
                                key_lengths: torch.Tensor | None = None,
                                max_chunk_elems: int = DEFAULT_MAX_CHUNK_ELEMS,
                                ) -> tuple[torch.Tensor, torch.Tensor]:
    """softmax(scale q k^T) v and its per-row entropy.

    q: (B, H, Nq, d); k, v: (B, H, Nk, d) (v may have another last dim); any float dtype.
    key_lengths: optional (B,) int, keys j >= key_lengths[b] are masked.
    Returns O (B, H, Nq, dv) in q's dtype and H (B, H, Nq) float32 (float64 for float64 input).
    """
    B, Hh, Nq, _ = q.shape
    Nk = k.shape[2]
    acc = torch.float64 if q.dtype == torch.float64 or q.device.type == "cpu" else torch.float32
    mask = key_mask_from_lengths(key_lengths, B, Nk, q.device)
    out = torch.empty(B, Hh, Nq, v.shape[-1], dtype=acc, device=q.device)
    ent = torch.empty(B, Hh, Nq, dtype=acc, device=q.device)
    kf, vf = k.to(acc), v.to(acc)
    rows = max(1, max_chunk_elems // max(1, B * Hh * Nk))
    if mask is None:
        n_valid = torch.full((B, 1, 1), float(Nk), dtype=acc, device=q.device)
    else:
        n_valid = key_lengths.to(device=q.device, dtype=acc).clamp(min=1).view(B, 1, 1)
    for r0 in range(0, Nq, rows):
        qs = q[:, :, r0:r0 + rows].to(acc)
        s = torch.matmul(qs, kf.transpose(-1, -2)) * scale
        if mask is not None:
            s = s.masked_fill(~mask, float("-inf"))
        m = s.amax(dim=-1, keepdim=True)
        m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
        x = s - m
        p = torch.exp(x)
        x = torch.where(p > 0, x, torch.zeros_like(x))
        l = p.sum(dim=-1, keepdim=True)
        safe_l = torch.where(l > 0, l, torch.ones_like(l))
        out[:, :, r0:r0 + rows] = torch.matmul(p, vf) / safe_l
        h = torch.log(safe_l).squeeze(-1) - (p * x).sum(dim=-1) / safe_l.squeeze(-1)
        ent[:, :, r0:r0 + rows] = torch.minimum(h.clamp(min=0.0), torch.log(n_valid))
    return out.to(q.dtype), ent.to(torch.float64 if q.dtype == torch.float64 else torch.float32)


def attention_entropy_float64(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
                              key_lengths: torch.Tensor | None = None,
                              ) -> tuple[torch.Tensor, torch.Tensor]:
    """Materialised float64 oracle (tests only): the full score matrix, H = -sum a ln a."""
    B, _, _, _ = q.shape
    Nk = k.shape[2]
    s = torch.matmul(q.double(), k.double().transpose(-1, -2)) * scale
    mask = key_mask_from_lengths(key_lengths, B, Nk, q.device)
    if mask is not None:
        s = s.masked_fill(~mask, float("-inf"))
    a = torch.softmax(s, dim=-1)
    a = torch.nan_to_num(a, nan=0.0)
    la = torch.where(a > 0, torch.log(a), torch.zeros_like(a))
    return torch.matmul(a, v.double()), -(a * la).sum(dim=-1)
