"""Shared pytest hooks: the terminal summary of the real TensorRT-RTX engines built by tests/test_engines.py."""
from __future__ import annotations


def pytest_configure(config):
    # filled by tests/test_engines.py: one dict per (model, dtype) build
    config.toprovar_engine_builds = []


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    rows = getattr(config, "toprovar_engine_builds", [])
    if not rows:
        return
    tr = terminalreporter
    tr.section("real TensorRT-RTX engines (built on this machine's CPU)")
    tr.write_line(f"{'model':<8} {'dtype':<9} {'engines':>7} {'checked':>7} {'FAE':<14} {'build s':>8} {'cpu s':>7} "
                  f"{'MB':>7}  slowest")
    for r in rows:
        tr.write_line(f"{r['model']:<8} {r['dtype']:<9} {r['engines']:>7} {r['checked']:>7} {r['fae']:<14} "
                      f"{r['wall_s']:>8.1f} {r['cpu_s']:>7.1f} {r['mb']:>7.1f}  {r['slowest']}")
    tr.write_line(f"{sum(r['engines'] for r in rows)} engines in all; checks per engine: I/O names + dtypes, every "
                  f"profile's min/opt/max, layer list (builder report), FAE layers, manifest entry + sha256")
