"""``toprovar bench`` and the profiled per-scale x per-piece timing (CPU, tiny model).

The pieces of a scale are timed between marks placed between them (``_Timer.lap``), so they must add up
to the scale's own start..stop time; a backend or policy made slow on purpose must show up in its piece;
profiling must not change a single bit of the result.
"""
from __future__ import annotations

import importlib.util
import json
import sys
import time
from pathlib import Path

import pytest
import torch

from toprovar.benchmark.breakdown import breakdown_rows, check_pieces, piece_totals
from toprovar.benchmark.e2e import build_policy, operating_point
from toprovar.cli import main
from toprovar.pipeline import Pipeline
from toprovar.policy import POLICIES, make_policy
from toprovar.runtime.orchestrator import PIECES

ROOT = Path(__file__).resolve().parents[1]
RUN_KEYS = {"latency", "scale_ms", "stage_ms", "piece_ms", "piece_total_ms", "piece_check", "tokens", "kept",
            "relative_flops", "flops", "scale_kept_fraction", "skipped_scales", "policy"}


@pytest.fixture(scope="module")
def pipe():
    return Pipeline.load("tiny", seed=0)


def _text(pipe):
    return pipe.text_encoder.encode(["two red circles left of a blue square"])


def _pinned(pipe):
    return build_policy("toprovar", pipe.cfg.depth, None, 7)


def _pruned_scales(res) -> set[int]:
    return {si for si, ks in res.trace.kept.items() if any(0 < k < res.trace.tokens[si] for k in ks)}


