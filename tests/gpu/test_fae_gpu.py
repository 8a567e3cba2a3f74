"""FAE on a CUDA GPU: the native kernel and the op's CUDA path against SDPA and float64.

Skipped without CUDA. Every Infinity-2B scale shape (B=2 with CFG, H=16, d=128, Nq = h*w, Nk =
cumulative tokens incl. the current scale), fresh random inputs per check, kernel outputs poisoned
with NaN before each run. Set FAE_TEST_REPORT=path.json to write the measured errors.
"""
from __future__ import annotations

import json
import math
import os

import pytest
import torch
import torch.nn.functional as F

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

SIDES_2B = [1, 2, 4, 6, 8, 12, 16, 20, 24, 32, 40, 48, 64]
SHAPES_2B = [(s * s, sum(t * t for t in SIDES_2B[:i + 1])) for i, s in enumerate(SIDES_2B)]
REPORT: dict[str, dict] = {}


def _record(key: str, **vals) -> None:
    REPORT[key] = {k: (float(v) if isinstance(v, (float, int, torch.Tensor)) else v) for k, v in vals.items()}
    path = os.environ.get("FAE_TEST_REPORT")
    if path:
        with open(path, "w") as f:
            json.dump(REPORT, f, indent=1)


def entropy_f64(q, k, scale, key_lengths=None, chunk=256):
    """Materialised float64 entropy, computed in query chunks on the GPU: (B, H, Nq) float64."""
    B, Hh, Nq, _ = q.shape
    Nk = k.shape[2]
    kd = k.double()
    out = torch.empty(B, Hh, Nq, dtype=torch.float64, device=q.device)
    mask = None
    if key_lengths is not None:
        mask = (torch.arange(Nk, device=q.device)[None] < key_lengths.to(q.device)[:, None]).view(B, 1, 1, Nk)
    for r in range(0, Nq, chunk):
        s = torch.matmul(q[:, :, r:r + chunk].double(), kd.transpose(-1, -2)) * scale
        if mask is not None:
            s = s.masked_fill(~mask, float("-inf"))
        a = torch.softmax(s, dim=-1).nan_to_num(0.0)
        la = torch.where(a > 0, torch.log(a), torch.zeros_like(a))
        out[:, :, r:r + chunk] = -(a * la).sum(-1)
    return out


def sdpa_f32(q, k, v, scale, key_lengths=None):
    mask = None
    if key_lengths is not None:
        Nk = k.shape[2]
        mask = (torch.arange(Nk, device=q.device)[None] < key_lengths.to(q.device)[:, None]).view(-1, 1, 1, Nk)
    o = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=mask, scale=scale)
    if key_lengths is not None:  # rows with no valid key: FAE defines O = 0
        o = torch.where((key_lengths.to(q.device) > 0).view(-1, 1, 1, 1), o.nan_to_num(0.0), torch.zeros_like(o))
    return o


def rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-30)).item()


def inputs(B, Hh, Nq, Nk, d, dtype, cosine=False, seed=None):
    g = torch.Generator(device="cuda")
    g.manual_seed(seed if seed is not None else int.from_bytes(os.urandom(4), "little"))
    q = torch.randn(B, Hh, Nq, d, device="cuda", generator=g)
    k = torch.randn(B, Hh, Nk, d, device="cuda", generator=g)
    v = torch.randn(B, Hh, Nk, d, device="cuda", generator=g)
    if cosine:  # Infinity's cosine attention: unit q, k and a learned scale up to ~100
        q, k = F.normalize(q, dim=-1), F.normalize(k, dim=-1)
    return q.to(dtype), k.to(dtype), v.to(dtype)


def run_kernel(q, k, v, scale, key_lengths=None, head_mean=False, variant=0):
    from toprovar.ops.fae import fae_kernel
    B, Hh, Nq, d = q.shape
    o = torch.full(q.shape, float("nan"), dtype=q.dtype, device="cuda")
    h = torch.full((B, Nq) if head_mean else (B, Hh, Nq), float("nan"), device="cuda")
    o2, h2 = fae_kernel(q, k, v, scale, key_lengths, head_mean, out=(o, h), variant=variant)
    torch.cuda.synchronize()
    assert o2.data_ptr() == o.data_ptr() and h2.data_ptr() == h.data_ptr()
    assert torch.isfinite(o).all() and torch.isfinite(h).all(), "unwritten or NaN output"
    return o, h


@pytest.mark.parametrize("nq,nk", SHAPES_2B, ids=[f"{s}x{s}" for s in SIDES_2B])
def test_kernel_2b_shapes_bf16(nq, nk):
    q, k, v = inputs(2, 16, nq, nk, 128, torch.bfloat16)
    scale = 1 / math.sqrt(128)
    o, h = run_kernel(q, k, v, scale)
    o_err = rel(o, sdpa_f32(q, k, v, scale))
    h_err = (h.double() - entropy_f64(q, k, scale)).abs().max().item()
    _record(f"kernel_bf16_{nq}x{nk}", o_rel=o_err, h_maxabs=h_err)
    assert o_err <= 1e-2 and h_err <= 1e-2, (o_err, h_err)


