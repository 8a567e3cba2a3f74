"""PyTorch pipeline on CUDA: CUDA-graph replay gives the same bits as eager execution (run on a GPU)."""
from __future__ import annotations

import pytest
import torch

from toprovar.pipeline import Pipeline

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
