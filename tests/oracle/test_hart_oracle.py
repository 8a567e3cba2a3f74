"""Oracle: our HART against the OFFICIAL mit-han-lab/hart classes (``HARTForT2I``, its tokenizer and diffusion head).

How to run
----------
1. Get a checkout of https://github.com/mit-han-lab/hart outside this repository, e.g.
       git clone https://github.com/mit-han-lab/hart /tmp/hart
   (or from a local mirror: ``git --git-dir=<mirror> archive HEAD | tar -x -C /tmp/hart``).
2. Point ``TOPROVAR_HART_REPO`` at it and run pytest on CPU:
       TOPROVAR_HART_REPO=/tmp/hart python -m pytest -q tests/oracle/test_hart_oracle.py
   Add ``-s`` to see the measured max abs differences. Without the variable (or with a path that has no
   ``hart/modules/models/transformer/hart_transformer_t2i.py``) every test is skipped. Nothing needs to be
   installed beyond our test dependencies (``scipy`` and ``huggingface_hub``, imported by the official module, come
   with ``transformers``): the official CUDA extension ``hart_backend.fused_kernels`` (RMS norm), ``.cuda()`` and the
   tokenizer's ``from_pretrained`` are served by the test-only shims of ``tests/oracle/_hart_shims.py``.

What is compared (float32, CPU)
-------------------------------
The official ``HARTForT2I`` is built at the ``hart-tiny`` size with the released 1024px model's flags (llama
attention/MLP, ``disable_aln``, no shared AdaLN, ``use_timestep_embed``, ``use_context_norm``, no q/k L2 norm, no
cross-attention, iDDPM with ``diff_steps`` steps) and a ``var_hybrid`` tokenizer; every parameter is randomised.
Its transformer state dict is saved (``.bin``) and its tokenizer's (``vae.``-prefixed safetensors, as released) and
both are loaded STRICTLY into ours through ``load_parts`` / ``Hart.load_checkpoint`` / ``load_decoder``.

* ``test_teacher_forced_logits``: the official blocks run scale by scale with their KV cache (as
  ``autoregressive_infer_cfg`` calls them: CFG batch with the zero empty text, context position ids from the mask,
  2D positions offset by the last context position) on the same given codes at every scale, against our
  ``condition`` + cached blocks + ``HartNextInputPiece`` + ``logits``: the logits of both CFG halves at every scale
  (scale 0: all context tokens), max abs diff <= 1e-5.
* ``test_diffusion_head``: the official ``DiffLoss.sample`` (CFG) vs ``DiffLoss.sample`` here for the same
  condition and the same Gaussian noise (start and per step): <= 1e-5.
* ``test_tokenizer_decoder``: the official ``fhat_to_img`` vs ``HartDecoder`` on the same summed codes: <= 1e-5.
* ``test_full_generation``: the official ``autoregressive_infer_cfg`` (``more_smooth`` True as the official
  sample.py, CFG 4.5, top-p 0) with its random draws injected (``_hart_shims.injected_noise``: the uniforms our
  orchestrator draws for the seed, through the same inverse-CDF / Gumbel / erfinv formulas) vs our generation
  through the shared ``Orchestrator`` + ``TorchBackend``: the drawn code indices at every scale are identical and
  the image differs by <= 1e-4 (ours mapped from [-1, 1] to the official [0, 1]).
"""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from toprovar.config import get_config
from toprovar.model import families
from toprovar.model.hart import pieces as hart_pieces
from toprovar.model.hart.pieces import HartNextInputPiece, cfg_schedule, normal_from_uniform
from toprovar.runtime.orchestrator import ModelSpec, Orchestrator, row_seeds, uniform_noise
from toprovar.runtime.torch_backend import TorchBackend

from . import _hart_shims

ENV = "TOPROVAR_HART_REPO"
TOL = 1e-5
CFG = get_config("hart-tiny").replace(more_smooth=True)  # the official sample.py default
VAE_KW = dict(vocab_size=CFG.vocab_size, z_channels=CFG.codebook_dim, ch=32, ch_mult=(1, 1, 2),
              v_patch_nums=tuple(CFG.patch_nums), quantizer_type="var_hybrid", share_quant_resi=4, quant_resi=0.5,
              test_mode=True)


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    repo = os.environ.get(ENV)
    if not repo:
        pytest.skip(f"{ENV} is not set (path to a mit-han-lab/hart checkout); see the module docstring")
    if not (Path(repo) / "hart/modules/models/transformer/hart_transformer_t2i.py").is_file():
        pytest.skip(f"{ENV}={repo!r} has no hart/modules/models/transformer/hart_transformer_t2i.py")
    from safetensors.torch import save_file
    from toprovar.model.loading import load_parts
    tmp = tmp_path_factory.mktemp("hart_oracle")
    with _hart_shims.official_hart(repo) as t2i:
        official = _hart_shims.build_official(t2i, CFG, VAE_KW, seed=3)
        torch.save(official.state_dict(), tmp / "ema_model.bin")
        save_file({f"vae.{k}": v.contiguous() for k, v in official.vae_proxy[0].state_dict().items()},
                  str(tmp / "tokenizer.safetensors"))
        parts = load_parts("hart-tiny", checkpoint=str(tmp), vae=str(tmp / "tokenizer.safetensors"),
                           text_encoder=False)
        parts.model.cfg = CFG
        yield official, parts


