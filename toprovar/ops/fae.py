"""CUDA side of ``toprovar::attention_with_entropy`` (Flash Attention Entropy).

Paths for CUDA tensors (``backend``; env ``TOPROVAR_FAE_BACKEND`` or :func:`set_backend`):

- ``"auto"`` (the default): ``"kernel"`` where the native library runs its Hopper kernel (compute 9.0
  GPU, head dim 128, bf16/fp16, a build with sm_90a code), else ``"augmented"``. At the Infinity-2B last
  scale on an H100 the Hopper kernel (TMA + wgmma, warp-specialised) meets the issue's target of <= 1.10x
  cuDNN SDPA without entropy, against 2.0x for the augmented path (``bench/results/fae_notes.md``).
  If the library cannot be found, built or loaded, ``"auto"`` falls back to ``"augmented"``.
- ``"augmented"``: one cuDNN SDPA call with V' = [V | K] and its logsumexp; since s_ij = c q_i.k_j is
  bilinear, H_i = lse_i - c q_i.(A K)_i. Exact up to bf16 rounding of A K (measured <= 2.7e-3 nats on an
  H100); valid because the op takes no additive bias. 2.32 ms at the 2B last scale (cuDNN SDPA 1.16 ms);
  the route of other GPUs, where the native mma.sync kernel is slower (3.46 ms; best tiles 2.78 ms).
- ``"kernel"``: the native FAE kernel (``plugins/fae``, ``libtoprovar_fae.so`` through ctypes), one pass,
  streaming entropy; the same library the TensorRT plugin runs (the Hopper kernel on compute 9.0 for
  head dim 128, else the mma.sync kernel). Callable directly as :func:`fae_kernel`.
- ``"reference"``: the chunked float32 reference on the GPU.

float32 (and float64) inputs always take the chunked reference (the kernel takes bf16/fp16 only);
head dims other than 64/128 take the augmented path.

The library is found at ``$TOPROVAR_FAE_LIB``, else ``<repo>/build/native/libtoprovar_fae.so``, else it
is built there on first use with ``cmake -S cmake -B build/native`` (nvcc and cmake needed).
"""
from __future__ import annotations

import ctypes
import math
import os
import subprocess
import threading
from pathlib import Path

import torch

from .reference import attention_entropy_reference, like_q

REPO_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_BUILD_DIR = REPO_ROOT / "build" / "native"
LIB_NAME = "libtoprovar_fae.so"
BACKENDS = ("auto", "augmented", "kernel", "reference")

_lib = None
_lib_lock = threading.Lock()
_backend = os.environ.get("TOPROVAR_FAE_BACKEND", "auto")
_hopper_cache: dict = {}


class FaeLibraryError(RuntimeError):
    """The native FAE library could not be found, built or loaded."""


class _FaeParams(ctypes.Structure):
    """Mirror of ``FaeParams`` in plugins/fae/fae.h."""
    _fields_ = [
        ("q", ctypes.c_void_p), ("k", ctypes.c_void_p), ("v", ctypes.c_void_p), ("o", ctypes.c_void_p),
        ("h", ctypes.c_void_p), ("key_lengths", ctypes.c_void_p), ("workspace", ctypes.c_void_p),
        ("workspace_bytes", ctypes.c_size_t),
        ("batch", ctypes.c_int32), ("heads", ctypes.c_int32), ("nq", ctypes.c_int32), ("nk", ctypes.c_int32),
        ("head_dim", ctypes.c_int32),
        *[(f"{t}_stride_{d}", ctypes.c_int64) for t in "qkvo" for d in "bhn"],
        ("scale", ctypes.c_float), ("head_mean", ctypes.c_int32), ("dtype", ctypes.c_int32),
    ]


def set_backend(name: str) -> None:
    """Choose the path of CUDA bf16/fp16 calls: "auto", "augmented", "kernel" or "reference"."""
    global _backend
    if name not in BACKENDS:
        raise ValueError(f"backend: expected one of {BACKENDS}, got {name!r}")
    _backend = name


def get_backend() -> str:
    return _backend


def build_library(build_dir: Path = DEFAULT_BUILD_DIR, archs: str = "80;90a", jobs: int | None = None) -> Path:
    """Configure and build the native library with CMake; returns the .so path."""
    build_dir = Path(build_dir)
    cmd_cfg = ["cmake", "-S", str(REPO_ROOT / "cmake"), "-B", str(build_dir), f"-DFAE_CUDA_ARCHS={archs}"]
    cmd_build = ["cmake", "--build", str(build_dir), "--target", "toprovar_fae", "-j", str(jobs or os.cpu_count() or 2)]
    for cmd in (cmd_cfg, cmd_build):
        try:
            r = subprocess.run(cmd, capture_output=True, text=True)
        except FileNotFoundError as e:
            raise FaeLibraryError(f"building {LIB_NAME} needs cmake and nvcc on PATH: {e}") from e
        if r.returncode != 0:
            raise FaeLibraryError(f"building {LIB_NAME} failed: {' '.join(cmd)}\n{r.stdout[-4000:]}\n{r.stderr[-4000:]}")
    path = build_dir / LIB_NAME
    if not path.exists():
        raise FaeLibraryError(f"build finished but {path} is missing")
    return path


