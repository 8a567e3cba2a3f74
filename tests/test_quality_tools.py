"""The quality-evidence tools: the entropy probe against direct float64 statistics, bench/quality.py's sweep
grid and bootstrap, a short sweep on the shapes model, and the one-command GPU run (tools/train_scenes_gpu.py)
as a CPU smoke run on the tiny model."""
from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import numpy as np
import pytest

from toprovar.pipeline import Pipeline, resolve_schedule
from toprovar.policy.probe import FIXED_FRACTION, MIN_CLASS_SIDE, EntropyProbe, summarise_probe

ROOT = Path(__file__).resolve().parents[1]


def _load(name: str, rel: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / rel)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


quality = _load("quality", "bench/quality.py")


def fresh_seed() -> int:
    return int(np.random.SeedSequence().entropy % 2**31)


class _KeepingProbe(EntropyProbe):
    """The probe, also keeping the entropies it was given (for the reference computation)."""

    def start(self, info):
        super().start(info)
        self.seen = {}

    def observe(self, si, layer, entropy, kept):
        self.seen[si, layer] = entropy.double().numpy().copy()
        super().observe(si, layer, entropy, kept)


def _ratio(m: np.ndarray) -> float:
    s = np.linalg.svd(m, compute_uv=False)
    return s[0] / s[1]


def test_entropy_probe_matches_direct_statistics():
    seed = fresh_seed()
    pipe = Pipeline.load("tiny", seed=seed % 1000)
    probe = _KeepingProbe()
    pipe.generate(["a red circle", "three blue squares"], seed=seed, policy=probe, progress=False)
    schedule = resolve_schedule(pipe.cfg, None, 1.0)
    assert len(probe.seen) == len(schedule) * pipe.cfg.depth
    keys = np.cumsum([h * w for h, w in schedule])
    for (si, layer), e in probe.seen.items():
        h, w = schedule[si]
        for b, rec in enumerate(probe.records):
            msg = f"seed {seed}: scale {si} layer {layer} prompt {b}"
            assert rec["mean"][si][layer] == pytest.approx(e[b].mean(), rel=1e-6), msg
            # a token within float32 rounding of the threshold may fall on either side of it in the probe
            for got, thr in ((rec["rho"][si][layer], e[b].mean()),
                             (rec["rho_fixed"][si][layer], FIXED_FRACTION * math.log(keys[si]))):
                near = np.abs(e[b] - thr) <= 1e-6 * max(abs(thr), 1.0)
                below = ((e[b] < thr) & ~near).mean()
                assert below - 1e-6 <= got <= below + near.mean() + 1e-6, (msg, got, below, near.sum())
            if min(h, w) >= 2:
                m = e[b].reshape(h, w)
                assert rec["ratio_raw"][si][layer] == pytest.approx(_ratio(m), rel=1e-6), msg
                assert rec["ratio_centred"][si][layer] == pytest.approx(_ratio(m - m.mean()), rel=1e-6), msg
            else:
                assert rec["ratio_raw"][si][layer] is None, msg
    data = summarise_probe(probe.records, schedule, pipe.cfg.depth)
    S = len(schedule)
    want = [np.mean([r["rho"][s][0] for r in probe.records]) for s in range(S)]
    assert np.allclose(data["per_scale"]["rho_layer0"], want, atol=1e-12)
    assert all((c is None) == (min(schedule[s]) < MIN_CLASS_SIDE) for s, c in enumerate(data["classes"]))
    rep = data["classes"][S - 1]
    ratios = [np.mean([r["ratio_centred"][S - 1][l] for r in probe.records]) for l in range(pipe.cfg.depth)]
    assert rep["dominant"] == [l for l, r in enumerate(ratios) if r >= 2.0]
    beta = math.log(2) / (np.median(ratios) - 1)
    assert rep["beta_auto"] == pytest.approx(beta) and data["classes"][0] is None
    json.dumps(data, allow_nan=False)


def _calibration() -> dict:
    return json.loads((ROOT / "toprovar" / "weights" / "shapes" / "calibration.json").read_text())


