"""HART on CUDA (run on a GPU): whole-scale CUDA-graph replays give the eager codes and images for the static
policies, bf16, and the capture must succeed (a failed capture is a test failure, not an eager fallback); an
eager scale issues no host synchronisation (``torch.cuda.set_sync_debug_mode("error")`` inside the scale loop)."""
from __future__ import annotations

import pytest
import torch

from toprovar.benchmark.e2e import build_policy
from toprovar.pipeline import Pipeline
from toprovar.runtime.orchestrator import Orchestrator

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
POLICIES = ["none", "toprovar", "fastvar", "scale-exit"]


@pytest.mark.parametrize("name", POLICIES)
def test_hart_scale_graphs_match_eager(name):
    pipe = Pipeline.load("hart-tiny", device="cuda", dtype=torch.bfloat16, seed=3)
    eager = Pipeline.load("hart-tiny", device="cuda", dtype=torch.bfloat16, seed=3)
    eager.cuda_graphs = False
    depth, S = pipe.cfg.depth, len(pipe.cfg.patch_nums)
    prompts = ["a red fox"]
    ref = eager.generate(prompts, seed=5, policy=build_policy(name, depth, None, S), progress=False)
    assert torch.isfinite(ref.images).all()
    orch = pipe.orchestrator([(p, p) for p in pipe.cfg.patch_nums])
    states = []
    for _ in range(4):  # warm-up, capture, replays
        pol = build_policy(name, depth, None, S)
        got = pipe.generate(prompts, seed=5, policy=pol, progress=False)
        states.append(orch.graphs.status(pol))
        for a, b in zip(ref.bits, got.bits):
            assert torch.equal(a, b)
        torch.testing.assert_close(got.images, ref.images, atol=0, rtol=0)
    assert states == ["warm-up", "replaying", "replaying", "replaying"], states


@pytest.mark.parametrize("name", POLICIES)
def test_hart_eager_scale_has_no_host_sync(name, monkeypatch):
    """Every scale of an eager generation (no graphs) runs with sync debug mode "error": a device-to-host read,
    a blocking copy or a synchronising op inside a scale raises. ToProVAR at its pinned operating point and the
    fixed-rule policies read nothing back."""
    pipe = Pipeline.load("hart-tiny", device="cuda", dtype=torch.bfloat16, seed=3)
    pipe.cuda_graphs = False
    depth, S = pipe.cfg.depth, len(pipe.cfg.patch_nums)
    pipe.generate(["a red fox"], seed=5, policy=build_policy(name, depth, None, S), progress=False)  # warm-up
    scale, calls = Orchestrator._scale, []

    def strict(self, *a, **kw):
        torch.cuda.set_sync_debug_mode("error")
        try:
            return scale(self, *a, **kw)
        finally:
            torch.cuda.set_sync_debug_mode("default")
            calls.append(a[1])
    monkeypatch.setattr(Orchestrator, "_scale", strict)
    res = pipe.generate(["a red fox"], seed=5, policy=build_policy(name, depth, None, S), progress=False)
    assert calls == list(range(len(res.bits))) and torch.isfinite(res.images).all()
