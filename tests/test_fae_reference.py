"""The FAE op's CPU path (chunked float32 reference) against the materialised float64 oracle."""
from __future__ import annotations

import math

import pytest
import torch

import toprovar.ops as ops
from toprovar.ops.reference import attention_entropy_float64, attention_entropy_reference

TOL = 1e-6


def _fresh(*shape, dtype=torch.float64):
    g = torch.Generator().manual_seed(torch.seed() % (2**31))
    return torch.randn(*shape, generator=g, dtype=dtype)


def _check(q, k, v, scale, key_lengths=None, head_mean=False, max_chunk_elems=None, tol=TOL):
    if max_chunk_elems is None:
        o, h = ops.attention_with_entropy(q, k, v, scale, key_lengths, head_mean)
    else:
        o, h = attention_entropy_reference(q, k, v, scale, key_lengths, max_chunk_elems=max_chunk_elems)
        h = h.mean(dim=1) if head_mean else h
    ro, rh = attention_entropy_float64(q, k, v, scale, key_lengths)
    rh = rh.mean(dim=1) if head_mean else rh
    assert torch.isfinite(o).all() and torch.isfinite(h).all()
    assert (h.double() - rh).abs().max().item() <= tol
    assert (o.double() - ro).abs().max().item() <= tol
    return o, h


@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize("nq,nk", [(1, 1), (5, 17), (64, 300), (37, 9)])
def test_random_float32(nq, nk, d):
    B, H = 2, 3
    q, k, v = (_fresh(B, H, n, d).float() for n in (nq, nk, nk))
    _check(q, k, v, 1 / math.sqrt(d))


def test_chunking_does_not_change_result():
    q, k, v = _fresh(2, 2, 50, 32).float(), _fresh(2, 2, 70, 32).float(), _fresh(2, 2, 70, 32).float()
    _check(q, k, v, 0.2, max_chunk_elems=2 * 2 * 70 * 3)  # 3 query rows per chunk


def test_masked_keys_fully_masked_rows_single_key():
    B, H, Nq, Nk, d = 4, 2, 12, 40, 16
    q, k, v = (_fresh(B, H, n, d).float() for n in (Nq, Nk, Nk))
    kl = torch.tensor([0, 1, 23, 40], dtype=torch.int32)
    o, h = _check(q, k, v, 0.3, kl)
    assert (o[0] == 0).all() and (h[0] == 0).all(), "fully masked row: O = 0, H = 0"
    assert (h[1] == 0).all(), "single valid key: H = 0"
    assert torch.allclose(o[1], v[1, :, :1].expand(H, Nq, d))


def test_single_key():
    q, k, v = _fresh(1, 4, 8, 32).float(), _fresh(1, 4, 1, 32).float(), _fresh(1, 4, 1, 32).float()
    o, h = _check(q, k, v, 0.5)
    assert (h == 0).all()


@pytest.mark.parametrize("scale", [10.0, 40.0, 100.0])
def test_large_scores_cosine_attention(scale):
    """Infinity's cosine attention: unit q, k and a learned scale up to ~100 (scores up to 100).

    The 1e-6 bound of the other tests is for scores of O(1); here float32 rounding of the scores
    themselves (|s| ~ scale, one ulp ~ scale * 6e-8) sets the floor of any float32 computation, so the
    bound is 1e-6 * scale / 4. Worst of 20 seeds (H, O): scale 10: 8.6e-7, 1.4e-6; 40: 3.2e-6, 6.7e-6;
    100: 6.1e-6, 1.6e-5.
    """
    B, H, Nq, Nk, d = 2, 2, 32, 200, 64
    q = torch.nn.functional.normalize(_fresh(B, H, Nq, d), dim=-1).float()
    k = torch.nn.functional.normalize(_fresh(B, H, Nk, d), dim=-1).float()
    v = _fresh(B, H, Nk, d).float()
    _check(q, k, v, scale, tol=TOL * max(1.0, scale / 4))


def test_head_mean():
    B, H, Nq, Nk, d = 2, 5, 10, 33, 32
    q, k, v = (_fresh(B, H, n, d).float() for n in (Nq, Nk, Nk))
    kl = torch.tensor([33, 7], dtype=torch.int32)
    o, h = _check(q, k, v, 0.25, kl, head_mean=True)
    assert h.shape == (B, Nq)


def test_entropy_bounds():
    q, k, v = (_fresh(1, 2, n, 16).float() for n in (20, 50, 50))
    _, h = ops.attention_with_entropy(q, k, v, 0.0)  # uniform attention: H = ln N
    assert torch.allclose(h, torch.full_like(h, math.log(50)), atol=1e-6)


def test_fake_tensor_shapes():
    from torch._subclasses.fake_tensor import FakeTensorMode
    with FakeTensorMode():
        q, k, v = torch.empty(2, 3, 7, 64), torch.empty(2, 3, 9, 64), torch.empty(2, 3, 9, 64)
        o, h = torch.ops.toprovar.attention_with_entropy(q, k, v, 0.1, None, True)
        assert o.shape == (2, 3, 7, 64) and h.shape == (2, 7) and h.dtype == torch.float32


def test_cuda_registration_importable_without_gpu():
    """The CUDA implementation module imports on CPU-only installs and documents its routing."""
    from toprovar.ops import fae
    assert fae.get_backend() in fae.BACKENDS
    assert "augmented" in (fae.__doc__ or "")