@pytest.mark.parametrize("S,grid", [(7, "reduced"), (7, "full"), (10, "reduced"), (10, "full")])
def test_settings_cover_every_family(S, grid):
    rows = quality.settings(_calibration(), S, grid)
    fams = {f for f, _, _ in rows}
    want = {"none", "fastvar", "skipvar", "scale-exit", "toprovar-scale"}
    for stage in ("toprovar", "toprovar-scale-layer", "toprovar-scale-token"):
        want |= {stage, stage + "+restore"}
    assert fams == want and rows[0][0] == "none"
    restore = [p for f, _, p in rows if f.endswith("+restore")]
    assert restore and all(p.config.restore for p in restore)
    assert all(not p.config.restore for f, _, p in rows if f.startswith("toprovar") and not f.endswith("+restore"))
    n_tp = sum(f == "toprovar" for f, _, _ in rows)
    assert n_tp >= (3 if grid == "reduced" else 5)  # calibrated + pinned depths (+ a_max) per family
    with pytest.raises(ValueError, match="--grid"):
        quality.settings(_calibration(), S, "huge")


def test_bootstrap_intervals_and_paired_differences():
    seed = fresh_seed()
    rng = np.random.default_rng(seed)
    cats = ["a"] * 30 + ["b"] * 10
    idx = quality.stratified_indices(cats, 200, seed)
    assert all(cats[j] == cats[i] for row in idx for i, j in enumerate(row))
    correct = rng.random(40) < 0.6
    assert quality.overall(correct, cats) == pytest.approx((correct[:30].mean() + correct[30:].mean()) / 2)
    def row(fam, fl, c, ss):
        pp = {"correct": list(map(bool, c)), "ssim": list(ss), "psnr": [30.0] * 40, "relative_flops": [fl] * 40}
        return {"family": fam, "label": str(fl), "accuracy": float(quality.overall(np.asarray(c), cats)),
                "ssim": float(np.mean(ss)), "psnr": None if fam == "none" else 30.0, "relative_flops": fl,
                "per_prompt": pp}
    c1, c2, c3, c4 = (rng.random(40) < p for p in (0.4, 0.6, 0.5, 0.7))
    s1, s2, s3, s4 = (rng.uniform(0.8, 1, 40) for _ in range(4))
    rows = [row("none", 1.0, correct, np.ones(40)), row("toprovar", 0.55, c1, s1), row("toprovar", 0.8, c2, s2),
            row("fastvar", 0.45, c3, s3), row("fastvar", 0.9, c4, s4),
            row("twin", 0.55, c1, s1), row("twin", 0.8, c2, s2)]  # the same per-prompt results as toprovar
    matched = quality.bootstrap(rows, cats, 300, seed)
    for r in rows:
        lo, hi = r["ci"]["accuracy"]
        assert lo <= r["accuracy"] <= hi, f"seed {seed}: {r['family']} {r['accuracy']} not in {lo, hi}"
    assert "diff_vs_toprovar" not in matched["toprovar"]["accuracy"]["0.6"]
    twin = matched["twin"]["accuracy"]["0.6"]
    assert twin["diff_vs_toprovar"] == 0 and twin["diff_ci"] == [0.0, 0.0], f"seed {seed}"
    assert matched["toprovar"]["accuracy"]["0.5"]["value"] is None  # outside the family's FLOP range
    want = np.interp(0.6, [0.45, 0.9], [rows[3]["accuracy"], rows[4]["accuracy"]])
    assert matched["fastvar"]["accuracy"]["0.6"]["value"] == pytest.approx(want)


