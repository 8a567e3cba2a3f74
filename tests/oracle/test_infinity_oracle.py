"""Oracle: our Infinity transformer against the OFFICIAL FoundationVision/Infinity model class.

How to run
----------
1. Get a checkout of https://github.com/FoundationVision/Infinity outside this repository, e.g.
       git clone https://github.com/FoundationVision/Infinity /tmp/infinity
   (or, from a local mirror: ``git -C <mirror> worktree add /tmp/infinity HEAD``).
2. Point ``TOPROVAR_INFINITY_REPO`` at it and run pytest on CPU:
       TOPROVAR_INFINITY_REPO=/tmp/infinity python -m pytest -q tests/oracle/test_infinity_oracle.py
   Add ``-s`` to see the measured max abs differences. Without the variable (or with a path that has no
   ``infinity/models/infinity.py``) every test here is skipped. Nothing needs to be installed beyond our own
   test dependencies: the official code's ``flash_attn``, ``timm``, ``fused_op`` (and, if missing, ``pytz``)
   imports are served by the test-only shims of ``tests/oracle/_shims.py`` (float32 kernels computing the
   same math); ``infinity.utils.dist`` is the official one (it runs undistributed on CPU).

What is compared (float32, CPU, max abs diff <= 1e-5)
---------------------------------------------------
The official ``infinity.models.infinity.Infinity`` is built at a tiny size with the constructor settings of
the official ``tools/run_infinity.py::load_transformer`` and ``scripts/infer.sh`` (shared_aln, fused_norm,
customized_flash_attn=False, pad_to_multiplier=128, rope2d_each_sa_layer=1, rope2d_normalized_by_hw=2,
add_lvl_embeding_only_first_block=1, use_bit_label=1, inference_mode=True, block_chunks > 1), all of its
parameters are randomised, and its state dict is loaded STRICTLY into ours (``Infinity.load_checkpoint``'s
path: ``load_into`` + ``Infinity.adapt_official``). Then, on the same text features (variable lengths, garbage
in the padding) and the same injected bits for every scale of the 0.06M schedule (official multinomial
sampling differs between CPU and CUDA, so bits are teacher-forced, not sampled):

* ``test_teacher_forced_forward``: the official training forward (one block-causal pass over all scales)
  vs our ``condition`` + ``first_input``/``embed_scale`` + ``forward_teacher`` + ``logits``.
* ``test_cached_generation_with_cfg``: the official ``autoregressive_infer_cfg`` (KV cache, CFG with the
  learned ``cfg_uncond``, CFG on logits, bits injected with ``gt_leak``) vs our generation ``Orchestrator`` on
  the ``TorchBackend`` (bits injected in ``head``): pooled text (sos), text K/V input (text_norm +
  text_proj_for_ca), shared AdaLN, every scale's block-0 input (summed codes -> trilinear -> word_embed +
  lvl_embed), the logits of both CFG halves at every scale, and the final summed codes.
* ``test_bit_sampling_semantics``: the official top-k/top-p bit sampler's distribution vs ``sample_bits``
  (top_p = 0 means "no top-p" in both).
Cases: three tiny configs (incl. the 8B-style spatial patchify) and square/wide/tall schedules, at 0.06M and at
0.25M (h/w 3, 1/3, 1.5: the 54x18 scale whose RoPE positions round differently in float64 than in the official
float32). Every preset and ratio of the schedule:

* ``test_schedule_table_matches_official``: our schedule table is the official ``dynamic_resolution_h_w``;
* ``test_rope_tables_every_preset_and_ratio``: RoPE cos/sin tables bit for bit (60 schedules, head dim 64, 128).

bf16 (``test_bf16_inference_follows_official_casting``): the official ``load_infinity(bf16=True)`` model (blocks
``.bfloat16()``, run under CPU bf16 autocast with CUDA autocast's float32 policy, ``_shims.cuda_like_bf16_autocast``)
vs our ``to_inference_dtype(bfloat16)``, both measured against the official model run in float64
(``_shims.float64_everywhere``): max |ours - official| <= 2% of max |logits| (measured ~1%), and our error to
float64 <= 1.5x the official's (measured 0.9-1.1x); ``keep_fp32_params`` measured alongside.
Defaults (``test_sampling_defaults_are_the_official_notebooks``): cfg/tau of infinity-2b/-8b from the official
notebooks, top_p from ``gen_one_img``.

Known differences of the official code that the oracle neutralises (documented, not hidden):
* its ``CrossAttention`` casts float32 q/kv to bfloat16 for flash-attn (no float32 kernel), so even the
  official "float32" model runs cross-attention (incl. the attentive text pool) in bf16; the oracle skips
  that cast (``_shims.float32_cross_attention``) to compare float32 math;
* its VAE quantizer is replaced by a stand-in with the official BSQ bit -> code rule (+-1, L2-normalised)
  and ``z_interplote_up = 'trilinear'``; the VAE itself is another oracle's business.
"""
from __future__ import annotations

