"""Test-only stand-ins that let the OFFICIAL Infinity code (FoundationVision/Infinity) run on a CPU.

The official ``infinity/models/{basic,infinity}.py`` import CUDA-only or heavy packages at module level:
``flash_attn`` (attention kernels), ``timm`` (``register_model``, ``DropPath``, ``SoftTargetCrossEntropy``),
``infinity.models.fused_op`` (``torch.compile``-d norms) and, through ``infinity.utils``, ``pytz``. This module
provides small replacements written here (nothing is copied from the official repository) that compute the
same math as the kernels they replace, in float32, and a context manager that imports the official model
class with them installed and removes them from ``sys.modules`` again afterwards.

Nothing here is used by the package; only ``tests/oracle`` and the GPU peer-anchor benchmark
``bench/official_anchor.py`` (``native_kernels=True``) import it.
"""
from __future__ import annotations

import contextlib
import datetime
import importlib
import math
import sys
import types
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode


# --------------------------------------------------------------------------- flash_attn
def _sdpa_f32(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None) -> torch.Tensor:
    """softmax(scale q k^T) v on (..., L, d) tensors, accumulated in float32 (as the flash kernels do)."""
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    if scale is None:
        scale = 1.0 / math.sqrt(q.shape[-1])
    return F.scaled_dot_product_attention(q.to(acc), k.to(acc), v.to(acc), scale=scale)


def flash_attn_func(q, k, v, dropout_p=0.0, softmax_scale=None, causal=False, **_unused):
    """flash_attn.flash_attn_func: q, k, v (B, L, H, d) -> (B, Lq, H, d) in q's dtype (no dropout)."""
    if dropout_p:
        raise NotImplementedError("shim: dropout is not supported")
    qt, kt, vt = (t.transpose(1, 2) for t in (q, k, v))
    if causal:
        raise NotImplementedError("shim: causal is not used by Infinity")
    return _sdpa_f32(qt, kt, vt, softmax_scale).transpose(1, 2).to(q.dtype)


def flash_attn_varlen_kvpacked_func(q, kv, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                                    dropout_p=0.0, softmax_scale=None, causal=False, **_unused):
    """flash_attn.flash_attn_varlen_kvpacked_func: q (Nq, H, d), kv (Nk, 2, H, d), cumulative sequence
    starts (B+1,) int32 -> (Nq, H, d) in q's dtype; sequence i of q attends only to sequence i of kv."""
    if dropout_p or causal:
        raise NotImplementedError("shim: dropout/causal are not used by Infinity")
    out = torch.empty(q.shape[0], q.shape[1], kv.shape[-1], dtype=q.dtype, device=q.device)
    cq, ck = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()
    assert len(cq) == len(ck)
    for i in range(len(cq) - 1):
        qi = q[cq[i]:cq[i + 1]].transpose(0, 1)            # (H, lq, d)
        ki = kv[ck[i]:ck[i + 1], 0].transpose(0, 1)        # (H, lk, d)
        vi = kv[ck[i]:ck[i + 1], 1].transpose(0, 1)
        out[cq[i]:cq[i + 1]] = _sdpa_f32(qi, ki, vi, softmax_scale).transpose(0, 1).to(q.dtype)
    return out


def flash_attn_varlen_kvpacked_native(q, kv, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                                      dropout_p=0.0, softmax_scale=None, causal=False, **_unused):
    """The same contract as ``flash_attn_varlen_kvpacked_func``, for benchmarking on CUDA (not for the oracle):
    SDPA in q's dtype (bf16 -> PyTorch's fused SDPA kernels), no float32 upcast, and no host sync. Every q
    sequence has the same length (``Infinity``'s cross-attention: Lq = N / B); the kv sequences are gathered
    into a (B, max_seqlen_k) padded batch with a key mask built on the device from ``cu_seqlens_k``."""
    if dropout_p or causal:
        raise NotImplementedError("shim: dropout/causal are not used by Infinity")
    B = cu_seqlens_k.shape[0] - 1
    H, d = q.shape[1], q.shape[2]
    Lq = q.shape[0] // B
    pos = torch.arange(max_seqlen_k, device=kv.device)
    starts, lens = cu_seqlens_k[:-1].long(), (cu_seqlens_k[1:] - cu_seqlens_k[:-1]).long()
    idx = (starts[:, None] + pos[None]).clamp_max(kv.shape[0] - 1)             # (B, Lk)
    kvp = kv[idx]                                                              # (B, Lk, 2, H, d)
    mask = (pos[None] < lens[:, None])[:, None, None, :]                        # (B, 1, 1, Lk)
    qb = q.reshape(B, Lq, H, d).transpose(1, 2)
    k, v = kvp[:, :, 0].transpose(1, 2), kvp[:, :, 1].transpose(1, 2)
    out = F.scaled_dot_product_attention(qb, k.to(q.dtype), v.to(q.dtype), attn_mask=mask, scale=softmax_scale)
    return out.transpose(1, 2).reshape(B * Lq, H, v.shape[-1])