def load_library() -> ctypes.CDLL:
    """Find (or build) and load libtoprovar_fae.so once per process."""
    global _lib
    with _lib_lock:
        if _lib is not None:
            return _lib
        env = os.environ.get("TOPROVAR_FAE_LIB")
        if env:
            path = Path(env)
            if not path.exists():
                raise FaeLibraryError(f"TOPROVAR_FAE_LIB={env} does not exist")
        else:
            path = DEFAULT_BUILD_DIR / LIB_NAME
            if not path.exists():
                path = build_library()
        try:
            lib = ctypes.CDLL(str(path))
        except OSError as e:
            raise FaeLibraryError(f"cannot load {path}: {e}") from e
        lib.fae_forward.argtypes = [ctypes.POINTER(_FaeParams), ctypes.c_void_p]
        lib.fae_forward.restype = ctypes.c_int
        lib.fae_workspace_size.argtypes = [ctypes.POINTER(_FaeParams)]
        lib.fae_workspace_size.restype = ctypes.c_size_t
        lib.fae_status_string.argtypes = [ctypes.c_int]
        lib.fae_status_string.restype = ctypes.c_char_p
        lib.fae_set_variant.argtypes = [ctypes.c_int]
        lib.fae_set_variant.restype = ctypes.c_int
        if hasattr(lib, "fae_hopper_available"):
            lib.fae_hopper_available.argtypes = [ctypes.c_int, ctypes.c_int]
            lib.fae_hopper_available.restype = ctypes.c_int
        _lib = lib
        return lib


def _kernel_ready(t: torch.Tensor) -> torch.Tensor:
    """Last dim contiguous, 16-byte aligned rows; copy otherwise."""
    ok = (t.stride(-1) == 1 and t.data_ptr() % 16 == 0 and all(s % 8 == 0 for s in t.stride()[:-1]))
    return t if ok else t.contiguous()


