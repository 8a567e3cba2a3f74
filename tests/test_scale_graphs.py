"""Scale-graph plan bookkeeping when a capture fails (CPU: the plans' graphs are not needed to decide what is
kept; capture and replay themselves run in tests/gpu/test_pipeline_gpu.py)."""
from __future__ import annotations

import pytest
import torch

from toprovar.runtime.scale_graphs import ScaleGraphs, ScalePlan


class GraphingBackend:
    capture_scales = True


def replaying(key: tuple) -> ScalePlan:
    plan = ScalePlan(key, policy=None, binding=(), pool=None)
    plan.capturing = False
    return plan


def test_capture_out_of_memory_drops_the_other_plans_once_then_runs_eagerly():
    graphs = ScaleGraphs(GraphingBackend(), max_plans=8)
    for b in (1, 2, 4):
        graphs._plans[("none", b)] = replaying(("none", b))
    assert [graphs.mode(b) for b in (1, 2, 4, 16)] == ["graphs", "graphs", "graphs", "eager"]
    oom = torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 550.00 MiB")
    with pytest.warns(RuntimeWarning, match=r"policy 'none', batch 16 ran out of memory; dropped the 3 other plan"):
        graphs.fail(ScalePlan(("none", 16), None, (), None), oom)
    assert [graphs.mode(b) for b in (1, 2, 4, 16)] == ["eager"] * 4  # dropped; batch 16 not marked failed
    # the rerun's capture runs out of memory again with nothing else held: batch 16 runs eagerly from then on
    with pytest.warns(RuntimeWarning, match="scale graphs disabled for policy 'none'"):
        graphs.fail(ScalePlan(("none", 16), None, (), None), oom)
    assert graphs.mode(16).startswith("eager (capture failed: OutOfMemoryError: CUDA out of memory")


def test_other_capture_failures_keep_the_other_plans():
    graphs = ScaleGraphs(GraphingBackend(), max_plans=8)
    graphs._plans[("none", 2)] = replaying(("none", 2))
    with pytest.warns(RuntimeWarning, match="scale graphs disabled for policy 'none'"):
        graphs.fail(ScalePlan(("none", 8), None, (), None), RuntimeError("operation not permitted when capturing"))
    assert graphs.mode(2) == "graphs"
    assert graphs.mode(8) == "eager (capture failed: RuntimeError: operation not permitted when capturing)"
