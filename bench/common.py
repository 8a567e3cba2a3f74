"""Shared helpers of the bench/ scripts, from ``toprovar.benchmark.common`` (one implementation); here only
the default results folder (bench/results) is added. Importing this module puts the repository root first
on sys.path, so the scripts use this checkout's ``toprovar``."""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Iterable

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from toprovar.benchmark import common as _common  # noqa: E402
from toprovar.benchmark.common import environment, markdown_table, time_cuda, time_fn, timing_method  # noqa: E402,F401

RESULTS = Path(__file__).resolve().parent / "results"
__all__ = ["RESULTS", "ROOT", "environment", "graphed", "markdown_table", "time_cuda", "time_fn", "timing_method", "write_results"]


def write_results(name: str, payload: dict, table: list[dict], title: str, out_dir: Path = RESULTS,
                  sections: Iterable[str] = ()) -> Path:
    """``toprovar.benchmark.common.write_results`` with bench/results as the default folder."""
    return _common.write_results(name, payload, table, title, out_dir, sections)


def graphed(fn):
    """fn() captured in a CUDA graph after a warm-up call on a side stream -> (replay callable, graph)."""
    import torch
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        fn()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fn()
    return g.replay, g