def fae_kernel(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
               key_lengths: torch.Tensor | None = None, head_mean: bool = False, *,
               out: tuple[torch.Tensor, torch.Tensor] | None = None,
               variant: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """The native FAE kernel: O (B,H,Nq,d) in q's dtype and layout and H float32 nats ((B,H,Nq) or (B,Nq)).

    bf16/fp16 CUDA tensors, d in {64, 128}, (B,H,N,d) with any strides whose last dim is contiguous.
    ``out``: optional preallocated contiguous (O, H) to write into (tests poison them first).
    ``variant`` selects a tile configuration (benchmarking; see fae_set_variant in plugins/fae/fae.h).
    """
    if not q.is_cuda:
        raise ValueError("fae_kernel: CUDA tensors only")
    if q.dtype not in (torch.bfloat16, torch.float16) or k.dtype != q.dtype or v.dtype != q.dtype:
        raise ValueError(f"fae_kernel: bf16/fp16 q, k, v of one dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    B, Hh, Nq, d = q.shape
    Nk = k.shape[2]
    if d not in (64, 128) or k.shape != (B, Hh, Nk, d) or v.shape != (B, Hh, Nk, d):
        raise ValueError(f"fae_kernel: q (B,H,Nq,d), k/v (B,H,Nk,d), d in 64/128; got {q.shape}, {k.shape}, "
                         f"{v.shape}")
    lib = load_library()
    q, k, v = _kernel_ready(q), _kernel_ready(k), _kernel_ready(v)
    h_shape = (B, Nq) if head_mean else (B, Hh, Nq)
    if out is not None:
        o, h = out
        if (o.shape != q.shape or o.dtype != q.dtype or not o.is_contiguous() or h.shape != h_shape
                or h.dtype != torch.float32 or not h.is_contiguous()):
            raise ValueError("fae_kernel: out must be contiguous (O like q, H float32 of the entropy shape)")
    else:
        o = torch.empty_like(q)  # q's layout (any O strides are fine): heads of a (B, N, H, d)-major O merge free
        h = torch.empty(h_shape, dtype=torch.float32, device=q.device)
    kl = None
    if key_lengths is not None:
        kl = key_lengths.to(device=q.device, dtype=torch.int32).contiguous()
        if kl.shape != (B,):
            raise ValueError(f"key_lengths: expected ({B},), got {tuple(kl.shape)}")
    p = _FaeParams(q=q.data_ptr(), k=k.data_ptr(), v=v.data_ptr(), o=o.data_ptr(), h=h.data_ptr(),
                   key_lengths=kl.data_ptr() if kl is not None else None,
                   batch=B, heads=Hh, nq=Nq, nk=Nk, head_dim=d, scale=float(scale), head_mean=int(head_mean),
                   dtype=0 if q.dtype == torch.bfloat16 else 1)
    for name, t in (("q", q), ("k", k), ("v", v), ("o", o)):
        sb, sh, sn, _ = t.stride()
        setattr(p, f"{name}_stride_b", sb), setattr(p, f"{name}_stride_h", sh), setattr(p, f"{name}_stride_n", sn)
    ws = None
    if head_mean:
        nbytes = lib.fae_workspace_size(ctypes.byref(p))
        ws = torch.empty(max(1, nbytes // 4), dtype=torch.float32, device=q.device)
        p.workspace, p.workspace_bytes = ws.data_ptr(), nbytes
    if variant:
        lib.fae_set_variant(int(variant))
    with torch.cuda.device(q.device):
        status = lib.fae_forward(ctypes.byref(p), ctypes.c_void_p(torch.cuda.current_stream().cuda_stream))
    if variant:
        lib.fae_set_variant(0)
    if status != 0:
        raise RuntimeError(f"fae_forward failed: {lib.fae_status_string(status).decode()}")
    if ws is not None:
        ws.record_stream(torch.cuda.current_stream())
    return o, h


def _cudnn_attention_lse(q, k, v, scale):
    """(out, lse (B,H,Nq) float32 nats) through cuDNN SDPA with logsumexp."""
    res = torch.ops.aten._scaled_dot_product_cudnn_attention(q, k, v, None, True, 0.0, False, False, scale=scale)
    out, lse = res[0], res[1]
    return out, lse.reshape(q.shape[:3]).float()


def augmented_v_entropy(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
                        key_lengths: torch.Tensor | None = None, head_mean: bool = False,
                        ) -> tuple[torch.Tensor, torch.Tensor]:
    """O (in q's layout, ``like_q``) and H from one cuDNN SDPA call with V' = [V | K] and its logsumexp
    (no additive bias).

    Key-length masks slice the keys per batch item (a prefix is valid), so no mask reaches cuDNN.
    """
    B, Hh, Nq, d = q.shape
    Nk = k.shape[2]
    if key_lengths is not None:
        lens = [min(max(int(x), 0), Nk) for x in key_lengths.tolist()]
        if len(set(lens)) > 1:
            outs = [augmented_v_entropy(q[b:b + 1], k[b:b + 1], v[b:b + 1], scale,
                                        torch.tensor([lens[b]]), False) for b in range(B)]
            o = torch.cat([x[0] for x in outs]); h = torch.cat([x[1] for x in outs])
            return o, (h.mean(dim=1) if head_mean else h)
        n = lens[0]
        if n == 0:
            o = torch.zeros(B, Hh, Nq, v.shape[-1], dtype=q.dtype, device=q.device)
            h = torch.zeros(B, Hh, Nq, dtype=torch.float32, device=q.device)
            return o, (h.mean(dim=1) if head_mean else h)
        k, v, Nk = k[:, :, :n], v[:, :, :n], n
    dv = v.shape[-1]
    vk = torch.cat([v, k], dim=-1)
    out, lse = _cudnn_attention_lse(q, k, vk, scale)
    o = out[..., :dv]
    ak = out[..., dv:].float()
    h = lse - scale * (q.float() * ak).sum(-1)
    h = h.clamp(min=0.0, max=math.log(max(1, Nk)))
    return like_q(o, q), (h.mean(dim=1) if head_mean else h)


def hopper_kernel_available(q: torch.Tensor) -> bool:
    """True when the native library runs its Hopper kernel for q's device, head dim and dtype."""
    if not q.is_cuda or q.shape[-1] != 128 or q.dtype not in (torch.bfloat16, torch.float16):
        return False
    key = (q.device.index if q.device.index is not None else torch.cuda.current_device(), q.dtype)
    if key not in _hopper_cache:
        ok = False
        if torch.cuda.get_device_capability(q.device) == (9, 0):
            try:
                lib = load_library()
                with torch.cuda.device(q.device):
                    ok = hasattr(lib, "fae_hopper_available") and bool(
                        lib.fae_hopper_available(128, 0 if q.dtype == torch.bfloat16 else 1))
            except FaeLibraryError:
                ok = False
        _hopper_cache[key] = ok
    return _hopper_cache[key]


def cuda_attention_with_entropy(q, k, v, scale, key_lengths, head_mean):
    """The CUDA implementation of ``toprovar::attention_with_entropy`` (see the module docstring)."""
    fast = q.dtype in (torch.bfloat16, torch.float16) and k.dtype == q.dtype and v.dtype == q.dtype
    if not fast or _backend == "reference":
        o, h = attention_entropy_reference(q, k, v, scale, key_lengths)
        return like_q(o, q), (h.mean(dim=1) if head_mean else h)
    same_d = v.shape[-1] == q.shape[-1]
    if _backend == "kernel" and q.shape[-1] in (64, 128) and same_d:
        return fae_kernel(q, k, v, scale, key_lengths, head_mean)
    if _backend == "auto" and same_d and hopper_kernel_available(q):
        return fae_kernel(q, k, v, scale, key_lengths, head_mean)
    return augmented_v_entropy(q, k, v, scale, key_lengths, head_mean)


def register(op) -> None:
    """Register the CUDA implementation on the custom op (called from toprovar.ops)."""
    op.register_kernel("cuda")(cuda_attention_with_entropy)


__all__ = ["fae_kernel", "augmented_v_entropy", "set_backend", "get_backend", "load_library", "build_library",
           "FaeLibraryError", "cuda_attention_with_entropy", "hopper_kernel_available"]
