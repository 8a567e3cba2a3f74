"""Before/after comparison (``toprovar.benchmark.compare``, bench/compare_e2e.py) on two real end-to-end benchmark
JSONs: ``tiny`` on the CPU with the VAE in float32, then in bfloat16 (``--vae-dtype``)."""
from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from toprovar.benchmark.compare import Change, compare, load_run, piece_ms
from toprovar.benchmark.e2e import add_bench_args, run_benchmark

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    out = tmp_path_factory.mktemp("e2e")
    paths = []
    for vd in ("float32", "bfloat16"):
        p = argparse.ArgumentParser()
        add_bench_args(p)
        args = p.parse_args(["--model", "tiny", "--device", "cpu", "--policies", "none,toprovar", "--runs", "1",
                             "--warmup", "0", "--overhead-runs", "1", "--vae-dtype", vd, "--out", str(out),
                             "--name", f"tiny_{vd}"])
        run_benchmark(args)
        paths.append(out / f"tiny_{vd}.json")
    return paths


def test_vae_dtype_recorded(runs):
    assert [load_run(p)["vae_dtype"] for p in runs] == ["float32", "bfloat16"]


def test_compare_rows_and_changes(runs):
    before, after = (load_run(p) for p in runs)
    rows, crows = compare(before, after, [Change.parse("vae-bf16:decode:0.5")])
    assert {r["policy"] for r in rows} == {"none", "toprovar"}
    for r in rows:
        b = piece_ms(before["runs"][r["policy"]])[r["piece"]]
        a = piece_ms(after["runs"][r["policy"]])[r["piece"]]
        assert (r["before ms"], r["after ms"]) == (b, a) and math.isclose(r["saved ms"], b - a)
    pieces = {r["piece"] for r in rows}
    assert {"decode", "condition", "scales", "latency", "dense"} <= pieces
    dec = {c["policy"]: c for c in crows}
    for pol, c in dec.items():
        assert c["predicted ms"] == 0.5
        assert math.isclose(c["measured ms"], before["runs"][pol]["stage_ms"]["decode"]
                            - after["runs"][pol]["stage_ms"]["decode"])


def test_cli_writes_tables_and_refuses_bad_input(runs, tmp_path):
    script = str(ROOT / "bench" / "compare_e2e.py")
    r = subprocess.run([sys.executable, script, str(runs[0]), str(runs[1]), "-o", str(tmp_path),
                        "--change", "vae:decode:1.5"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    data = json.loads((tmp_path / "e2e_compare.json").read_text())
    assert data["changes"][0]["change"] == "vae" and data["settings"]["vae_dtype"] == ["float32", "bfloat16"]
    assert "predicted vs measured" in (tmp_path / "e2e_compare.md").read_text()
    for argv, msg in ((["--change", "vae:nopiece:1"], "piece 'nopiece'"), (["--change", "vae:decode"], "--change"),
                      ([], None)):
        args = [str(runs[0]), str(tmp_path / "missing.json")] if not argv else [str(runs[0]), str(runs[1]), *argv]
        r = subprocess.run([sys.executable, script, *args, "-o", str(tmp_path / "x")], capture_output=True, text=True)
        assert r.returncode != 0 and len(r.stderr.strip().splitlines()) == 1
        assert (msg or "missing.json") in r.stderr
        assert not (tmp_path / "x").exists()