import contextlib
import io
import os
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from toprovar.config import get_config
from toprovar.model.checkpoint import load_into
from toprovar.model.infinity import Infinity, build_model
from toprovar.model.rope import rope_tables
from toprovar.runtime.orchestrator import ModelSpec, Orchestrator
from toprovar.runtime.torch_backend import TorchBackend
from toprovar.sampling import sample_bits
from toprovar.schedule import get_schedule, rope_grid_side

from . import _shims

TOL = 1e-5
ENV = "TOPROVAR_INFINITY_REPO"

# Tiny configs matching official instances (depth 4 in 2 block chunks, head_dim 64): a 2-head attentive text
# pool (text 256 / 128); a 1-head pool of head dim 256; and the 8B-style spatial patchify (2x2 latent
# positions per token, official apply_spatial_patchify=1).
CONFIGS = {
    "w128_h2_t256_d16": dict(width=128, num_heads=2, text_channels=256, codebook_dim=16),
    "w256_h4_t128_d8": dict(width=256, num_heads=4, text_channels=128, codebook_dim=8),
    "w128_h2_t128_d4_patchify": dict(width=128, num_heads=2, text_channels=128, codebook_dim=4,
                                     spatial_patchify=True),
}
# (config, h/w ratio, preset) cases: square, wide (h < w) and tall schedules give different RoPE grid positions;
# the 0.25M cases at h/w 3 and 1/3 reach the 54x18 scale whose positions need float32 rounding (see rope.py).
CASES = [("w128_h2_t256_d16", 1.0, "0.06M"), ("w128_h2_t256_d16", 0.5, "0.06M"), ("w128_h2_t256_d16", 3.0, "0.06M"),
         ("w256_h4_t128_d8", 1.0, "0.06M"), ("w128_h2_t128_d4_patchify", 1.0, "0.06M"),
         ("w128_h2_t128_d4_patchify", 0.5, "0.06M"), ("w128_h2_t256_d16", 3.0, "0.25M"),
         ("w128_h2_t256_d16", 0.333, "0.25M"), ("w128_h2_t128_d4_patchify", 1.5, "0.25M")]
GEN_CASES = CASES[:6] + [("w128_h2_t256_d16", 3.0, "0.25M")]


# ----------------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def official():
    repo = os.environ.get(ENV, "")
    if not repo:
        pytest.skip(f"{ENV} is not set (path to a FoundationVision/Infinity checkout); see the module docstring")
    if not (Path(repo) / "infinity" / "models" / "infinity.py").is_file():
        pytest.skip(f"{ENV}={repo!r} has no infinity/models/infinity.py")
    with contextlib.redirect_stdout(io.StringIO()):
        return _shims.import_official_infinity(repo)


