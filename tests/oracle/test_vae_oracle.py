"""Oracle: our BSQ VAE decoder and quantizer pieces against the OFFICIAL FoundationVision/Infinity code.

How to run
----------
1. Get the official code outside this repository, e.g.
       git clone https://github.com/FoundationVision/Infinity /tmp/infinity
   or, from a local bare mirror (only the Python sources are needed):
       mkdir -p /tmp/infinity && git -C <mirror> archive HEAD infinity tools | tar -x -C /tmp/infinity
   (``git -C <mirror> worktree add /tmp/infinity HEAD`` works too when the mirror has every blob).
2. ``pip install einops`` (pure Python; the official VAE code uses it), then
       TOPROVAR_INFINITY_REPO=/tmp/infinity python -m pytest -q -s tests/oracle/test_vae_oracle.py
   ``-s`` prints the measured differences. Without the variable (or without ``einops``) every test here is
   skipped.

Only ``infinity/models/bsq_vae/*.py`` is imported, by file path: the package ``infinity.models`` is
registered as an empty namespace so its ``__init__`` (timm, flash-attn, the transformer) never runs. The
module-level ``import imageio`` / ``import torchvision`` of ``flux_vqgan.py`` (unused by the decoder and the
quantizer) get empty stand-in modules when those packages are missing; everything is removed from
``sys.modules`` afterwards.

What is compared (float32, CPU)
-------------------------------
* The official ``Decoder`` built at our ``tiny`` config (random weights, also random GroupNorm affines) ->
  its state dict loaded strictly into ``BSQDecoder`` -> decoder outputs on the same latent: max abs diff
  <= 1e-5 before the clamp, and after it (``AutoEncoder.decode`` clamps to [-1, 1]).
* The full official ``AutoEncoder`` of ``vae_model`` at the real Infinity-2B (d=32, stride 16) and Infinity-8B
  (d=14, stride 8, spatial patchify) architectures with random weights, saved in the official file format
  ``{"vae": state_dict}`` -> ``load_vae_decoder`` (encoder and quantizer buffer dropped, decoder strict) ->
  same decoded image; also from the flat key layout that the official ``load_cnn`` accepts, and the reverse
  direction (our decoder-only file loaded by the official ``load_cnn``).
* The multiscale quantizer pieces (bits -> codes, trilinear accumulation, next-scale input, spatial
  (un)patchify) against the official ``BSQ.indices_to_codes(label_type='bit_label')`` and the official
  generation loop's arithmetic (``autoregressive_infer_cfg``), bit for bit.
"""
from __future__ import annotations

import copy
import importlib
import math
import os
import sys
import types
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from toprovar.model.checkpoint import save_state_dict
from toprovar.model.quant import (accumulate_codes, bits_to_codes, next_scale_input, patchify, unpatchify_bits,
                                  upsample_codes)
from toprovar.model.vae import BSQDecoder, VAE_CONFIGS, decoder_param_count, load_vae_decoder

REPO = os.environ.get("TOPROVAR_INFINITY_REPO", "")
BSQ_DIR = Path(REPO) / "infinity" / "models" / "bsq_vae" if REPO else None

pytestmark = [
    pytest.mark.skipif(not REPO, reason="TOPROVAR_INFINITY_REPO is not set (see the module docstring)"),
    pytest.mark.skipif(bool(REPO) and not (BSQ_DIR / "flux_vqgan.py").is_file(),
                       reason=f"no infinity/models/bsq_vae/flux_vqgan.py under TOPROVAR_INFINITY_REPO={REPO}"),
]


@pytest.fixture(scope="module")
def official():
    """The official bsq_vae modules (flux_vqgan, multiscale_bsq, vae), imported without infinity/models/__init__."""
    pytest.importorskip("einops", reason="the official VAE code needs einops (pip install einops)")
    added = []

    def put(name, mod):
        if name not in sys.modules:
            sys.modules[name] = mod
            added.append(name)

    def namespace(name, path):
        m = types.ModuleType(name)
        m.__path__ = [str(path)]
        return m

    for name in ("imageio", "torchvision"):
        try:
            importlib.import_module(name)
        except ImportError:
            put(name, types.ModuleType(name))
    if "transforms" not in vars(sys.modules["torchvision"]):
        tv_tf = types.ModuleType("torchvision.transforms")
        put("torchvision.transforms", tv_tf)
        sys.modules["torchvision"].transforms = sys.modules["torchvision.transforms"]
    before = set(sys.modules)
    put("infinity", namespace("infinity", Path(REPO) / "infinity"))
    put("infinity.models", namespace("infinity.models", Path(REPO) / "infinity" / "models"))
    try:
        mods = types.SimpleNamespace(
            flux=importlib.import_module("infinity.models.bsq_vae.flux_vqgan"),
            bsq=importlib.import_module("infinity.models.bsq_vae.multiscale_bsq"),
            vae=importlib.import_module("infinity.models.bsq_vae.vae"),
        )
        assert Path(mods.flux.__file__).resolve().is_relative_to(Path(REPO).resolve())
        yield mods
    finally:
        for name in set(sys.modules) - before:
            if name.startswith("infinity"):
                sys.modules.pop(name, None)
        for name in added:
            sys.modules.pop(name, None)


