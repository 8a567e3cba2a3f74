"""Attention operators: the one attention entry point of the model and the FAE custom op.

``attention(q, k, v, scale, key_lengths=None, entropy=None) -> (out, entropy | None)`` is the single
function every attention of the model goes through. Without entropy it is PyTorch SDPA; with entropy it
is ``torch.ops.toprovar.attention_with_entropy`` (Flash Attention Entropy): the chunked float32
reference on CPU tensors, the CUDA path on CUDA tensors (see ``toprovar.ops.fae``).
"""
from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from .reference import attention_entropy_reference, key_mask_from_lengths, like_q

EntropyMode = Literal["heads", "mean"] | None
_CUDA_SDPA_ORDER = [SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION,
                    SDPBackend.MATH]


@torch.library.custom_op("toprovar::attention_with_entropy", mutates_args=())
def _attention_with_entropy_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
                               key_lengths: torch.Tensor | None, head_mean: bool
                               ) -> tuple[torch.Tensor, torch.Tensor]:
    o, h = attention_entropy_reference(q, k, v, scale, key_lengths)
    return like_q(o, q), (h.mean(dim=1) if head_mean else h)


@_attention_with_entropy_op.register_fake
def _(q, k, v, scale, key_lengths, head_mean):
    B, H, Nq, _ = q.shape
    o = torch.empty_like(q) if v.shape[-1] == q.shape[-1] else q.new_empty(B, H, Nq, v.shape[-1])
    h = q.new_empty((B, Nq) if head_mean else (B, H, Nq), dtype=torch.float32)
    return o, h


try:  # CUDA implementation (toprovar/ops/fae.py); the native library loads lazily on first CUDA call
    from . import fae as _fae
    _fae.register(_attention_with_entropy_op)
except ImportError:  # pragma: no cover
    _fae = None


def attention_with_entropy(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
                           key_lengths: torch.Tensor | None = None, head_mean: bool = False,
                           ) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention output and per-query softmax entropy (nats).

    q: (B, H, Nq, d); k, v: (B, H, Nk, d), any strides; key_lengths: optional (B,) int32 valid key counts.
    Returns O (B, H, Nq, d) in q's dtype and layout (``like_q``) and H float32, (B, H, Nq) or (B, Nq) with
    ``head_mean``.
    """
    return torch.ops.toprovar.attention_with_entropy(q, k, v, float(scale), key_lengths, head_mean)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
              key_lengths: torch.Tensor | None = None, entropy: EntropyMode = None,
              ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The model's attention: (B, H, Nq, d) x (B, H, Nk, d) -> ((B, H, Nq, d), entropy | None).

    entropy: None (plain SDPA), "heads" -> (B, H, Nq) float32, "mean" -> (B, Nq) float32 head mean.
    """
    if entropy is None:
        mask = key_mask_from_lengths(key_lengths, q.shape[0], k.shape[2], q.device)
        if q.is_cuda and mask is None:  # cuDNN first: 1.16 ms vs flash 2.1 ms at the 2B last scale (H100)
            with sdpa_kernel(_CUDA_SDPA_ORDER, set_priority=True):
                return F.scaled_dot_product_attention(q, k, v, scale=scale), None
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale), None
    if entropy not in ("heads", "mean"):
        raise ValueError(f"entropy: expected None, 'heads' or 'mean', got {entropy!r}")
    return attention_with_entropy(q, k, v, scale, key_lengths, head_mean=entropy == "mean")


__all__ = ["attention", "attention_with_entropy", "attention_entropy_reference"]
