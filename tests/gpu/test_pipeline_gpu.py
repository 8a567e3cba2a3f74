"""PyTorch pipeline on CUDA: block and whole-scale CUDA-graph replays (and compiled pieces) give the same bits
as eager execution (run on a GPU)."""
from __future__ import annotations

import pytest
import torch

from toprovar.pipeline import Pipeline
from toprovar.policy import make_policy

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_graphs_match_eager(dtype):
    pipe = Pipeline.load("tiny", device="cuda", dtype=dtype, seed=3)
    eager = Pipeline.load("tiny", device="cuda", dtype=dtype, seed=3)
    eager.cuda_graphs = False
    prompts = ["a red square left of a blue circle", "three green triangles"]
    ref = eager.generate(prompts, seed=5, progress=False)
    for _ in range(3):  # capture, then replays
        got = pipe.generate(prompts, seed=5, progress=False)
        for a, b in zip(ref.bits, got.bits):
            assert torch.equal(a, b)
        torch.testing.assert_close(got.images, ref.images, atol=0, rtol=0)
    backend = next(iter(pipe._orchestrators.values())).backend
    assert 0 < len(backend._graphs) <= backend._max_graphs


STATIC_POLICIES = ["none", "toprovar", "toprovar-scale-layer", "fastvar", "skipvar", "scale-exit"]


@pytest.mark.parametrize("name", STATIC_POLICIES)
def test_scale_graphs_match_eager(name):
    """Warm-up, capture and replays of whole-scale graphs give the eager bits and images, for every policy
    with a static plan (ToProVAR at the benchmark's pinned operating point), also after the buffers move."""
    from toprovar.benchmark.e2e import build_policy
    pipe = Pipeline.load("tiny", device="cuda", dtype=torch.bfloat16, seed=3)
    eager = Pipeline.load("tiny", device="cuda", dtype=torch.bfloat16, seed=3)
    eager.cuda_graphs = False
    depth, S = pipe.cfg.depth, 7
    prompts = ["a red square left of a blue circle"]
    ref = eager.generate(prompts, seed=5, policy=build_policy(name, depth, None, S), progress=False)
    assert build_policy(name, depth, None, S).plan_key() is not None
    orch = None
    for i in range(5):  # warm-up, capture, replay, buffers moved (capture again), replay
        if i == 3:
            orch.ws.clear()
        got = pipe.generate(prompts, seed=5, policy=build_policy(name, depth, None, S), progress=False)
        orch = next(iter(pipe._orchestrators.values()))
        assert got.trace.kept == ref.trace.kept
        for a, b in zip(ref.bits, got.bits):
            assert torch.equal(a, b)
        torch.testing.assert_close(got.images, ref.images, atol=0, rtol=0)
        plans = list(orch.graphs._plans.values())
        assert len(plans) == (0 if i == 0 else 1) and not any(p.capturing for p in plans)
        if i:
            assert len(plans[0].graphs) == len(got.bits)


def test_reading_policy_is_not_graphed():
    """A policy that reads device values (calibrated ToProVAR: kept counts from entropy) runs eagerly."""
    from toprovar.config import get_config
    pipe = Pipeline.load("shapes", device="cuda", dtype=torch.bfloat16)
    policy = make_policy("toprovar", str(get_config("shapes").packaged_calibration(None)))
    assert policy.plan_key() is None
    for _ in range(3):
        pipe.generate(["a red circle"], seed=1, policy=policy, progress=False)
    assert not next(iter(pipe._orchestrators.values())).graphs._plans