CNN_PARAM = dict(cnn_type="2d", conv_in_out_2d="no", res_conv_2d="no", cnn_attention="no",
                 cnn_norm_axis="spatial", conv_inner_2d="no")


def _randomise(module: torch.nn.Module, seed: int) -> None:
    """Random values for every parameter (GroupNorm affines included), scaled like the default init."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            fan_in = p[0].numel() if p.ndim > 1 else 1
            std = 1.0 / math.sqrt(fan_in) if p.ndim > 1 else 0.3
            base = 1.0 if name.endswith("norm.weight") else 0.0
            p.copy_(base + std * torch.randn(p.shape, generator=g))


def _official_vae(official, name: str):
    """The official AutoEncoder (vae_model, as load_visual_tokenizer builds it) for a real preset."""
    cfg = VAE_CONFIGS[name]
    torch.manual_seed(0)
    vae = official.vae.vae_model(None, "dynamic", cfg.codebook_dim, 2 ** cfg.codebook_dim, test_mode=True,
                                 patch_size=cfg.patch_size, encoder_ch_mult=list(cfg.ch_mult),
                                 decoder_ch_mult=list(cfg.ch_mult))
    _randomise(vae.decoder, seed=1)
    return vae


def _max_diff(a, b) -> float:
    return (a.double() - b.double()).abs().max().item()


def test_tiny_decoder_matches_official(official):
    cfg = VAE_CONFIGS["tiny"]
    ref = official.flux.Decoder(ch=cfg.ch, ch_mult=list(cfg.ch_mult), num_res_blocks=cfg.num_res_blocks,
                                z_channels=cfg.codebook_dim, patch_size=cfg.patch_size, cnn_param=dict(CNN_PARAM))
    _randomise(ref, seed=3)
    ref.eval()
    ours = load_vae_decoder({f"decoder.{k}": v for k, v in ref.state_dict().items()}, "tiny")
    assert {f"decoder.{k}" for k in ref.state_dict()} == set(ours.state_dict())
    z = torch.randn(2, cfg.codebook_dim, 12, 16, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        raw_ref, raw = ref(z), ours.decoder(z)
        img_ref, img = raw_ref.clamp(-1, 1), ours(z)
    assert raw.shape == (2, 3, 48, 64)
    d_raw, d_img = _max_diff(raw, raw_ref), _max_diff(img, img_ref)
    print(f"\ntiny decoder: max |diff| raw {d_raw:.3g}, clamped {d_img:.3g}, raw range "
          f"[{raw_ref.min().item():.2f}, {raw_ref.max().item():.2f}]")
    assert d_raw <= 1e-5 and d_img <= 1e-5


@pytest.mark.parametrize("name,side", [("infinity-2b", 3), ("infinity-8b", 4)])
def test_real_architectures_from_official_file(official, name, side, tmp_path):
    cfg = VAE_CONFIGS[name]
    vae = _official_vae(official, name)
    full = vae.state_dict()
    dec_keys = {k for k in full if k.startswith("decoder.")}
    # besides encoder/decoder: the quantizer's one buffer, under the module's two names (quantizer, quantize)
    others = {k for k in full if not k.startswith(("encoder.", "decoder."))}
    assert others == {"quantizer.lfq.mask", "quantize.lfq.mask"}
    assert sum(p.numel() for p in vae.decoder.parameters()) == decoder_param_count(name)
    path = tmp_path / "vae.pth"
    torch.save({"vae": full}, path)   # the official file layout: vae_model reads state_dict["vae"]
    ours = load_vae_decoder(path, name)
    assert set(ours.state_dict()) == dec_keys

    z = torch.randn(1, cfg.codebook_dim, side, side, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        img_ref = vae.decode(z)                  # official: decoder + clamp
        raw_ref = vae.decoder(z)
        raw, img = ours.decoder(z), ours(z)
    assert img.shape == (1, 3, side * cfg.stride, side * cfg.stride)
    d_raw, d_img = _max_diff(raw, raw_ref), _max_diff(img, img_ref)
    print(f"\n{name}: decoder {sum(p.numel() for p in ours.parameters())} params; max |diff| raw {d_raw:.3g}, "
          f"clamped {d_img:.3g}")
    assert d_raw <= 1e-5 and d_img <= 1e-5

    # The flat layout (no .conv/.norm wrappers) that the official load_cnn also accepts.
    flat = {}
    for k, v in full.items():
        flat[k.replace(".conv.weight", ".weight").replace(".conv.bias", ".bias")
             .replace(".norm.weight", ".weight").replace(".norm.bias", ".bias")] = v
    assert "decoder.conv_in.weight" in flat and "decoder.up.1.upsample.conv.weight" in flat
    ours_flat = load_vae_decoder(flat, name)
    for k, v in ours.state_dict().items():
        assert torch.equal(v, ours_flat.state_dict()[k]), k

    # Reverse: our decoder-only file, loaded by the official load_cnn into a fresh official VAE.
    saved = save_state_dict(ours, tmp_path / "ours.pth")
    fresh = official.vae.vae_model(None, "dynamic", cfg.codebook_dim, 2 ** cfg.codebook_dim, test_mode=True,
                                   patch_size=cfg.patch_size, encoder_ch_mult=list(cfg.ch_mult),
                                   decoder_ch_mult=list(cfg.ch_mult))
    _, left, loaded = official.vae.load_cnn(fresh, dict(torch.load(saved, weights_only=True)), prefix="")
    assert not left and set(loaded) == dec_keys
    with torch.no_grad():
        assert torch.equal(fresh.decode(z), img_ref)


def _official_codes(official, bits: torch.Tensor) -> torch.Tensor:
    """The official indices_to_codes(bit_label) on (B, h, w, d) int64 bits -> (B, d, 1, h, w)."""
    d = bits.shape[-1]
    q = official.bsq.MultiScaleBSQ(dim=d, codebook_size=2 ** d, new_quant=True, schedule_mode="dynamic")
    return q.lfq.indices_to_codes(bits.unsqueeze(1), label_type="bit_label"), q.z_interplote_up


@pytest.mark.parametrize("d,h,w", [(32, 1, 1), (32, 5, 7), (16, 6, 6), (14, 8, 4), (64, 3, 2)])
def test_bits_to_codes_bit_identical(official, d, h, w):
    g = torch.Generator().manual_seed(d * 100 + h)
    bits = torch.randint(0, 2, (2, h, w, d), generator=g)
    ref, _ = _official_codes(official, bits)
    ours = bits_to_codes(bits)
    assert ref.shape == (2, d, 1, h, w) and ours.shape == (2, d, h, w)
    assert torch.equal(ours, ref.squeeze(2))
    for dtype in (torch.bool, torch.uint8, torch.float32):
        assert torch.equal(bits_to_codes(bits.to(dtype)), ref.squeeze(2))
    assert torch.allclose(ours.abs(), torch.full_like(ours, 1 / math.sqrt(d)), rtol=0, atol=1e-7)


@pytest.mark.parametrize("patchify_", [False, True])
def test_multiscale_loop_bit_identical(official, patchify_):
    """Sampled bits -> summed codes and next-scale inputs, as the official autoregressive_infer_cfg computes."""
    d = 14 if patchify_ else 32
    token_bits = 4 * d if patchify_ else d
    sched = [(1, 1), (2, 2), (4, 4), (6, 6), (8, 8), (12, 12), (16, 16)]
    f = 2 if patchify_ else 1
    vae_sched = [(1, h * f, w * f) for h, w in sched]
    g = torch.Generator().manual_seed(7)
    B = 2
    q = official.bsq.MultiScaleBSQ(dim=d, codebook_size=2 ** d, new_quant=True, schedule_mode="dynamic")
    mode = q.z_interplote_up
    assert mode == "trilinear"
    summed_ref, summed = 0, None
    for si, (h, w) in enumerate(sched):
        bits = torch.randint(0, 2, (B, h * w, token_bits), generator=g)     # sampler output: (B, l, bits)
        # --- official arithmetic (infinity.py, vae_type != 0 branch) ---
        idx = bits.reshape(B, h, w, -1)
        if patchify_:
            idx = F.pixel_shuffle(idx.permute(0, 3, 1, 2), 2).permute(0, 2, 3, 1)
        codes = q.lfq.indices_to_codes(idx.unsqueeze(1), label_type="bit_label")
        last = si == len(sched) - 1
        if not last:
            summed_ref = summed_ref + F.interpolate(codes, size=vae_sched[-1], mode=mode)
            nxt = F.interpolate(summed_ref, size=vae_sched[si + 1], mode=mode).squeeze(-3)
            if patchify_:
                nxt = F.pixel_unshuffle(nxt, 2)
            nxt_ref = nxt.reshape(*nxt.shape[:2], -1).permute(0, 2, 1)
        else:
            summed_ref = summed_ref + codes
        # --- ours ---
        summed = accumulate_codes(summed, bits.reshape(B, h, w, -1), vae_sched[-1][1:], patchify_)
        assert torch.equal(summed, summed_ref.squeeze(-3)), f"summed codes differ at scale {si}"
        if not last:
            ours_next = next_scale_input(summed, sched[si + 1], patchify_)
            assert ours_next.shape == (B, sched[si + 1][0] * sched[si + 1][1], token_bits)
            assert torch.equal(ours_next, nxt_ref), f"next input differs at scale {si}"
    # the pieces on their own
    x = torch.randn(B, d, 6 * f, 4 * f, generator=g)
    assert torch.equal(upsample_codes(x, (9, 5)), F.interpolate(x.unsqueeze(2), size=(1, 9, 5), mode=mode).squeeze(2))
    if patchify_:
        tb = torch.randint(0, 2, (B, 3, 5, 4 * d), generator=g)
        ref = F.pixel_shuffle(tb.permute(0, 3, 1, 2), 2).permute(0, 2, 3, 1)
        assert torch.equal(unpatchify_bits(tb), ref)
        assert torch.equal(patchify(x), F.pixel_unshuffle(x, 2))
