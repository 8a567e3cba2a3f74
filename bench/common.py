"""Shared helpers of the GPU benchmarks: environment record, CUDA-event timing, result files."""
from __future__ import annotations

import json
import platform
import statistics
import subprocess
from pathlib import Path
from typing import Callable

import torch

RESULTS = Path(__file__).resolve().parent / "results"


def environment() -> dict:
    """Device, driver, torch, CUDA and cuDNN versions of this run."""
    env = {"torch": torch.__version__, "cuda": torch.version.cuda, "python": platform.python_version()}
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        env.update(device=p.name, sm_count=p.multi_processor_count, memory_gib=round(p.total_memory / 2**30, 1),
                   cudnn=torch.backends.cudnn.version())
        try:
            env["driver"] = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                           capture_output=True, text=True, timeout=20).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            env["driver"] = None
    return env


def time_cuda(fn: Callable[[], object], warmup: int = 1, runs: int = 5) -> dict:
    """Median/min/max milliseconds of ``fn`` by CUDA events after ``warmup`` calls."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(runs):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return {"median_ms": statistics.median(times), "min_ms": min(times), "max_ms": max(times), "runs": runs}


def write_results(name: str, payload: dict, table: list[dict], title: str, out_dir: Path = RESULTS) -> Path:
    """Write ``name``.json (payload incl. environment) and ``name``.md (title, environment, table)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    env = payload.setdefault("environment", environment())
    (out_dir / f"{name}.json").write_text(json.dumps(payload, indent=2, default=str) + "\n")
    lines = [f"# {title}", "", "Device: " + ", ".join(f"{k} {v}" for k, v in env.items()), ""]
    if table:
        cols = list(table[0])
        lines += ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
        for row in table:
            lines.append("| " + " | ".join(f"{row[c]:.3f}" if isinstance(row[c], float) else str(row[c])
                                            for c in cols) + " |")
    (out_dir / f"{name}.md").write_text("\n".join(lines) + "\n")
    return out_dir / f"{name}.md"
