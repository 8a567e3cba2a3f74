"""Shared fixtures and hooks: the tiny model's and hart-tiny's float32 exports (tests/test_export.py,
tests/test_engines.py, tests/test_hart.py, tests/test_hart_engines.py) and
the terminal summary of the real TensorRT-RTX engines built by tests/test_engines.py."""
from __future__ import annotations

import contextlib
import io
import os

import pytest


@pytest.fixture(scope="session")
def exported(tmp_path_factory):
    """The tiny model exported once through the CLI (float32): (out dir, rc, stdout, stderr)."""
    from toprovar.export import cli
    out = tmp_path_factory.mktemp("export") / "tiny"
    jobs = "2" if (os.cpu_count() or 1) >= 2 else "1"  # two export workers (spawned processes)
    stdout, stderr = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        rc = cli.main(["--model", "tiny", "--out", str(out), "--no-progress", "--jobs", jobs])
    return out, rc, stdout.getvalue(), stderr.getvalue()


@pytest.fixture(scope="session")
def hart_exported(tmp_path_factory):
    """hart-tiny exported once per session through the CLI (float32): the export directory (tests/test_hart.py,
    tests/test_hart_engines.py; copy it before writing into it)."""
    pytest.importorskip("onnxruntime")
    from toprovar.export import cli
    out = tmp_path_factory.mktemp("hart_export") / "hart-tiny"
    err = io.StringIO()
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(err):
        rc = cli.main(["--model", "hart-tiny", "--out", str(out), "--no-progress"])
    assert rc == 0, err.getvalue()
    return out


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