class _StandInLFQ:
    """The parts of the official BSQ quantizer (``vae.quantizer.lfq``) the transformer uses."""

    def __init__(self, d: int):
        self.d = d
        self.mask = 2 ** torch.arange(d - 1, -1, -1)

    def indices_to_codes(self, bits: torch.Tensor, label_type: str = "bit_label") -> torch.Tensor:
        """bits (B, T, h, w, d) in {0, 1} -> codes (B, d, T, h, w): +-1 then L2-normalised (BSQ)."""
        assert label_type == "bit_label"
        return F.normalize(bits.float() * 2 - 1, dim=-1).permute(0, 4, 1, 2, 3)


class StandInVAE:
    """What the official Infinity asks of ``vae_local`` / ``vae``; ``decode`` records the summed codes."""

    def __init__(self, d: int):
        self.embed_dim, self.vocab_size = d, 2 ** d
        self.quantizer = type("Q", (), {})()
        self.quantizer.lfq = _StandInLFQ(d)
        self.quantizer.z_interplote_up = "trilinear"
        self.decoded = None

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        self.decoded = z.clone()
        return torch.zeros(z.shape[0], 3, z.shape[-2], z.shape[-1])


def our_config(name: str):
    return get_config("tiny").replace(name=f"oracle-{name}", **CONFIGS[name])


def build_official(ns, cfg, vae: StandInVAE, seed: int, pn: str = "0.06M") -> nn.Module:
    """Official model at ``cfg``'s size with load_transformer's settings, every parameter randomised
    (float32, on the CPU; ``pn`` is the official resolution key, e.g. "1M" for benchmarks)."""
    torch.manual_seed(seed)
    with contextlib.redirect_stdout(io.StringIO()):
        m = ns.infinity.Infinity(
            vae_local=vae, text_channels=cfg.text_channels, text_maxlen=cfg.text_maxlen,
            shared_aln=True, raw_scale_schedule=None, checkpointing="full-block",
            customized_flash_attn=False, fused_norm=True, pad_to_multiplier=128, use_flex_attn=False,
            add_lvl_embeding_only_first_block=1, use_bit_label=1, rope2d_each_sa_layer=1,
            rope2d_normalized_by_hw=2, pn=pn, apply_spatial_patchify=int(cfg.spatial_patchify),
            inference_mode=True,
            train_h_div_w_list=[1.0],
            # the official 2B factory's kwargs, at the tiny size
            depth=cfg.depth, embed_dim=cfg.width, num_heads=cfg.num_heads, drop_path_rate=0.1, mlp_ratio=4,
            block_chunks=cfg.block_chunks,
            cond_drop_rate=0.0,  # the training forward would otherwise randomly drop the text
        )
    assert m.num_block_chunks == cfg.block_chunks > 1 and m.V == 2 * cfg.token_bits
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in m.named_parameters():
            if name == "cfg_uncond":
                continue  # already random (trunc normal); keep its official scale
            std = 0.5 if name.endswith("scale_mul_1H11") else (0.1 if p.dim() == 1 else 0.03)
            p.add_(torch.randn(p.shape, generator=g) * std)
        # exercise the clamp of the learned attention scale at ln(100)
        m.block_chunks[0].module[0].sa.scale_mul_1H11.data.view(-1)[0] = 5.0
    return m.eval().requires_grad_(False)


_PAIRS: dict = {}


def build_pair(ns, name: str, seed: int = 0):
    """(cfg, official, ours, stand-in vae), built once per (config, seed) and shared by the tests."""
    if (name, seed) not in _PAIRS:
        _PAIRS[name, seed] = _build_pair(ns, name, seed)
    cfg, off, ours, vae = _PAIRS[name, seed]
    vae.decoded = None
    return cfg, off, ours, vae


def _build_pair(ns, name: str, seed: int):
    cfg = our_config(name)
    vae = StandInVAE(cfg.codebook_dim)
    off = build_official(ns, cfg, vae, seed)
    ours = build_model(cfg, seed=seed + 100)
    sd = {k: v.clone() for k, v in off.state_dict().items()}
    load_into(ours, sd, rename=Infinity.adapt_official)  # strict: same keys, same shapes
    return cfg, off, ours, vae


