"""HART's runtime properties on the CPU: no host synchronisation inside a scale (a generation on the meta device,
where every device-to-host read, data-dependent shape or CPU tensor mixed into the scale's work raises, with no
``.item()``/``.cpu()``/``.tolist()``/numpy call in the scale loop), the per-scale pieces trace into one graph each
under ``torch.compile(fullgraph=True)``, the diffusion head's one-embedding sampler and bfloat16 linears, and
the Qwen2 encoding cache."""
from __future__ import annotations

import sys

import pytest
import torch
from torch.overrides import TorchFunctionMode

from toprovar.benchmark.e2e import build_policy
from toprovar.config import get_config
from toprovar.model import families
from toprovar.model.hart.pieces import HartDiffusionPiece, HartHeadPiece, HartNextInputPiece, noise_widths
from toprovar.model.hart.transformer import build_hart
from toprovar.pipeline import Pipeline
from toprovar.runtime.orchestrator import Orchestrator

CFG = get_config("hart-tiny")
S = len(CFG.patch_nums)
SYNCS = {"item", "tolist", "cpu", "numpy", "__bool__", "__float__", "__int__", "__index__", "nonzero"}


class _HostReads(TorchFunctionMode):
    """Records tensor methods that read device values on the host."""

    def __init__(self):
        super().__init__()
        self.hits: list[str] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", "")
        if name in SYNCS:
            self.hits.append(name)
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("name", ["none", "toprovar", "fastvar", "scale-exit"])
def test_scale_loop_has_no_host_sync_on_meta(name, monkeypatch):
    model = families.build_model(CFG, seed=0).to("meta")
    pipe = Pipeline(CFG, model, families.build_decoder(CFG, seed=0).to("meta"), None, [])
    scale, reads, numpy_calls, scales = Orchestrator._scale, [], [], []

    def watched(self, *a, **kw):
        def prof(frame, event, arg):
            mod = getattr(arg, "__module__", "") or "" if event == "c_call" else frame.f_globals.get("__name__", "")
            if event in ("call", "c_call") and mod.split(".")[0] == "numpy":
                numpy_calls.append(f"{mod}.{getattr(arg, '__name__', frame.f_code.co_name)}")
        sys.setprofile(prof)
        try:
            with _HostReads() as mode:
                out = scale(self, *a, **kw)
        finally:
            sys.setprofile(None)
        reads.extend(mode.hits)
        scales.append(a[1])
        return out
    monkeypatch.setattr(Orchestrator, "_scale", watched)
    text = torch.randn(1, CFG.text_maxlen, CFG.text_channels)
    res = pipe.generate_from_features(text, torch.tensor([5], dtype=torch.int32), seed=1, progress=False,
                                      policy=build_policy(name, CFG.depth, None, S))
    assert res.images.device.type == "meta" and scales == list(range(len(res.bits)))
    assert reads == [] and numpy_calls == [], (reads, numpy_calls[:5])


def _compiled(fn):
    torch._dynamo.reset()
    return torch.compile(fn, backend="eager", fullgraph=True)  # raises on any graph break


def test_per_scale_pieces_compile_fullgraph():
    """Head (logits, CFG, top-k/top-p, the draw; last scale with the diffusion head), next-scale input (bicubic,
    quant_resi, area resize, embedding) and both block halves trace into one graph each; same outputs as eager."""
    model = build_hart(CFG, seed=int(torch.randint(0, 2**31 - 1, ()).item()))
    sched = [(p, p) for p in CFG.patch_nums]
    ropes = families.ropes_for(CFG, sched)
    g = torch.Generator().manual_seed(int(torch.randint(0, 2**31 - 1, ()).item()))
    B, C, Cv = 1, CFG.width, CFG.codebook_dim
    cond = torch.randn(2 * B, C, generator=g)
    widths = noise_widths(CFG)
    for si in (1, S - 1):
        n = sched[si][0] * sched[si][1]
        x = torch.randn(2 * B, n, C, generator=g)
        args = (x, cond, torch.rand(B, n, widths[si], generator=g), torch.tensor([3.0]), torch.tensor([1.0]),
                torch.tensor([0.0]))
        head = HartHeadPiece(model, si)
        torch.testing.assert_close(_compiled(head)(*args), head(*args), atol=1e-5, rtol=1e-5)
        nxt = HartNextInputPiece(model, sched, si)
        summed = torch.randn(B, Cv, *sched[-1], generator=g)
        codes = torch.randn(B, n, Cv, generator=g)
        for a, b in zip(_compiled(nxt)(codes, summed), nxt(codes, summed)):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
        blk = model.blocks[0]
        ada = torch.tensor([[4.0], [0.0]])
        q, k, v = blk.attention_inputs(x, ada, ropes[si])
        for a, b in zip(_compiled(blk.attention_inputs)(x, ada, ropes[si]), (q, k, v)):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(_compiled(blk.attention_outputs)(x, ada, q, None, None),
                                   blk.attention_outputs(x, ada, q, None, None), atol=1e-5, rtol=1e-5)
    diff = HartDiffusionPiece(model)
    n = sched[-1][0] * sched[-1][1]
    dargs = (torch.randn(2 * B, n, C, generator=g), torch.randn(B, n, Cv, generator=g),
             torch.rand(B, n, widths[-1], generator=g), torch.tensor([3.0]))
    torch.testing.assert_close(_compiled(diff)(*dargs), diff(*dargs), atol=1e-5, rtol=1e-5)


