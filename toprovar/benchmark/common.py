"""Helpers shared by the benchmarks (``toprovar bench`` and the scripts of ``bench/``): environment record,
timing (CUDA events on CUDA, perf_counter on CPU), result files (JSON + Markdown)."""
from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import time
from pathlib import Path
from typing import Callable, Iterable

import torch


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment(device: str | torch.device | None = None) -> dict:
    """Device, driver, torch, CUDA and cuDNN versions of this run (the CPU's name and core count when
    ``device`` is a CPU, or when CUDA is unavailable)."""
    env = {"torch": torch.__version__, "cuda": torch.version.cuda, "python": platform.python_version()}
    dev = torch.device(device) if device is not None else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if dev.type == "cuda" and torch.cuda.is_available():
        p = torch.cuda.get_device_properties(dev)
        env.update(device=p.name, sm_count=p.multi_processor_count, memory_gib=round(p.total_memory / 2**30, 1),
                   cudnn=torch.backends.cudnn.version())
        try:
            env["driver"] = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                           capture_output=True, text=True, timeout=20).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            env["driver"] = None
    else:
        env.update(device=f"cpu ({_cpu_name()})", cpu_count=os.cpu_count(), threads=torch.get_num_threads(),
                   driver=None)
    return env


def timing_method(device: str | torch.device) -> str:
    """How ``time_fn`` measures on ``device`` (recorded with the results)."""
    return "CUDA events" if torch.device(device).type == "cuda" else "perf_counter"


def time_fn(fn: Callable[[], object], device: str | torch.device = "cuda", warmup: int = 1, runs: int = 5) -> dict:
    """Median/min/max milliseconds of ``fn`` after ``warmup`` calls: CUDA events on a CUDA device (one
    synchronisation after each run), ``time.perf_counter`` on the CPU."""
    cuda = torch.device(device).type == "cuda"
    for _ in range(warmup):
        fn()
    if cuda:
        torch.cuda.synchronize()
    times = []
    for _ in range(runs):
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return {"median_ms": statistics.median(times), "min_ms": min(times), "max_ms": max(times), "runs": runs}


def time_paired(fn_a: Callable[[], object], fn_b: Callable[[], object], device: str | torch.device = "cuda",
                warmup: int = 1, runs: int = 10) -> dict:
    """Alternate ``fn_a`` and ``fn_b`` (a, b, a, b, ...) after ``warmup`` calls of each and time every call
    (``time_fn``'s clocks): a slow drift of the device (clocks, temperature) hits both alike, so the median
    of the paired differences a_i - b_i resolves a small difference that two separate medians cannot.
    Returns {"a": timing, "b": timing, "diff": timing of a_i - b_i} (median/min/max milliseconds, runs)."""
    for _ in range(warmup):
        fn_a()
        fn_b()
    ta, tb = [], []
    for _ in range(runs):
        ta.append(time_fn(fn_a, device, 0, 1)["median_ms"])
        tb.append(time_fn(fn_b, device, 0, 1)["median_ms"])

    def stats(v):
        return {"median_ms": statistics.median(v), "min_ms": min(v), "max_ms": max(v), "runs": runs}
    return {"a": stats(ta), "b": stats(tb), "diff": stats([a - b for a, b in zip(ta, tb)])}


def time_cuda(fn: Callable[[], object], warmup: int = 1, runs: int = 5) -> dict:
    """``time_fn`` on CUDA (CUDA events)."""
    return time_fn(fn, "cuda", warmup, runs)


def markdown_table(table: list[dict]) -> list[str]:
    """Rows of dicts -> Markdown table lines: the columns of all rows in first-seen order, floats with 3
    decimals, a column a row lacks (a skipped row) left empty."""
    if not table:
        return []
    cols = list(dict.fromkeys(c for row in table for c in row))
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for row in table:
        lines.append("| " + " | ".join(f"{row[c]:.3f}" if isinstance(row.get(c), float) else str(row.get(c, ""))
                                        for c in cols) + " |")
    return lines


def write_results(name: str, payload: dict, table: list[dict], title: str, out_dir: str | Path,
                  sections: Iterable[str] = ()) -> Path:
    """Write ``name``.json (payload incl. environment) and ``name``.md (title, environment, table, then the
    Markdown ``sections``) into ``out_dir``; returns the Markdown path."""
    from ..outputs import atomic_write_files
    out_dir = Path(out_dir)
    env = payload.setdefault("environment", environment())
    text = json.dumps(payload, indent=2, default=str) + "\n"
    lines = [f"# {title}", "", "Device: " + ", ".join(f"{k} {v}" for k, v in env.items()), ""]
    lines += markdown_table(table)
    for sec in sections:
        lines += ["", sec.rstrip("\n")]
    md = "\n".join(lines) + "\n"
    return atomic_write_files({out_dir / f"{name}.json": lambda tmp: Path(tmp).write_text(text),
                               out_dir / f"{name}.md": lambda tmp: Path(tmp).write_text(md)}, "--out")[1]