def make_text(cfg, lengths: list[int], seed: int):
    """Padded text (B, L, C_text) with garbage in the padding, and the official varlen tuple."""
    g = torch.Generator().manual_seed(seed)
    L = max(lengths)
    text = torch.randn(len(lengths), L, cfg.text_channels, generator=g)
    kv_compact = torch.cat([text[i, :n] for i, n in enumerate(lengths)])
    cu = F.pad(torch.tensor(lengths, dtype=torch.int32).cumsum(0, dtype=torch.int32), (1, 0))
    return text, torch.tensor(lengths, dtype=torch.int32), (kv_compact, list(lengths), cu, L)


def make_bits(schedule, B: int, token_bits: int, seed: int) -> list[torch.Tensor]:
    """Injected bits per scale, in the transformer's token layout (B, h*w, token_bits)."""
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 2, (B, h * w, token_bits), generator=g).float() for h, w in schedule]


def latent_bits(bits: torch.Tensor, h: int, w: int, patchify: bool) -> torch.Tensor:
    """Token-layout bits (B, h*w, token_bits) -> latent-grid bits (B, h', w', d) (official unpatchify:
    pixel_shuffle of the (B, 4d, h, w) grid)."""
    grid = bits.view(bits.shape[0], h, w, -1).permute(0, 3, 1, 2)
    if patchify:
        grid = F.pixel_shuffle(grid, 2)
    return grid.permute(0, 2, 3, 1)


def next_inputs(bits: list[torch.Tensor], schedule, d: int, patchify: bool) -> list[torch.Tensor]:
    """Teacher-forced transformer inputs of scales 1.. (B, h*w, token_bits), written from the official rule:
    codes +-1/sqrt(d); summed codes += trilinear(codes -> last size); next = trilinear(summed -> next size)
    (then pixel_unshuffle with spatial patchify)."""
    B, f = bits[0].shape[0], 2 if patchify else 1
    H, W = schedule[-1]
    summed = torch.zeros(B, d, 1, H * f, W * f)
    out = []
    for si, (h, w) in enumerate(schedule[:-1]):
        codes = (latent_bits(bits[si], h, w, patchify).permute(0, 3, 1, 2).unsqueeze(2) * 2 - 1) / d ** 0.5
        summed = summed + F.interpolate(codes, size=(1, H * f, W * f), mode="trilinear")
        nh, nw = schedule[si + 1]
        nxt = F.interpolate(summed, size=(1, nh * f, nw * f), mode="trilinear").squeeze(2)
        if patchify:
            nxt = F.pixel_unshuffle(nxt, 2)
        out.append(nxt.flatten(2).transpose(1, 2))
    return out