# --------------------------------------------------------------------------- timm
def register_model(fn):
    """timm.models.register_model: only registers a factory; here a no-op decorator."""
    return fn


def drop_path(x, drop_prob: float = 0.0, training: bool = False, scale_by_keep: bool = True):
    """Stochastic depth; only the inference behaviour (identity) is needed by the oracle."""
    if drop_prob == 0.0 or not training:
        return x
    keep = 1 - drop_prob
    mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)
    return x * mask / keep if scale_by_keep else x * mask


class DropPath(nn.Module):
    def __init__(self, drop_prob: float = 0.0, scale_by_keep: bool = True):
        super().__init__()
        self.drop_prob, self.scale_by_keep = drop_prob, scale_by_keep

    def forward(self, x):
        return drop_path(x, self.drop_prob, self.training, self.scale_by_keep)


class SoftTargetCrossEntropy(nn.Module):
    def forward(self, x, target):
        return torch.sum(-target * F.log_softmax(x, dim=-1), dim=-1).mean()


# --------------------------------------------------------------------------- infinity.models.fused_op
def fused_rms_norm(x, weight, eps):
    x = x.float()
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight


def fused_ada_layer_norm(C, eps, x, scale, shift):
    """LayerNorm (no affine) of x in float32, then * (1 + scale) + shift."""
    return F.layer_norm(x.float(), (C,), None, None, eps) * (scale + 1) + shift


def fused_ada_rms_norm(C, eps, x, scale, shift):
    x = x.float()
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * (scale + 1) + shift


# --------------------------------------------------------------------------- pytz (time strings only)
def _pytz_timezone(name: str):
    try:
        from zoneinfo import ZoneInfo
        return ZoneInfo(name)
    except Exception:
        return datetime.timezone.utc


def _module(name: str, package: bool = False, **attrs) -> types.ModuleType:
    m = types.ModuleType(name)
    if package:
        m.__path__ = []
    m.__dict__.update(attrs)
    return m


def _shim_modules(native_kernels: bool = False, shim_fused_op: bool = True) -> dict[str, types.ModuleType]:
    varlen = flash_attn_varlen_kvpacked_native if native_kernels else flash_attn_varlen_kvpacked_func
    mods = {
        "flash_attn": _module("flash_attn", flash_attn_func=flash_attn_func,
                              flash_attn_varlen_kvpacked_func=varlen),
        "timm": _module("timm", package=True),
        "timm.models": _module("timm.models", package=True, register_model=register_model),
        "timm.models.layers": _module("timm.models.layers", DropPath=DropPath, drop_path=drop_path),
        "timm.loss": _module("timm.loss", SoftTargetCrossEntropy=SoftTargetCrossEntropy),
        "infinity.models.fused_op": _module("infinity.models.fused_op", fused_rms_norm=fused_rms_norm,
                                            fused_ada_layer_norm=fused_ada_layer_norm,
                                            fused_ada_rms_norm=fused_ada_rms_norm),
    }
    if not shim_fused_op:
        del mods["infinity.models.fused_op"]  # the official torch.compile-d norms (needs a working compiler)
    mods["timm"].models, mods["timm"].loss = mods["timm.models"], mods["timm.loss"]
    mods["timm.models"].layers = mods["timm.models.layers"]
    try:
        import pytz  # noqa: F401  (the real one when installed)
    except ImportError:
        mods["pytz"] = _module("pytz", timezone=_pytz_timezone)
    return mods


def import_official_infinity(repo: str | Path, native_kernels: bool = False,
                             shim_fused_op: bool = True) -> types.SimpleNamespace:
    """Import the official ``infinity.models.{infinity,basic}`` from the checkout at ``repo`` with the shims.

    The shims are in ``sys.modules`` only while importing (the official modules keep references to them);
    the official ``infinity.*`` modules stay imported. Returns a namespace with ``infinity`` and ``basic``.
    ``native_kernels`` (benchmarks): cross-attention through ``flash_attn_varlen_kvpacked_native`` instead of
    the float32 oracle kernel; ``shim_fused_op=False``: keep the official ``fused_op`` (torch.compile-d).
    """
    repo = str(Path(repo).resolve())
    shims = _shim_modules(native_kernels, shim_fused_op)
    saved = {name: sys.modules.get(name) for name in shims}
    sys.path.insert(0, repo)
    try:
        sys.modules.update(shims)
        inf = importlib.import_module("infinity.models.infinity")
        basic = importlib.import_module("infinity.models.basic")
    finally:
        sys.path.remove(repo)
        for name, old in saved.items():
            if name.startswith("infinity."):
                continue  # the official package imported it by reference; leave it for later lookups
            if old is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = old
    if not Path(inf.__file__).resolve().is_relative_to(repo):
        raise ImportError(f"infinity.models.infinity was imported from {inf.__file__}, not from {repo}")
    return types.SimpleNamespace(infinity=inf, basic=basic)


