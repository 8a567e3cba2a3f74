"""bench/serve.py on the CPU (tiny model): results rewritten after every measured row, rows past
``--time-budget`` skipped and recorded as skipped, the row-cost estimate."""
from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _serve_bench():
    sys.path.insert(0, str(ROOT / "bench"))
    spec = importlib.util.spec_from_file_location("bench_serve", ROOT / "bench" / "serve.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_offline_rows_written_one_by_one(tmp_path, monkeypatch):
    mod = _serve_bench()
    seen = []
    real = mod.write_results

    def spy(name, payload, table, *a, **kw):
        seen.append([(r["policy"], r["batch"]) for r in table])
        return real(name, payload, table, *a, **kw)

    monkeypatch.setattr(mod, "write_results", spy)
    assert mod.main(["--model", "tiny", "--device", "cpu", "--batch-sizes", "1,2", "--policies", "none,toprovar",
                     "--runs", "1", "--warmup", "0", "--no-serve", "--out", str(tmp_path)]) == 0
    rows = [("none", 1), ("none", 2), ("toprovar", 1), ("toprovar", 2)]
    assert seen[:4] == [rows[:k] for k in range(1, 5)]  # one write per measured row, then the final one
    data = json.loads((tmp_path / "serve_tiny.json").read_text())
    for p, b in rows:
        run = data["offline"][f"{p}/B{b}"]
        assert run["graphs"] == "eager (CPU)" and run["latency"]["median_ms"] > 0
    assert "| graphs |" in (tmp_path / "serve_tiny.md").read_text()


def test_rows_past_the_time_budget_are_skipped(tmp_path):
    mod = _serve_bench()
    assert mod.main(["--model", "tiny", "--device", "cpu", "--batch-sizes", "1,2", "--policies", "none",
                     "--runs", "1", "--warmup", "0", "--no-serve", "--time-budget", "0", "--out", str(tmp_path)]) == 0
    data = json.loads((tmp_path / "serve_tiny.json").read_text())
    for b in (1, 2):
        run = data["offline"][f"none/B{b}"]
        assert run["skipped"].startswith("skipped: time budget") and "latency" not in run
    assert (tmp_path / "serve_tiny.md").read_text().count("skipped: time budget") == 2


def test_row_estimate_and_budget():
    mod = _serve_bench()
    walls = {("none", 1): 10.0, ("none", 2): 18.0, ("toprovar", 1): 6.0}
    assert mod.row_estimate(walls, "none", 8) == 18.0 * 4  # the policy's last row, scaled by batch
    assert mod.row_estimate(walls, "skipvar", 2) == 18.0  # unseen policy: the same batch of another one
    assert mod.row_estimate(walls, "skipvar", 16) == 0.0  # nothing known
    budget = mod.Budget(100.0)
    assert budget.skip(10.0) is None
    assert budget.skip(1e6).startswith("skipped: time budget")
    assert mod.Budget(None).skip(1e9) is None
