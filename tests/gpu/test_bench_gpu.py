"""Profiled runs on CUDA (events between the pieces, CUDA-graph replay of unpruned layers): the pieces sum
to the scale time, and profiling changes no bit of the result (run on a GPU)."""
from __future__ import annotations

import json

import pytest
import torch

from toprovar.benchmark.breakdown import check_pieces
from toprovar.benchmark.e2e import build_policy
from toprovar.cli import main
from toprovar.pipeline import Pipeline
from toprovar.policy import make_policy

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("policy", ["none", "toprovar-pinned", "fastvar-public"])
def test_profile_on_cuda(dtype, policy):
    pipe = Pipeline.load("tiny", device="cuda", dtype=dtype, seed=3)
    prompts = ["a red square left of a blue circle", "three green triangles"]

    def run(profile):
        pol = build_policy("toprovar", pipe.cfg.depth, None, 7) if policy == "toprovar-pinned" else make_policy(policy)
        return pipe.generate(prompts, seed=5, policy=pol, profile=profile, progress=False)

    ref = run(False)
    for _ in range(2):  # graph capture, then replay
        got = run(True)
        assert all(torch.equal(a, b) for a, b in zip(ref.bits, got.bits))
        assert torch.equal(got.images, ref.images) and got.trace.kept == ref.trace.kept
        assert check_pieces(got.scale_ms, got.piece_ms) == []
        assert all(v >= 0 for d in got.piece_ms.values() for v in d.values())
        assert any("pruned" in d for d in got.piece_ms.values()) == (policy != "none")


def test_cli_bench_on_cuda(tmp_path):
    assert main(["bench", "--model", "tiny", "--device", "cuda", "--runs", "2", "--warmup", "1",
                 "--policies", "none,toprovar,fastvar", "--out", str(tmp_path)]) == 0
    data = json.loads((tmp_path / "e2e_tiny.json").read_text())
    assert data["timing"] == "CUDA events" and data["dtype"] == "bfloat16" and data["cuda_graphs"]
    assert data["environment"]["device"].startswith("NVIDIA")
    for run in data["runs"].values():
        assert run["piece_check"] == []