def test_diffusion_sampler_embeds_once_and_runs_linears_in_bfloat16():
    """The sampler (condition embedded once, each step's time embedding on one row) == the per-token MLP
    forward in float64 (1e-5); after ``to_inference_dtype(bfloat16)`` the MLP's linears are bfloat16 and one
    step's output is within 2% (relative L2) of the float64 one (the 8-step sampler's clamps and CFG amplify
    rounding chaotically on random weights: only finiteness is checked there)."""
    model = build_hart(CFG, seed=int(torch.randint(0, 2**31 - 1, ()).item()))
    dl = model.diffloss
    g = torch.Generator().manual_seed(int(torch.randint(0, 2**31 - 1, ()).item()))
    N, Cv, C = 16, CFG.codebook_dim, CFG.width
    z, zu = torch.randn(N, C, generator=g), torch.randn(N, C, generator=g)
    noise = torch.randn(CFG.diff_steps + 1, N, Cv, generator=g)
    x, t = torch.randn(2 * N, Cv, generator=g), dl.timestep[3].expand(2 * N)
    net64 = dl.net.double()
    ref_step = net64(x.double(), t, torch.cat([z, zu]).double())
    dl.net.float()
    torch.testing.assert_close(dl.net.step(x, dl.timestep[3:4], dl.net.embed_condition(torch.cat([z, zu]))),
                               ref_step.float(), atol=1e-5, rtol=1e-5)
    model.to_inference_dtype(torch.bfloat16)
    assert dl.net.cond_embed.weight.dtype == dl.net.res_blocks[0].mlp[0].weight.dtype == torch.bfloat16
    assert dl.net.res_blocks[0].in_ln.weight.dtype == model.lvl_embed.mlp[0].weight.dtype == torch.float32
    got = dl.net.step(x, dl.timestep[3:4], dl.net.embed_condition(torch.cat([z, zu])))
    rel = ((got.double() - ref_step).norm() / ref_step.norm()).item()
    assert got.dtype == torch.float32 and rel <= 0.02, rel
    res = dl.sample(z, zu, noise, torch.tensor([2.0]))
    assert res.dtype == torch.float32 and res.shape == (N, Cv) and torch.isfinite(res).all()


def test_qwen2_encodings_are_cached_per_prompt(monkeypatch):
    from toprovar.model.hart import text as text_mod
    enc = text_mod.tiny_qwen2_encoder(CFG.text_channels, CFG.text_maxlen, seed=1)
    fresh = {p: enc._encode([p]) for p in ("a red fox", "two cats", "x")}
    calls = []
    inner = enc._encode
    monkeypatch.setattr(enc, "_encode", lambda ps: calls.append(list(ps)) or inner(ps))
    f1, n1 = enc.encode(["a red fox", "two cats", "a red fox"])
    f2, n2 = enc.encode(["two cats", "x"])
    assert calls == [["a red fox", "two cats"], ["x"]]
    for (f, n), ps in (((f1, n1), ["a red fox", "two cats", "a red fox"]), ((f2, n2), ["two cats", "x"])):
        for i, p in enumerate(ps):
            torch.testing.assert_close(f[i], fresh[p][0][0], atol=1e-5, rtol=1e-5)
            assert n[i] == fresh[p][1][0]
    monkeypatch.setattr(text_mod, "CACHE_SIZE", 2)
    enc.encode(["y"])
    assert list(enc.cache) == ["x", "y"]  # least recently used dropped


def test_device_drawn_gumbel_columns():
    """``uniform_noise`` with device columns (what a CUDA generation does for more_smooth, run here with CPU
    generators standing in for the per-row device ones): columns [a, b) are row r's own generator's draws,
    scale after scale; the others are the host stream of the narrower width; rows are independent."""
    from toprovar.runtime.orchestrator import ModelSpec, uniform_noise
    smooth = CFG.replace(more_smooth=True)
    cols = ModelSpec.from_config(smooth).device_noise
    assert cols == (1, 1 + CFG.vocab_size) and ModelSpec.from_config(CFG).device_noise is None
    counts, widths, seeds = [1, 4, 9], [cols[1] + 2, cols[1] + 2, cols[1] + 6], [7, 11]
    dev = torch.device("cpu")
    got = uniform_noise([torch.Generator().manual_seed(s) for s in seeds], 2, counts, widths, dev, device_cols=cols,
                        device_gens=[torch.Generator().manual_seed(s + 1000) for s in seeds])
    cut = cols[1] - cols[0]
    for r, s in enumerate(seeds):
        host, dg = torch.Generator().manual_seed(s), torch.Generator().manual_seed(s + 1000)
        for t, n, w in zip(got, counts, widths):
            h = torch.rand(1, n, w - cut, generator=host)[0]
            assert torch.equal(t[r, :, :cols[0]], h[:, :cols[0]]) and torch.equal(t[r, :, cols[1]:], h[:, cols[0]:])
            assert torch.equal(t[r, :, cols[0]:cols[1]], torch.rand(n, cut, generator=dg))