def maxdiff(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape, (tuple(a.shape), tuple(b.shape))
    return (a.double() - b.double()).abs().max().item()


def report(label: str, diffs: dict[str, float]) -> None:
    print(f"\n[oracle] {label}: " + ", ".join(f"{k}={v:.3g}" for k, v in diffs.items()))


# ----------------------------------------------------------------------------------------- tests
def test_state_dict_layout(official):
    """Official and our state dicts have the same keys and shapes (strict load both ways)."""
    cfg, off, ours, _ = build_pair(official, "w128_h2_t256_d16")
    a, b = off.state_dict(), ours.state_dict()
    assert sorted(a) == sorted(b)
    assert all(tuple(a[k].shape) == tuple(b[k].shape) for k in a)
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("name,ratio,preset", CASES)
def test_teacher_forced_forward(official, name, ratio, preset):
    cfg, off, ours, _ = build_pair(official, name)
    sched = get_schedule(preset, ratio)
    B, d = 2, cfg.codebook_dim
    text, lengths, varlen = make_text(cfg, [5, 11], seed=2)
    bits = make_bits(sched, B, cfg.token_bits, seed=3)
    toks = next_inputs(bits, sched, d, cfg.spatial_patchify)

    with torch.no_grad(), _shims.float32_cross_attention() as mode:
        kv, lens, cu, Lmax = varlen
        ref = off((kv.clone(), lens, cu, Lmax), torch.cat(toks, 1), [(1, h, w) for h, w in sched])
    assert mode.skipped > 0  # the official bf16 cast was hit (and skipped)

    with torch.no_grad():
        cond, ada, ca_kv, ca_len = ours.condition(text, lengths, cfg=False)
        xs = [ours.first_input(cond)] + [ours.embed_scale(t, si + 1) for si, t in enumerate(toks)]
        ropes = rope_tables(cfg.head_dim, sched, rope_grid_side(ratio))
        got = ours.forward_teacher(cond, ada, ca_kv, ca_len, torch.cat(xs, 1), ropes, [h * w for h, w in sched])
    got = got.reshape(B, got.shape[1], -1)
    diff = maxdiff(got, ref)
    report(f"teacher-forced {name} ratio={ratio} {preset}", {"logits": diff, "|logits|max": ref.abs().max().item()})
    assert diff <= TOL


class TeacherBackend(TorchBackend):
    """Our TorchBackend with the bits injected at the head, recording what the official run exposes."""

    def __init__(self, model, schedule, bits):
        super().__init__(model, _Decoder(), schedule)
        self.bits, self.rec = bits, {"x0": [], "logits": []}

    def condition(self, text, lengths, cfg):
        out = super().condition(text, lengths, cfg)
        self.rec["cond"], self.rec["ada"], self.rec["ca_kv"], self.rec["ca_len"] = out[:4]
        return out

    def block_in_cache(self, layer, x, *args):
        if layer == 0:
            self.rec["x0"].append(x.clone())
        return super().block_in_cache(layer, x, *args)

    def head(self, si, x, cond, uniform, cfg, tau, top_p):
        self.rec["logits"].append(self.model.logits(x, cond))
        return self.bits[si]

    def decode(self, summed):  # the orchestrator decodes a batch row by row: collect the rows
        prev = self.rec.get("summed")
        self.rec["summed"] = summed.clone() if prev is None else torch.cat([prev, summed])
        return super().decode(summed)


class _Decoder(nn.Module):
    def __init__(self):
        super().__init__()
        self.dummy = nn.Parameter(torch.zeros(()))

    def forward(self, z):
        return torch.zeros(z.shape[0], 3, *z.shape[-2:])


@pytest.mark.parametrize("name,ratio,preset", GEN_CASES)
def test_cached_generation_with_cfg(official, name, ratio, preset):
    cfg, off, ours, vae = build_pair(official, name)
    sched = get_schedule(preset, ratio)
    S, B, d, cfg_scale = len(sched), 2, cfg.codebook_dim, 3.0
    text, lengths, varlen = make_text(cfg, [7, 3], seed=5)
    bits = make_bits(sched, B, cfg.token_bits, seed=6)

    # ---- official: KV-cached inference, CFG on logits (cfg_insertion_layer 0), bits injected by gt_leak
    rec = {"x0": [], "logits": []}
    hooks = [
        off.text_proj_for_sos.register_forward_hook(lambda m, i, o: rec.__setitem__("cond", o.clone())),
        off.text_proj_for_ca.register_forward_hook(lambda m, i, o: rec.__setitem__("ca_kv", o.clone())),
        off.shared_ada_lin.register_forward_hook(lambda m, i, o: rec.__setitem__("ada", o.clone())),
        off.block_chunks[0].module[0].register_forward_pre_hook(
            lambda m, a, kw: rec["x0"].append(kw["x"].clone()), with_kwargs=True),
    ]
    get_logits = off.get_logits

    def capture_logits(h, cond_BD):
        out = get_logits(h, cond_BD)
        rec["logits"].append(out.clone())
        return out

    off.get_logits = capture_logits
    try:
        with torch.no_grad(), _shims.float32_cross_attention():
            kv, lens, cu, Lmax = varlen
            off.autoregressive_infer_cfg(
                vae=vae, scale_schedule=[(1, h, w) for h, w in sched], label_B_or_BLT=(kv.clone(), lens, cu, Lmax),
                g_seed=0, B=B, cfg_list=[cfg_scale] * S, tau_list=[1.0] * S, cfg_insertion_layer=[0],
                top_k=900, top_p=0.97, vae_type=1, returns_vemb=1, ret_img=True,
                gt_leak=S, inference_mode=True, gt_ls_Bl=[latent_bits(b, h, w, cfg.spatial_patchify).unsqueeze(1)
                                               for b, (h, w) in zip(bits, sched)])
    finally:
        del off.get_logits
        for hk in hooks:
            hk.remove()
    assert len(rec["logits"]) == S and vae.decoded is not None

    # ---- ours: the real generation loop, bits injected at the head
    be = TeacherBackend(ours, sched, bits)
    spec = ModelSpec(cfg.depth, cfg.num_heads, cfg.head_dim, cfg.width, cfg.token_bits, cfg.codebook_dim,
                     cfg.spatial_patchify)
    orch = Orchestrator(be, spec, sched, rope_tables(cfg.head_dim, sched, rope_grid_side(ratio)))
    orch.generate(text, lengths, seed=0, cfg=cfg_scale, tau=1.0, top_p=0.97, progress=False)
    got = be.rec

    all_len = got["ca_len"].tolist()
    ca_compact = torch.cat([got["ca_kv"][i, :n] for i, n in enumerate(all_len)])
    diffs = {
        "sos(pooled text)": maxdiff(got["cond"], rec["cond"]),
        "text_proj_for_ca": maxdiff(ca_compact, rec["ca_kv"]),
        "shared_ada": maxdiff(got["ada"], rec["ada"]),
        "block0 inputs": max(maxdiff(a, b) for a, b in zip(got["x0"], rec["x0"])),
        "logits(cond+uncond)": max(maxdiff(a.reshape(a.shape[0], a.shape[1], -1), b)
                                   for a, b in zip(got["logits"], rec["logits"])),
        "summed codes": maxdiff(got["summed"], vae.decoded),
    }
    report(f"cached+cfg {name} ratio={ratio} {preset}", diffs)
    assert len(got["x0"]) == len(rec["x0"]) == S
    assert got["cond"].shape[0] == 2 * B  # CFG batch doubling with cfg_uncond
    bad = {k: v for k, v in diffs.items() if not v <= TOL}
    assert not bad, bad


@pytest.mark.parametrize("top_p", [0.97, 0.5, 1.0, 0.0])
def test_bit_sampling_semantics(official, top_p):
    """The official sampler's per-bit distribution (after CFG mix, /tau, top-k 900, top-p) is the one
    ``sample_bits`` draws from: bits == (u < p1_official) for every uniform u away from p1."""
    g = torch.Generator().manual_seed(7)
    B, n, bits_per = 2, 50, 16
    logits = torch.randn(2 * B, n, bits_per, 2, generator=g) * 3
    cfg_scale, tau = 3.0, 0.7
    mixed = (cfg_scale * logits[:B] + (1 - cfg_scale) * logits[B:]) / tau  # official order: /tau, then mix
    work = mixed.reshape(B, -1, 2).clone()
    official.infinity.sample_with_top_k_top_p_also_inplace_modifying_logits_(work, top_k=900, top_p=top_p, num_samples=1)
    p1 = work.softmax(-1)[..., 1].view(B, n, bits_per)
    u = torch.rand(B, n, bits_per, generator=g)
    ours = sample_bits(logits, u, cfg_scale, tau, top_p)
    far = (u - p1).abs() > 1e-5
    assert far.float().mean() > 0.99
    assert torch.equal(ours[far], (u < p1).float()[far])
    if 0 < top_p < 1:
        assert ((p1 == 0) | (p1 == 1)).any()  # top-p actually removed classes


# ----------------------------------------------------------------------------------------- every preset and ratio
def test_schedule_table_matches_official(official):
    """Our scale schedule of every aspect-ratio template and preset is the official ``dynamic_resolution_h_w``."""
    from toprovar.schedule import PRESET_SCALES, RATIO_SIDES
    table = official.infinity.dynamic_resolution_h_w
    assert sorted(table) == sorted(RATIO_SIDES)
    for ratio in RATIO_SIDES:
        assert sorted(table[ratio]) == sorted(PRESET_SCALES)
        for preset in PRESET_SCALES:
            assert [(h, w) for _, h, w in table[ratio][preset]["scales"]] == get_schedule(preset, ratio)


@pytest.mark.parametrize("head_dim", [64, 128])  # 128: Infinity-2B (2048/16) and -8B (3584/28)
def test_rope_tables_every_preset_and_ratio(official, head_dim):
    """Our RoPE cos/sin tables equal the official ``precompute_rope2d_freqs_grid`` (rope2d_normalized_by_hw=2,
    as the released models) bit for bit, for every scale of every preset at every aspect-ratio template."""
    from toprovar.schedule import PRESET_SCALES, RATIO_SIDES
    table = official.infinity.dynamic_resolution_h_w
    grids = official.basic.precompute_rope2d_freqs_grid(dim=head_dim, dynamic_resolution_h_w=table,
                                                        rope2d_normalized_by_hw=2, pad_to_multiplier=1)
    checked = 0
    for ratio in RATIO_SIDES:
        for preset in PRESET_SCALES:
            sched = get_schedule(preset, ratio)
            ours = torch.cat(rope_tables(head_dim, sched, rope_grid_side(ratio)), dim=1)  # (2, L, head_dim / 2)
            # the official entry of a preset is the whole 1M table (its first L rows are the preset's)
            ref = grids[str(tuple((1, h, w) for h, w in sched))][:, 0, 0, 0, :ours.shape[1]]
            assert torch.equal(ours, ref), (ratio, preset, maxdiff(ours, ref))
            checked += 1
    assert checked == len(RATIO_SIDES) * len(PRESET_SCALES) == 60


# ----------------------------------------------------------------------------------------- bf16 inference
BF16_REL_TOL = 0.02   # max |ours - official| over max |logits|, both in bf16 (measured ~1.1%)
BF16_ERR_RATIO = 1.5  # our bf16 error vs the float64 reference, at most this times the official's (measured ~1.1x)


def _teacher_logits(model, cfg, sched, text, lengths, toks, dtype=torch.float32) -> torch.Tensor:
    """Our teacher-forced logits (B, L, 2 * token_bits) as float64; dtype float64 runs under float64_everywhere."""
    mode = _shims.float64_everywhere() if dtype == torch.float64 else contextlib.nullcontext()
    with torch.no_grad(), mode:
        cond, ada, ca_kv, ca_len = model.condition(text.to(dtype), lengths, cfg=False)
        xs = [model.first_input(cond)] + [model.embed_scale(t.to(dtype), si + 1) for si, t in enumerate(toks)]
        ropes = [r.to(dtype) for r in rope_tables(cfg.head_dim, sched, rope_grid_side(sched[-1][0] / sched[-1][1]))]
        got = model.forward_teacher(cond, ada, ca_kv, ca_len, torch.cat(xs, 1), ropes, [h * w for h, w in sched])
    return got.reshape(text.shape[0], got.shape[1], -1).double()


@pytest.mark.parametrize("name,ratio", [("w128_h2_t256_d16", 1.0), ("w128_h2_t128_d4_patchify", 0.5)])
def test_bf16_inference_follows_official_casting(official, name, ratio):
    """bf16 inference against the official ``load_infinity(bf16=True)`` model (blocks ``.bfloat16()``, run under
    bf16 autocast with CUDA's float32 policy) and a float64 reference (the official model in float64):
    our default casting stays within BF16_REL_TOL of the official bf16 logits and its error to float64 within
    BF16_ERR_RATIO of the official's; ``keep_fp32_params`` is measured too (it is not the official model)."""
    import copy
    cfg, off, ours, _ = build_pair(official, name)
    sched = get_schedule("0.06M", ratio)
    text, lengths, (kv, lens, cu, Lmax) = make_text(cfg, [5, 11], seed=2)
    toks = next_inputs(make_bits(sched, 2, cfg.token_bits, seed=3), sched, cfg.codebook_dim, cfg.spatial_patchify)
    scales = [(1, h, w) for h, w in sched]
    with torch.no_grad(), _shims.float64_everywhere():
        ref = copy.deepcopy(off).double()((kv.double(), lens, cu, Lmax), torch.cat(toks, 1).double(), scales).double()
    off_bf16 = copy.deepcopy(off)
    for block in off_bf16.unregistered_blocks:  # what load_infinity(bf16=True) does
        block.bfloat16()
    with torch.no_grad(), _shims.cuda_like_bf16_autocast():
        off_logits = off_bf16((kv.clone(), lens, cu, Lmax), torch.cat(toks, 1), scales).double()
    ours_default = copy.deepcopy(ours).to_inference_dtype(torch.bfloat16)
    b = ours_default.blocks[0]
    assert b.ada_gss.dtype == b.ca_norm.weight.dtype == b.sa.scale_mul_1H11.dtype == torch.bfloat16
    got = _teacher_logits(ours_default, cfg, sched, text, lengths, toks)
    kept = _teacher_logits(copy.deepcopy(ours).to_inference_dtype(torch.bfloat16, keep_fp32_params=True), cfg,
                           sched, text, lengths, toks)
    ours64 = _teacher_logits(copy.deepcopy(ours).double(), cfg, sched, text, lengths, toks, torch.float64)
    scale = ref.abs().max().item()
    diffs = {"ours64 vs official64": maxdiff(ours64, ref), "official bf16 vs f64": maxdiff(off_logits, ref),
             "ours bf16 vs f64": maxdiff(got, ref), "ours keep-fp32 vs f64": maxdiff(kept, ref),
             "ours bf16 vs official bf16": maxdiff(got, off_logits), "|logits|max": scale}
    report(f"bf16 {name} ratio={ratio}", diffs)
    assert diffs["ours64 vs official64"] <= 1e-7 * max(1.0, scale)  # float64 arithmetic, float32 constants
    assert diffs["ours bf16 vs official bf16"] <= BF16_REL_TOL * scale
    assert diffs["ours bf16 vs f64"] <= BF16_ERR_RATIO * diffs["official bf16 vs f64"]
    assert diffs["ours keep-fp32 vs f64"] <= BF16_REL_TOL * scale


# ----------------------------------------------------------------------------------------- defaults
def _notebook_values(path: Path) -> dict:
    import json
    import re
    vals = {}
    for cell in json.loads(path.read_text())["cells"]:
        for line in "".join(cell["source"]).splitlines():
            m = re.match(r"\s*(cfg|tau)\s*=\s*([0-9.]+)\s*$", line)
            if m:
                vals[m.group(1)] = float(m.group(2))
    return vals


@pytest.mark.parametrize("model,notebook", [("infinity-2b", "interactive_infer.ipynb"),
                                            ("infinity-8b", "interactive_infer_8b.ipynb")])
def test_sampling_defaults_are_the_official_notebooks(official, model, notebook):
    """cfg and tau of each real model are those of its official notebook; top_p that of ``gen_one_img``."""
    import inspect
    repo = Path(os.environ[ENV])
    want = _notebook_values(repo / "tools" / notebook)
    cfg = get_config(model)
    assert (cfg.default_cfg, cfg.default_tau) == (want["cfg"], want["tau"])
    src = (repo / "tools" / "run_infinity.py").read_text()
    top_p = float(inspect.cleandoc(src.split("def gen_one_img(")[1].split("top_p=")[1].split(",")[0]))
    assert cfg.top_p == top_p and cfg.default_preset == "1M"
