"""HART on CUDA: whole-scale CUDA-graph replays give the eager codes and images for the static policies, bf16
(run on a GPU)."""
from __future__ import annotations

import pytest
import torch

from toprovar.benchmark.e2e import build_policy
from toprovar.pipeline import Pipeline

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.mark.parametrize("name", ["none", "toprovar", "fastvar", "scale-exit"])
def test_hart_scale_graphs_match_eager(name):
    pipe = Pipeline.load("hart-tiny", device="cuda", dtype=torch.bfloat16, seed=3)
    eager = Pipeline.load("hart-tiny", device="cuda", dtype=torch.bfloat16, seed=3)
    eager.cuda_graphs = False
    depth, S = pipe.cfg.depth, len(pipe.cfg.patch_nums)
    prompts = ["a red fox"]
    ref = eager.generate(prompts, seed=5, policy=build_policy(name, depth, None, S), progress=False)
    assert torch.isfinite(ref.images).all()
    for _ in range(4):  # warm-up, capture, replays
        got = pipe.generate(prompts, seed=5, policy=build_policy(name, depth, None, S), progress=False)
        for a, b in zip(ref.bits, got.bits):
            assert torch.equal(a, b)
        torch.testing.assert_close(got.images, ref.images, atol=0, rtol=0)