# --------------------------------------------------------------------------- float32 cross-attention
class _NoBF16Cast(TorchFunctionMode):
    """Turns ``float32_tensor.to(torch.bfloat16)`` into a no-op.

    The official ``CrossAttention.forward`` casts float32 q/kv to bfloat16 before calling flash-attn (which
    has no float32 kernel), so even the official "float32" model runs cross-attention with bf16 inputs. The
    oracle compares the float32 math, so while the official model runs under this mode that cast is skipped
    and the (float32) shim kernel receives the float32 tensors. Nothing else in the official model casts
    to bfloat16 in float32 mode.
    """

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.Tensor.to and args and isinstance(args[0], torch.Tensor) \
                and args[0].dtype == torch.float32:
            dtype = kwargs.get("dtype", next((a for a in args[1:] if isinstance(a, torch.dtype)), None))
            if dtype is torch.bfloat16:
                self.skipped += 1
                return args[0]
        return func(*args, **kwargs)

    def __enter__(self):
        self.skipped = 0
        return super().__enter__()


@contextlib.contextmanager
def float32_cross_attention():
    """Run the official model with its bf16 cast before flash-attn skipped (see ``_NoBF16Cast``)."""
    mode = _NoBF16Cast()
    with mode:
        yield mode


# --------------------------------------------------------------------------- float64 reference
class _KeepFloat64(TorchFunctionMode):
    """Turns every cast of a float64 tensor to a lower float dtype (``.float()``, ``.to(float32/bf16/fp16)``,
    ``.type_as(lower)``) into a no-op, so a model whose parameters and inputs are float64 computes in float64
    from end to end although its code casts to float32 (AdaLN, norms, head, RoPE, the official flash-attn
    bf16 cast): the reference that float32 and bf16 runs are measured against."""

    LOWER = (torch.float32, torch.bfloat16, torch.float16)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        src = args[0] if args and isinstance(args[0], torch.Tensor) else None
        if src is not None and src.dtype == torch.float64:
            if func in (torch.Tensor.float, torch.Tensor.bfloat16, torch.Tensor.half):
                return src
            if func is torch.Tensor.to:
                dtype = kwargs.get("dtype", next((a for a in args[1:] if isinstance(a, torch.dtype)), None))
                if dtype is None:
                    other = next((a for a in args[1:] if isinstance(a, torch.Tensor)), None)
                    dtype = other.dtype if other is not None else None
                if dtype in self.LOWER:
                    rest = {k: v for k, v in kwargs.items() if k != "dtype"}
                    return src.to(rest["device"]) if "device" in rest else src
            if func is torch.Tensor.type_as and args[1].dtype in self.LOWER:
                return src
        return func(*args, **kwargs)


@contextlib.contextmanager
def float64_everywhere():
    """Run a float64 model without its casts to lower precision (see ``_KeepFloat64``)."""
    with _KeepFloat64() as mode:
        yield mode


# --------------------------------------------------------------------------- bf16 autocast as on CUDA
class _Float32Policy(TorchFunctionMode):
    """Under CPU autocast, runs the ops that CUDA autocast runs in float32 (its "fp32" list: layer_norm,
    normalize's norm, exp, softmax, ...) in float32, with every floating argument upcast as CUDA autocast does:
    the official ``load_infinity(bf16=True)`` model (blocks cast to bfloat16) computes on the CPU as on a GPU."""

    OPS = {F.layer_norm, torch.layer_norm, F.normalize, torch.Tensor.exp, torch.exp, F.softmax, torch.softmax,
           torch.Tensor.softmax, F.log_softmax, torch.Tensor.log_softmax}

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in self.OPS:
            up = lambda a: a.float() if isinstance(a, torch.Tensor) and a.is_floating_point() else a  # noqa: E731
            with torch.autocast("cpu", enabled=False):
                return func(*[up(a) for a in args], **{k: up(v) for k, v in kwargs.items()})
        return func(*args, **kwargs)


@contextlib.contextmanager
def cuda_like_bf16_autocast():
    """``torch.autocast`` bf16 on the CPU with CUDA autocast's float32 policy (see ``_Float32Policy``)."""
    with torch.autocast("cpu", dtype=torch.bfloat16), _Float32Policy():
        yield