def _text(B: int = 2, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    L = CFG.text_maxlen
    text = torch.randn(B, L, CFG.text_channels, generator=g)
    lengths = torch.tensor([5, L][:B], dtype=torch.int32)
    mask = torch.arange(L)[None] < lengths[:, None]
    return text, lengths, mask, (mask.cumsum(1) - 1)


def test_teacher_forced_logits(pair):
    official, parts = pair
    model, S, B = parts.model, len(CFG.patch_nums), 2
    text, lengths, mask, pos = _text(B)
    sched = [(p, p) for p in CFG.patch_nums]
    ropes = families.ropes_for(CFG, sched)
    g = torch.Generator().manual_seed(1)
    codes = [torch.randn(B, p * p, CFG.codebook_dim, generator=g) for p in CFG.patch_nums]
    with torch.no_grad():
        # official: the calls of autoregressive_infer_cfg with given codes
        sos = official.context_embed(official.context_norm(torch.cat([text, torch.zeros_like(text)])))
        opos = torch.cat([pos, torch.zeros_like(pos)])
        omask = torch.cat([mask, torch.zeros_like(mask)])
        omask[B:, 0] = True
        lvl_pos = official.lvl_embed(official.lvl_1L)
        x = sos + lvl_pos[:, :CFG.text_maxlen]
        f_hat = torch.zeros(B, CFG.codebook_dim, sched[-1][0], sched[-1][1])
        cur = CFG.text_maxlen
        for b in official.blocks:
            b.attn.kv_caching(True)
        off_logits = []
        for si, p in enumerate(CFG.patch_nums):
            for b in official.blocks:
                x = b(x=x, cond_BD=sos, attn_bias=None, si=si, context_position_ids=opos, context_mask=omask)
            off_logits.append(official.get_logits(x, sos))
            if si == S - 1:
                break
            h = codes[si].transpose(1, 2).reshape(B, CFG.codebook_dim, p, p)
            f_hat, nxt = official.vae_quant_proxy[0].get_next_autoregressive_input(si, S, f_hat, h, CFG.patch_nums)
            n2 = CFG.patch_nums[si + 1] ** 2
            x = (official.word_embed(nxt.view(B, CFG.codebook_dim, -1).transpose(1, 2))
                 + lvl_pos[:, cur:cur + n2]).repeat(2, 1, 1)
            cur += n2
        for b in official.blocks:
            b.attn.kv_caching(False)
        # ours
        cond, ada, ca, calen, x = model.condition(text, lengths, cfg=True)
        H, hd = CFG.num_heads, CFG.head_dim
        past = [(x.new_zeros(2 * B, H, 0, hd), x.new_zeros(2 * B, H, 0, hd)) for _ in model.blocks]
        summed = torch.zeros(B, CFG.codebook_dim, sched[-1][0], sched[-1][1])
        worst = 0.0
        for si in range(S):
            rope = ropes[si][:, :x.shape[1]]
            for li, blk in enumerate(model.blocks):
                x, k, v, _ = blk(x, ada, ca, calen, rope, *past[li])
                past[li] = (torch.cat([past[li][0], k], 2), torch.cat([past[li][1], v], 2))
            ours = model.logits(x, cond)
            d = (ours - off_logits[si]).abs().max().item()
            worst = max(worst, d)
            assert d <= TOL, f"scale {si}: max abs diff {d:.3g}"
            if si < S - 1:
                summed, xn = HartNextInputPiece(model, sched, si)(codes[si], summed)
                x = xn.repeat(2, 1, 1)
    print(f"teacher-forced logits: max abs diff {worst:.3g} over {S} scales")


def test_diffusion_head(pair):
    official, parts = pair
    N, C, Cv, steps = 6, CFG.width, CFG.codebook_dim, CFG.diff_steps
    g = torch.Generator().manual_seed(2)
    z = torch.randn(2 * N, C, generator=g)
    noise = torch.randn(steps + 1, N, Cv, generator=g)
    feed = [noise[0]] + [torch.cat([noise[k], torch.randn(N, Cv, generator=g)]) for k in range(1, steps + 1)]
    with torch.no_grad(), _hart_shims.injected_noise(None, None, _hart_shims.NoiseFeed(feed)):
        off = official.diffloss.sample(z, temperature=1.0, cfg=2.5)[:N]
    ours = parts.model.diffloss.sample(z[:N], z[N:], noise, torch.tensor([2.5]))
    d = (ours - off).abs().max().item()
    print(f"diffusion head: max abs diff {d:.3g} (output scale {off.abs().max().item():.3g})")
    assert d <= TOL


def test_tokenizer_decoder(pair):
    official, parts = pair
    G = CFG.patch_nums[-1]
    f = torch.randn(2, CFG.codebook_dim, G, G, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        off = official.vae_proxy[0].fhat_to_img(f.clone())
        ours = parts.decoder(f)
    d = (ours - off).abs().max().item()
    print(f"tokenizer decoder: max abs diff {d:.3g}, image {tuple(ours.shape)}")
    assert ours.shape == off.shape and d <= TOL


def test_full_generation(pair, monkeypatch):
    official, parts = pair
    model, S, B, seed, cfg = parts.model, len(CFG.patch_nums), 2, 7, 4.5
    text, lengths, mask, pos = _text(B, seed=5)
    sched = [(p, p) for p in CFG.patch_nums]
    spec = ModelSpec.from_config(CFG)
    orch = Orchestrator(TorchBackend(model, parts.decoder, sched), spec, sched, families.ropes_for(CFG, sched))
    ours_drawn = []

    def recording_categorical(logits, u):
        idx = hart_pieces.categorical.__wrapped__(logits, u)
        ours_drawn.append(idx.reshape(-1).clone())
        return idx
    recording_categorical.__wrapped__ = hart_pieces.categorical
    monkeypatch.setattr(hart_pieces, "categorical", recording_categorical)
    res = orch.generate(text, lengths, seed=seed, cfg=cfg_schedule(cfg, S), tau=1.0, top_p=0.0, progress=False)
    # the same uniforms (one generator per row, as the orchestrator draws them), fed to the official draws
    counts = [p * p for p in CFG.patch_nums]
    noise = uniform_noise([torch.Generator().manual_seed(s) for s in row_seeds(seed, B)], B, counts,
                          [spec.noise_width(s) for s in range(S)], torch.device("cpu"))
    V, Cv, steps = CFG.vocab_size, CFG.codebook_dim, CFG.diff_steps
    cat_u = _hart_shims.NoiseFeed([u[..., 0] for u in noise])
    gum_u = _hart_shims.NoiseFeed([u[..., 1:1 + V] for u in noise])
    nrm = normal_from_uniform(noise[-1][..., 1 + V:]).view(B, counts[-1], steps + 1, Cv)
    n_last = B * counts[-1]
    normals = [nrm[:, :, 0].reshape(n_last, Cv)] + [torch.cat([nrm[:, :, k].reshape(n_last, Cv),
                                                               torch.zeros(n_last, Cv)]) for k in range(1, steps + 1)]
    drawn = []
    with torch.no_grad(), _hart_shims.injected_noise(cat_u, gum_u, _hart_shims.NoiseFeed(normals)):
        inner = torch.multinomial

        def recording(probs, num_samples, **kw):
            out = inner(probs, num_samples, **kw)
            drawn.append(out[:, 0].clone())
            return out
        torch.multinomial = recording
        try:
            img = official.autoregressive_infer_cfg(B=B, label_B=text.clone(), g_seed=0, cfg=cfg, top_p=0.0,
                                                    more_smooth=True, context_position_ids=pos.clone(),
                                                    context_mask=mask.clone())
        finally:
            torch.multinomial = inner
    assert len(drawn) == len(ours_drawn) == S
    for si in range(S):
        assert torch.equal(ours_drawn[si], drawn[si]), f"scale {si}: drawn codes differ"
    assert len({int(i) for x in drawn for i in x}) > S  # the draws vary (not one code everywhere)
    ours = res.images * 0.5 + 0.5
    d = (ours - img).abs().max().item()
    print(f"full generation: same code indices at all {S} scales ({sum(len(x) for x in drawn)} draws); "
          f"image max abs diff {d:.3g}")
    assert d <= 1e-4 and img.std() > 0