@pytest.mark.parametrize("nq,nk", SHAPES_2B, ids=[f"{s}x{s}" for s in SIDES_2B])
def test_op_2b_shapes_bf16(nq, nk):
    """The op's CUDA path (whatever it routes to) at the same shapes."""
    import toprovar.ops as ops
    q, k, v = inputs(2, 16, nq, nk, 128, torch.bfloat16)
    scale = 1 / math.sqrt(128)
    o, h = ops.attention_with_entropy(q, k, v, scale)
    o_err = rel(o, sdpa_f32(q, k, v, scale))
    h_err = (h.double() - entropy_f64(q, k, scale)).abs().max().item()
    _record(f"op_bf16_{nq}x{nk}", o_rel=o_err, h_maxabs=h_err)
    assert o_err <= 1e-2 and h_err <= 1e-2, (o_err, h_err)


@pytest.mark.parametrize("nq,nk", SHAPES_2B, ids=[f"{s}x{s}" for s in SIDES_2B])
def test_op_2b_shapes_fp32(nq, nk):
    """float32 inputs: the op routes them to the chunked float32 reference (the kernel takes bf16/fp16)."""
    import toprovar.ops as ops
    q, k, v = inputs(2, 16, nq, nk, 128, torch.float32)
    scale = 1 / math.sqrt(128)
    o, h = ops.attention_with_entropy(q, k, v, scale)
    h_err = (h.double() - entropy_f64(q, k, scale)).abs().max().item()
    o_err = rel(o, sdpa_f32(q, k, v, scale))
    _record(f"op_fp32_{nq}x{nk}", o_rel=o_err, h_maxabs=h_err)
    assert h_err <= 1e-4 and o_err <= 1e-4, (o_err, h_err)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize("head_mean", [False, True])
def test_kernel_masks_dtypes_headdims(dtype, d, head_mean):
    B, Hh, Nq, Nk = 5, 3, 200, 333
    q, k, v = inputs(B, Hh, Nq, Nk, d, dtype)
    kl = torch.tensor([0, 1, 64, 200, 333], dtype=torch.int32, device="cuda")  # none, single, tile edge, ...
    scale = 1 / math.sqrt(d)
    o, h = run_kernel(q, k, v, scale, kl, head_mean)
    ref_h = entropy_f64(q, k, scale, kl)
    if head_mean:
        ref_h = ref_h.mean(dim=1)
    o_err = rel(o, sdpa_f32(q, k, v, scale, kl))
    h_err = (h.double() - ref_h).abs().max().item()
    _record(f"kernel_mask_{dtype}_{d}_{head_mean}", o_rel=o_err, h_maxabs=h_err)
    assert o_err <= 1e-2 and h_err <= 1e-2, (o_err, h_err)
    assert (o[0] == 0).all() and (h[0] == 0).all(), "fully masked row: O = 0, H = 0"
    assert (h[1] == 0).all(), "a single key: H = 0"


@pytest.mark.parametrize("scale", [10.0, 40.0, 100.0])
def test_kernel_cosine_large_scores(scale):
    q, k, v = inputs(2, 16, 256, 1700, 128, torch.bfloat16, cosine=True)
    o, h = run_kernel(q, k, v, scale)
    o_err = rel(o, sdpa_f32(q, k, v, scale))
    h_err = (h.double() - entropy_f64(q, k, scale)).abs().max().item()
    _record(f"kernel_cosine_{scale}", o_rel=o_err, h_maxabs=h_err)
    assert o_err <= 1e-2 and h_err <= 1e-2, (o_err, h_err)


def test_kernel_strided_views():
    """(B, N, H, d) storage viewed as (B, H, N, d): strided rows, contiguous last dim."""
    B, Hh, Nq, Nk, d = 2, 4, 100, 150, 128
    qs = torch.randn(B, Nq, Hh, d, device="cuda", dtype=torch.bfloat16)
    ks = torch.randn(B, Nk, Hh, d, device="cuda", dtype=torch.bfloat16)
    vs = torch.randn(B, Nk, Hh, d, device="cuda", dtype=torch.bfloat16)
    q, k, v = qs.transpose(1, 2), ks.transpose(1, 2), vs.transpose(1, 2)
    o, h = run_kernel(q, k, v, 0.1)
    assert rel(o, sdpa_f32(q, k, v, 0.1)) <= 1e-2
    assert (h.double() - entropy_f64(q, k, 0.1)).abs().max().item() <= 1e-2


def test_kernel_deterministic():
    q, k, v = inputs(2, 16, 1024, 3000, 128, torch.bfloat16)
    a = run_kernel(q, k, v, 0.09)
    b = run_kernel(q, k, v, 0.09)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