# ------------------------------------------------------------------------------------------ CLI
def test_cli_bench_tiny_writes_json_and_markdown(tmp_path, capsys):
    assert main(["bench", "--model", "tiny", "--device", "cpu", "--runs", "1", "--warmup", "0",
                 "--policies", "none,toprovar", "--overhead-runs", "2", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    js, md = tmp_path / "e2e_tiny.json", tmp_path / "e2e_tiny.md"
    assert str(js) in out and str(md) in out
    data = json.loads(js.read_text())
    assert {"model", "resolution", "dtype", "batch", "cfg", "cuda_graphs", "peak_tflops", "operating_point", "runs",
            "environment", "note", "device", "timing"} <= set(data)
    assert (data["model"], data["resolution"], data["dtype"], data["device"], data["timing"]) == (
        "tiny", 64, "float32", "cpu", "perf_counter")
    assert data["operating_point"] == operating_point(4, 7)
    assert {"torch", "cuda", "python", "device", "driver"} <= set(data["environment"])
    assert set(data["runs"]) == {"none", "toprovar"}
    for name, run in data["runs"].items():
        assert RUN_KEYS <= set(run), name
        assert len(run["scale_ms"]) == 7 and set(run["stage_ms"]) == {"condition", "decode"}
        assert sorted(int(k) for k in run["piece_ms"]) == list(range(7))
        assert run["piece_check"] == [], run["piece_check"]
        assert run["latency"]["runs"] == 1 and run["latency"]["median_ms"] > 0
    top = data["runs"]["toprovar"]
    assert {"replay_latency", "policy_overhead_ms", "overhead_paired", "report"} <= set(top)
    pair = top["overhead_paired"]
    assert pair["diff"]["min_ms"] <= top["policy_overhead_ms"] <= pair["diff"]["max_ms"]
    assert top["relative_flops"] < 1.0 and top["report"]["D"] == 3
    pruned = {int(si) for si, d in top["piece_ms"].items() if "pruned" in d}
    assert pruned == {3, 4, 5, 6}
    assert not any("pruned" in d or "gather_scatter" in d for d in data["runs"]["none"]["piece_ms"].values())

    text = md.read_text()
    assert text.startswith("# End to end, tiny 64px fp32, batch 1 + CFG (median of 1, perf_counter)")
    assert "| policy | latency ms | speedup | rel. FLOPs |" in text
    for name in ("none", "toprovar"):
        assert f"## Where the time goes: {name}" in text
    sec = text.split("## Where the time goes: toprovar")[1]
    header = next(ln for ln in sec.splitlines() if ln.startswith("| scale |"))
    cols = [c.strip() for c in header.strip("|").split("|")]
    assert cols[:4] == ["scale", "tokens", "kept", "scale ms"] and cols[-1] == "pieces sum"
    assert {"dense", "pruned", "policy", "gather_scatter", "head", "sampling", "next_input"} <= set(cols)
    rows = [ln for ln in sec.splitlines() if ln.startswith("| ") and not ln.startswith("| scale |")]
    assert [r.split("|")[1].strip() for r in rows] == [str(i) for i in range(7)] + [
        "all scales", "text conditioning", "VAE decode"]


def test_cli_bench_errors_are_one_line(tmp_path, capsys):
    assert main(["bench", "--model", "tiny", "--device", "cpu", "--policies", "none,nope",
                 "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"toprovar: error: --policies: unknown policy 'nope'; choose from {sorted(POLICIES)}"]
    assert not list(tmp_path.iterdir())


def test_bench_script_and_common_use_the_package(monkeypatch):
    monkeypatch.setattr(sys, "path", list(sys.path))  # bench/e2e.py puts bench/ on sys.path
    monkeypatch.delitem(sys.modules, "common", raising=False)
    spec = importlib.util.spec_from_file_location("bench_e2e", ROOT / "bench" / "e2e.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    results = str(ROOT / "bench" / "results")
    assert mod.translate(["--model", "infinity-8b", "--out", "e2e_8b_eager", "--no-cuda-graphs"]) == [
        "bench", "--out", results, "--model", "infinity-8b", "--name", "e2e_8b_eager", "--no-cuda-graphs"]
    assert mod.translate(["--out=x"]) == ["bench", "--out", results, "--name=x"]
    import common  # bench/common.py, importable once bench/e2e.py has run
    from toprovar.benchmark import common as pkg
    assert common.time_cuda is pkg.time_cuda and common.environment is pkg.environment
    assert common.RESULTS == ROOT / "bench" / "results"
    sys.modules.pop("common", None)


# ------------------------------------------------------------------------------------------ per-piece timing
@pytest.mark.parametrize("policy", ["none", "toprovar-pinned", "fastvar-public"])
def test_pieces_sum_to_scale_time(pipe, policy):
    text, lengths = _text(pipe)
    pol = _pinned(pipe) if policy == "toprovar-pinned" else make_policy(policy)
    res = pipe.generate_from_features(text, lengths, seed=3, policy=pol, profile=True, progress=False)
    assert len(res.scale_ms) == len(res.bits) and sorted(res.piece_ms) == list(range(len(res.bits)))
    for si, total in enumerate(res.scale_ms):
        pieces = res.piece_ms[si]
        assert set(pieces) <= set(PIECES) and all(v >= 0 for v in pieces.values())
        assert list(pieces) == [p for p in PIECES if p in pieces]  # report order
        s = sum(pieces.values())
        assert abs(s - total) <= max(0.10 * total, 2.0), (si, s, total, pieces)
        assert {"head", "sampling", "next_input", "other"} <= set(pieces)
    assert check_pieces(res.scale_ms, res.piece_ms) == []
    pruned = _pruned_scales(res)
    with_pruned = {si for si, d in res.piece_ms.items() if "pruned" in d}
    assert with_pruned == pruned
    if policy == "none":
        assert not pruned
    else:
        assert pruned, "the policy pruned nothing: the pruned piece is not covered"
    if policy == "toprovar-pinned":  # gather/scatter exactly where tokens were pruned
        assert {si for si, d in res.piece_ms.items() if "gather_scatter" in d} == pruned
        assert pruned == {3, 4, 5, 6}
    tot = piece_totals(res.piece_ms)
    assert sum(tot.values()) == pytest.approx(sum(sum(d.values()) for d in res.piece_ms.values()))


def test_pieces_attributed_where_the_time_goes(pipe, monkeypatch):
    """Slowing one piece kind down by a known amount shows up in that piece, not elsewhere."""
    text, lengths = _text(pipe)
    pol = _pinned(pipe)
    pipe.generate_from_features(text, lengths, seed=3, policy=pol, progress=False)  # orchestrator built
    be = next(iter(pipe._orchestrators.values())).backend
    delay = {"head_logits": 0.004, "next_input": 0.006}

    def slow(name, fn):
        def run(*a, **k):
            time.sleep(delay[name])
            return fn(*a, **k)
        return run

    for name in delay:
        monkeypatch.setattr(be, name, slow(name, getattr(be, name)))
    keep = pol.keep

    def slow_keep(si, layer, n):  # 3 ms of policy work per layer
        time.sleep(0.003)
        return keep(si, layer, n)

    monkeypatch.setattr(pol, "keep", slow_keep)
    res = pipe.generate_from_features(text, lengths, seed=3, policy=pol, profile=True, progress=False)
    depth = pipe.cfg.depth
    for si, d in res.piece_ms.items():
        assert d["head"] >= 4.0 and d["policy"] >= 3.0 * depth, (si, d)
        assert d["sampling"] < 4.0 and d["other"] < 3.0, (si, d)
        assert d["next_input"] >= 6.0, (si, d)
        assert abs(sum(d.values()) - res.scale_ms[si]) <= max(0.10 * res.scale_ms[si], 2.0)


def test_breakdown_rows_from_a_profiled_run(pipe):
    text, lengths = _text(pipe)
    res = pipe.generate_from_features(text, lengths, seed=3, policy=_pinned(pipe), profile=True, progress=False)
    run = json.loads(json.dumps({"tokens": res.trace.tokens, "kept": res.trace.kept, "scale_ms": res.scale_ms,
                                 "stage_ms": res.stage_ms, "piece_ms": res.piece_ms}))  # as in the JSON file
    rows = breakdown_rows(run, pipe.cfg.depth)
    assert [r["scale"] for r in rows] == [str(i) for i in range(7)] + ["all scales", "text conditioning",
                                                                        "VAE decode"]
    assert rows[0]["pruned"] == "-" and isinstance(rows[6]["pruned"], float)
    assert rows[3]["kept"] == pytest.approx(sum(res.trace.kept[3]) / (36 * pipe.cfg.depth))
    assert rows[7]["scale ms"] == pytest.approx(sum(res.scale_ms))
    assert rows[7]["pieces sum"] == pytest.approx(sum(sum(d.values()) for d in res.piece_ms.values()))


# ------------------------------------------------------------------------------------------ profiling is invisible
@pytest.mark.parametrize("policy", ["none", "toprovar", "toprovar-pinned", "fastvar"])
def test_profile_does_not_change_the_result(pipe, policy):
    text, lengths = pipe.text_encoder.encode(["a red square", "two green triangles"])

    def run(profile):
        pol = _pinned(pipe) if policy == "toprovar-pinned" else make_policy(policy)
        return pipe.generate_from_features(text, lengths, seed=5, policy=pol, profile=profile, progress=False)

    a, b = run(False), run(True)
    assert torch.equal(a.images, b.images)
    assert len(a.bits) == len(b.bits) and all(torch.equal(x, y) for x, y in zip(a.bits, b.bits))
    assert a.trace.kept == b.trace.kept
    assert a.scale_ms == [] and a.stage_ms == {} and a.piece_ms == {}
    assert len(b.piece_ms) == len(b.bits)


def test_time_paired_resolves_a_difference():
    """Alternating calls: the median paired difference recovers a fixed 8 ms extra cost of one function."""
    import time
    from toprovar.benchmark.common import time_paired
    res = time_paired(lambda: time.sleep(0.010), lambda: time.sleep(0.002), "cpu", warmup=1, runs=6)
    assert res["a"]["runs"] == res["b"]["runs"] == res["diff"]["runs"] == 6
    assert 6.0 < res["diff"]["median_ms"] < 20.0
    assert res["diff"]["min_ms"] <= res["diff"]["median_ms"] <= res["diff"]["max_ms"]


def test_small_mm_shapes_are_the_blocks_per_scale_products(monkeypatch):
    """bench/small_mm.py times one scale's block products: the shapes it takes from the config are the real
    block's Linear weights in forward order, the text K/V projection (once per generation) left out."""
    monkeypatch.setattr(sys, "path", [str(ROOT / "bench")] + list(sys.path))
    monkeypatch.delitem(sys.modules, "common", raising=False)
    spec = importlib.util.spec_from_file_location("bench_small_mm", ROOT / "bench" / "small_mm.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    from toprovar.config import get_config
    from toprovar.model.infinity import build_model
    block = build_model(get_config("tiny"), seed=0).blocks[0]
    linears = {n: m.weight.shape for n, m in block.named_modules() if isinstance(m, torch.nn.Linear)}
    shapes = mod.block_shapes("tiny")
    assert [s[0] for s in shapes] == [n for n in linears if n != "ca.mat_kv"]
    assert all(tuple(linears[n]) == (N, K) for n, N, K in shapes)
    C = get_config("infinity-2b").width
    assert sum(N * K for _, N, K in mod.block_shapes("infinity-2b")) == 14 * C * C
    sys.modules.pop("common", None)


def test_checker_sharpness_script(tmp_path, monkeypatch):
    """bench/checker_sharpness.py on a few scenes: the clean ground truth scores 1.0, degraded copies have a
    finite PSNR, JSON and Markdown are written."""
    monkeypatch.setattr(sys, "path", [str(ROOT / "bench")] + list(sys.path))
    monkeypatch.delitem(sys.modules, "common", raising=False)
    spec = importlib.util.spec_from_file_location("bench_checker_sharpness", ROOT / "bench" / "checker_sharpness.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    assert mod.main(["--images", "5", "--seed", str(int(torch.randint(0, 2**31 - 1, ()))), "--blur", "1.0",
                     "--noise", "10", "--out", str(tmp_path)]) == 0
    rows = json.loads((tmp_path / "checker_sharpness.json").read_text())["rows"]
    assert [r["degradation"] for r in rows] == ["clean", "blur", "noise"] and rows[0]["checker overall"] == 1.0
    assert all(20 < r["PSNR dB"] < 60 for r in rows[1:]) and (tmp_path / "checker_sharpness.md").is_file()
    sys.modules.pop("common", None)
