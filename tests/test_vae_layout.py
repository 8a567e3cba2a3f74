"""Subpixel upsample convs (``BSQDecoder.set_layout``) against the plain "nearest x2 + 3x3 conv" path, in float64,
and the VAE dtype option (``--vae-dtype`` -> ``load_parts``)."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from toprovar.cli_args import OneLineParser, add_model_args, vae_dtype
from toprovar.model.loading import load_parts
from toprovar.model.vae import VAEConfig, build_decoder, subpixel_weight

TOL = 1e-10  # float64: the two paths differ only by summation order


def test_subpixel_conv_equals_upsample_then_conv():
    g = torch.Generator().manual_seed(torch.seed() % 2**63)
    for cin, cout, h, w in ((3, 5, 4, 6), (8, 8, 1, 1), (16, 4, 7, 3)):
        x = torch.randn(2, cin, h, w, generator=g, dtype=torch.float64)
        wt = torch.randn(cout, cin, 3, 3, generator=g, dtype=torch.float64)
        b = torch.randn(cout, generator=g, dtype=torch.float64)
        ref = F.conv2d(F.interpolate(x, scale_factor=2, mode="nearest"), wt, b, padding=1)
        w4, b4 = subpixel_weight(wt, b)
        assert w4.shape == (4 * cout, cin, 3, 3)
        out = F.pixel_shuffle(F.conv2d(x, w4, b4, padding=1), 2)
        assert (out - ref).abs().max().item() < TOL


@pytest.mark.parametrize("name", ["tiny", "shapes", "mini-2b"])
def test_subpixel_decoder_equals_plain(name):
    """Whole decoders (tiny, shapes, and the 2B structure at 1/8 width: 5 levels, 4 upsamples), fresh random
    weights and latents; state dict unchanged by the layout."""
    cfg = (VAEConfig("mini-2b", codebook_dim=32, patch_size=16, ch=32, ch_mult=(1, 2, 4, 4, 4), num_res_blocks=2)
           .validate() if name == "mini-2b" else name)
    dec = build_decoder(cfg, seed=None).double().eval()
    z = torch.randn(2, dec.cfg.codebook_dim, 5, 4, dtype=torch.float64)
    keys = set(dec.state_dict())
    with torch.no_grad():
        ref = dec.set_layout(subpixel=False)(z)
        out = dec.set_layout(subpixel=True)(z)
        cl = dec.set_layout(subpixel=True, channels_last=True)(z.contiguous(memory_format=torch.channels_last))
    assert set(dec.state_dict()) == keys
    assert ref.shape == (2, 3, 5 * dec.cfg.stride, 4 * dec.cfg.stride)
    assert (out - ref).abs().max().item() < TOL
    assert (cl - ref).abs().max().item() < TOL


def test_vae_dtype_option_reaches_the_decoder():
    p = OneLineParser()
    add_model_args(p)
    assert vae_dtype(p.parse_args([]).vae_dtype) is None
    assert vae_dtype(p.parse_args(["--vae-dtype", "bfloat16"]).vae_dtype) is torch.bfloat16
    with pytest.raises(SystemExit):
        p.parse_args(["--vae-dtype", "int8"])
    auto = load_parts("tiny", dtype=torch.bfloat16, text_encoder=False)  # auto on the CPU: float32
    assert next(auto.decoder.parameters()).dtype == torch.float32
    bf = load_parts("tiny", text_encoder=False, vae_dtype=torch.bfloat16)
    assert {t.dtype for t in bf.decoder.state_dict().values()} == {torch.bfloat16}
    z = torch.randn(1, 16, 4, 4)
    with torch.no_grad():
        err = (bf.decoder(z.bfloat16()).double() - auto.decoder.double()(z.double())).abs().max().item()
    assert err < 0.05  # bf16 decode of the same weights, images in [-1, 1]


def test_benchmark_variants_decode_the_same_image():
    """Every eager variant of bench/vae_decode.py on the tiny decoder against its float64 plain decode."""
    import copy

    from toprovar.benchmark.vae_variants import prepare, variants
    base = build_decoder("tiny", seed=None).eval()
    z = torch.randn(1, 16, 4, 4) * 0.5
    with torch.no_grad():
        ref = copy.deepcopy(base).double().set_layout(subpixel=False)(z.double())
        tol = {"float32": 1e-4, "float16": 2e-2, "bfloat16": 1e-1}  # images in [-1, 1]
        for v in (v for v in variants() if not v.compiled):
            fn, conv = prepare(copy.deepcopy(base), v, torch.device("cpu"))
            out = fn(conv(z))
            assert out.dtype == getattr(torch, v.dtype)
            assert (out.double() - ref).abs().max().item() < tol[v.dtype], v.label


def test_variant_selection_by_label():
    """bench/vae_decode.py --variants: the named variants in the given order after the float32 reference; an
    unknown label names the flag and the choices."""
    from toprovar.benchmark.vae_variants import REFERENCE, Variant, pick, variants
    assert pick(None) == variants() and len(variants()) == 24
    got = pick("bfloat16 subpixel channels-last compiled, bfloat16 subpixel compiled,float32 plain")
    assert got == [REFERENCE, Variant("bfloat16", True, True, True), Variant("bfloat16", True, False, True)]
    with pytest.raises(ValueError, match=r"^--variants: 'bf16 fast' is not a variant; choose from float32 plain, "):
        pick("bf16 fast")