def test_quality_sweep_on_the_shapes_model(tmp_path):
    pytest.importorskip("matplotlib")
    pipe = Pipeline.load("shapes")
    cal_path = ROOT / "toprovar" / "weights" / "shapes" / "calibration.json"
    data = quality.run(pipe, "shapes", _calibration(), cal_path, 4, seed=fresh_seed() % 100, grid="reduced",
                       n_boot=50, progress=False, families=["toprovar", "scale-exit"])
    rows = data["rows"]
    assert [r["family"] for r in rows][0] == "none" and rows[0]["ssim"] == pytest.approx(1.0)
    assert {r["family"] for r in rows} == {"none", "toprovar", "scale-exit"}
    for r in rows:
        assert len(r["per_prompt"]["correct"]) == 4 and 0 < r["relative_flops"] <= 1.0 + 1e-9
        assert r["ci"]["accuracy"][0] <= r["accuracy"] <= r["ci"]["accuracy"][1]
    assert data["ground_truth_accuracy"] == 1.0
    paths = quality.write(data, _calibration(), tmp_path)
    assert all(p.is_file() and p.stat().st_size > 0 for p in paths)
    assert "| scale-exit |" in (tmp_path / "quality_shapes.md").read_text()


def test_one_command_gpu_run_smoke_on_cpu(tmp_path):
    """tools/train_scenes_gpu.py end to end on the tiny model: at most 8 flat files come back."""
    pytest.importorskip("matplotlib")
    mod = _load("train_scenes_gpu", "tools/train_scenes_gpu.py")
    out, work = tmp_path / "out", tmp_path / "work"
    assert mod.main(["--model", "tiny", "--device", "cpu", "--smoke", "--images", "40", "--batch", "2",
                     "--tokenizer-batch", "2", "--eval-prompts", "4", "--calib-prompts", "2", "--prompts", "5",
                     "--workers", "1", "--budget-s", "30", "--work", str(work), "--out", str(out)]) == 0
    files = sorted(p.name for p in out.iterdir())
    assert files == sorted(["train_config.json", "train_log.jsonl", "calibration.json", "entropy_tiny.json",
                            "entropy_tiny.png", "quality_tiny.json", "quality_tiny.png", "samples.png"])
    assert all((out / f).is_file() for f in files)
    q = json.loads((out / "quality_tiny.json").read_text())
    assert q["n_prompts"] == 5 and {r["family"] for r in q["rows"]} >= {"none", "toprovar", "fastvar", "skipvar"}
    assert json.loads((out / "calibration.json").read_text())["format"] == "toprovar-calibration/1"
    assert (work / "model.safetensors").is_file()


def test_gpu_run_tokenizer_alone_then_transformer_on_it(tmp_path):
    """tools/train_scenes_gpu.py --tokenizer-only returns the tokenizer file in verified parts (the device returns
    files of at most 16 MiB); joined, --train-only --tokenizer DIR trains a transformer on it (tiny model, CPU)."""
    mod = _load("train_scenes_gpu", "tools/train_scenes_gpu.py")
    common = ["--model", "tiny", "--device", "cpu", "--smoke", "--images", "32", "--batch", "2", "--tokenizer-batch",
              "2", "--eval-prompts", "4", "--workers", "1", "--budget-s", "30"]
    tok = tmp_path / "tok"
    assert mod.main(common + ["--tokenizer-only", "--work", str(tmp_path / "w1"), "--out", str(tok)]) == 0
    assert sorted(p.name for p in tok.iterdir()) == ["train_config.json", "train_log.jsonl",
                                                     "vae.safetensors.part000", "vae.safetensors.parts.json"]
    parts = _load("carry_parts", "tools/carry_parts.py")
    parts.join(tok, "vae.safetensors", tok / "vae.safetensors")
    assert (tok / "vae.safetensors").read_bytes() == (tmp_path / "w1" / "vae.safetensors").read_bytes()
    out, work = tmp_path / "out", tmp_path / "w2"
    assert mod.main(common + ["--train-only", "--tokenizer", str(tok), "--work", str(work), "--out", str(out)]) == 0
    assert (work / "vae.safetensors").read_bytes() == (tok / "vae.safetensors").read_bytes()
    assert (work / "model.safetensors").is_file()
    with pytest.raises(SystemExit, match="--tokenizer: .* holds no vae.safetensors"):
        mod.main(common + ["--tokenizer", str(tmp_path / "w2" / "nope"), "--out", str(tmp_path / "o3")])