@pytest.mark.parametrize("head_mean", [False, True])
def test_op_masks(head_mean):
    """The op's CUDA path with key lengths (incl. 0 and 1) and head_mean."""
    import toprovar.ops as ops
    B, Hh, Nq, Nk, d = 4, 3, 150, 300, 128
    q, k, v = inputs(B, Hh, Nq, Nk, d, torch.bfloat16)
    kl = torch.tensor([0, 1, 77, 300], dtype=torch.int32, device="cuda")
    o, h = ops.attention_with_entropy(q, k, v, 0.1, kl, head_mean)
    ref_h = entropy_f64(q, k, 0.1, kl)
    if head_mean:
        ref_h = ref_h.mean(dim=1)
    o_err = rel(o, sdpa_f32(q, k, v, 0.1, kl))
    h_err = (h.double() - ref_h).abs().max().item()
    _record(f"op_mask_{head_mean}", o_rel=o_err, h_maxabs=h_err)
    assert o_err <= 1e-2 and h_err <= 1e-2, (o_err, h_err)
    assert (o[0] == 0).all() and (h[0] == 0).all() and (h[1] == 0).all()


@pytest.mark.parametrize("variant", [1, 2, 3, 4, 7])
@pytest.mark.parametrize("nq,nk,kl", [(4096, 10521, None), (200, 333, (0, 1, 64, 200, 333))])
def test_kernel_tile_variants(variant, nq, nk, kl):
    """The benchmarked mma.sync tile variants (bf16, d=128; 7: the sm_80 default tiles) compute the same
    function."""
    B = 2 if kl is None else len(kl)
    q, k, v = inputs(B, 16, nq, nk, 128, torch.bfloat16)
    klt = None if kl is None else torch.tensor(kl, dtype=torch.int32, device="cuda")
    o, h = run_kernel(q, k, v, 0.0884, klt, variant=variant)
    o_err = rel(o, sdpa_f32(q, k, v, 0.0884, klt))
    h_err = (h.double() - entropy_f64(q, k, 0.0884, klt)).abs().max().item()
    _record(f"kernel_variant{variant}_{nq}x{nk}", o_rel=o_err, h_maxabs=h_err)
    assert o_err <= 1e-2 and h_err <= 1e-2, (o_err, h_err)


def _is_hopper():
    return torch.cuda.get_device_capability() == (9, 0)


@pytest.mark.skipif(not torch.cuda.is_available() or not _is_hopper(), reason="needs a compute 9.0 GPU")
@pytest.mark.parametrize("variant", [5, 6, 8])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("nq,nk,kl", [(4096, 10521, None), (200, 333, (0, 1, 64, 200, 333)),
                                      (300, 1000, (128, 129, 255, 1000))])
def test_kernel_hopper(variant, dtype, nq, nk, kl):
    """The sm_90a kernel (TMA + wgmma; 5: 2 stages, 6: 3 stages, 8: 3 stages + ping-pong) explicitly, incl.
    key-length masks at 128-key tile edges with NaN in the padded K/V rows, fp16, and that the default
    route (variant 0) on this GPU gives the same bits (the mma.sync kernel sums in another order)."""
    B = 2 if kl is None else len(kl)
    q, k, v = inputs(B, 16, nq, nk, 128, dtype)
    klt = None if kl is None else torch.tensor(kl, dtype=torch.int32, device="cuda")
    kp, vp = k, v
    if kl is not None:  # padding past each key length holds NaN: it must not reach O or H
        pad = (torch.arange(nk, device="cuda")[None] >= klt[:, None]).view(B, 1, nk, 1)
        kp, vp = k.masked_fill(pad, float("nan")), v.masked_fill(pad, float("nan"))
    o, h = run_kernel(q, kp, vp, 0.0884, klt, variant=variant)
    o_err = rel(o, sdpa_f32(q, k, v, 0.0884, klt))
    h_err = (h.double() - entropy_f64(q, k, 0.0884, klt)).abs().max().item()
    _record(f"kernel_hopper{variant}_{dtype}_{nq}x{nk}_{kl is not None}", o_rel=o_err, h_maxabs=h_err)
    assert o_err <= 1e-2 and h_err <= 1e-2, (o_err, h_err)
    if kl is not None and kl[0] == 0:
        assert (o[0] == 0).all() and (h[0] == 0).all() and (h[1] == 0).all()
    o0, h0 = run_kernel(q, kp, vp, 0.0884, klt, variant=0)
    assert torch.equal(o0, o) and torch.equal(h0, h), "variant 0 on compute 9.0 should be the Hopper kernel"


@pytest.mark.skipif(not torch.cuda.is_available() or not _is_hopper(), reason="needs a compute 9.0 GPU")
@pytest.mark.parametrize("scale", [10.0, 100.0])
def test_kernel_hopper_cosine_head_mean(scale):
    """Cosine attention (large scores) with the head mean, through the Hopper kernel."""
    q, k, v = inputs(2, 16, 256, 1700, 128, torch.bfloat16, cosine=True)
    o, h = run_kernel(q, k, v, scale, head_mean=True, variant=8)
    o_err = rel(o, sdpa_f32(q, k, v, scale))
    h_err = (h.double() - entropy_f64(q, k, scale).mean(dim=1)).abs().max().item()
    _record(f"kernel_hopper_cosine_mean_{scale}", o_rel=o_err, h_maxabs=h_err)
    assert o_err <= 1e-2 and h_err <= 1e-2, (o_err, h_err)