@pytest.mark.parametrize("name", ["none", "toprovar", "fastvar"])
def test_compiled_scale_graphs_match_compiled_eager(name):
    """torch.compile'd blocks and decoder (and the pinned selection, FastVAR's compiled per-sub-layer blocks):
    scale-graph replays give the bits of the same compiled pieces run eagerly (same kernels), bf16."""
    from toprovar.benchmark.e2e import build_policy
    pipe = Pipeline.load("tiny", device="cuda", dtype=torch.bfloat16, seed=7)
    eager = Pipeline.load("tiny", device="cuda", dtype=torch.bfloat16, seed=7)
    pipe.compile = eager.compile = True
    eager.cuda_graphs = False
    prompts = ["two green triangles"]
    policy = lambda: build_policy(name, pipe.cfg.depth, None, 7)  # noqa: E731
    ref = eager.generate(prompts, seed=2, policy=policy(), progress=False)
    for _ in range(3):
        got = pipe.generate(prompts, seed=2, policy=policy(), progress=False)
        for a, b in zip(ref.bits, got.bits):
            assert torch.equal(a, b)
        torch.testing.assert_close(got.images, ref.images, atol=0, rtol=0)


@pytest.mark.parametrize("name", ["none", "toprovar"])
def test_shared_kv_layout_matches_disjoint_caches(name, monkeypatch):
    """The staggered KV buffer (``kv_layout``; FAE and SDPA read strided windows of it, batch stride
    depth * (total - last) + last tokens) gives the bits of disjoint per-layer caches: bf16, batch 4 + CFG,
    scale graphs replaying (ToProVAR at the pinned operating point)."""
    import toprovar.runtime.orchestrator as orch_mod
    from toprovar.benchmark.e2e import build_policy
    prompts = ["a red square", "two green triangles", "a yellow circle left of a blue square", "x"]

    def run(pipe):
        for _ in range(3):  # warm-up, capture, replay
            res = pipe.generate(prompts, seed=[3, 4, 5, 6], policy=build_policy(name, pipe.cfg.depth, None, 7),
                                progress=False)
        return res

    got = run(Pipeline.load("tiny", device="cuda", dtype=torch.bfloat16, seed=3))
    monkeypatch.setattr(orch_mod, "kv_layout", lambda depth, total, last: ([i * total for i in range(depth)],
                                                                           depth * total))
    ref = run(Pipeline.load("tiny", device="cuda", dtype=torch.bfloat16, seed=3))
    for a, b in zip(ref.bits, got.bits):
        assert torch.equal(a, b)
    torch.testing.assert_close(got.images, ref.images, atol=0, rtol=0)


def test_plans_sharing_one_graph_pool_match_eager_when_interleaved():
    """Scale plans of several batch sizes and two policies capture into one shared graph memory pool; run
    interleaved (each plan's replays between the others'), every generation gives the eager bits and images."""
    import random

    from toprovar.benchmark.e2e import build_policy
    pipe = Pipeline.load("tiny", device="cuda", dtype=torch.bfloat16, seed=3)
    eager = Pipeline.load("tiny", device="cuda", dtype=torch.bfloat16, seed=3)
    eager.cuda_graphs = False
    prompts = ["a red square", "two green triangles", "a yellow circle left of a blue square", "x"]
    cases = [(name, B) for name in ("none", "toprovar") for B in (1, 2, 4)]
    seeds = {c: random.Random(str(c)).sample(range(10_000), c[1]) for c in cases}

    def gen(p, case):
        name, B = case
        return p.generate(prompts[:B], seed=seeds[case], policy=build_policy(name, p.cfg.depth, None, 7),
                          progress=False)

    ref = {c: gen(eager, c) for c in cases}
    orch = None
    for round_ in range(4):  # warm-up, capture, then replays, in a new order each round
        order = random.Random(round_).sample(cases, len(cases))
        for case in order:
            got = gen(pipe, case)
            orch = orch or next(iter(pipe._orchestrators.values()))
            orch.graphs.max_plans = 16
            for a, b in zip(ref[case].bits, got.bits):
                assert torch.equal(a, b), (round_, case)
            torch.testing.assert_close(got.images, ref[case].images, atol=0, rtol=0)
    plans = list(orch.graphs._plans.values())
    assert len(plans) == len(cases) and not any(p.capturing for p in plans)
    assert len({p.pool for p in plans}) == 1
