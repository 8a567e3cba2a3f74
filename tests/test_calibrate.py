"""``toprovar calibrate``: the tau / beta rules by hand, the recorder against the policy, the JSON round
trip through make_policy and the CLI, clear errors."""
from __future__ import annotations

import json
import math

import pytest
import torch

from toprovar.cli import main
from toprovar.pipeline import Pipeline
from toprovar.policy import ToProVARConfig, ToProVARPolicy, make_policy, policy_report
from toprovar.policy.base import CALIBRATION_FORMAT
from toprovar.policy.calibrate import (CalibrationRecorder, calibrate, choose_beta, choose_tau, config_from_sets,
                                       read_prompts, summarise, write_calibration)
from toprovar.policy.stats import layer_score


def fresh_seed() -> int:
    return int(torch.seed() % 2**31)


@pytest.fixture(scope="module")
def pipe():
    return Pipeline.load("tiny", seed=2)


@pytest.mark.parametrize("rho_bar,tau,onset", [
    ([0.0, 0.2, 0.3, 0.42, 0.5, 0.44, 0.41], 0.42, 3),   # enters the band at scale 3 and stays >= 0.35
    ([0.0, 0.5, 0.2, 0.38, 0.40], 0.38, 3),              # scale 1 is above, but rho falls back below 0.35
    ([0.0, 0.1, 0.7, 0.8], 0.45, 2),                     # jumps over the band: clipped to its top
    ([0.0, 0.36, 0.37], 0.36, 1),
    ([0.0, 0.1, 0.2], 0.4, None),                        # never enters: tau = target, entered false
])
def test_tau_band_rule_by_hand(rho_bar, tau, onset):
    got, info = choose_tau(rho_bar, "band", 0.4, 0.05)
    assert got == pytest.approx(tau) and info["onset_scale"] == onset and info["entered"] == (onset is not None)


def test_tau_fixed_rule_and_errors():
    assert choose_tau([0.0, 0.9], "fixed", 0.4)[0] == 0.4
    with pytest.raises(ValueError, match="--tau-rule: must be one of"):
        choose_tau([0.1], "median")
    with pytest.raises(ValueError, match="--tau-target: must be in"):
        choose_tau([0.1], "band", 1.5)


def test_beta_auto_gives_median_layer_half_score():
    beta, info = choose_beta([1.5, 2.0, 3.0, math.inf])  # median of the finite ratios: 2.0
    assert beta == pytest.approx(math.log(2)) and layer_score(2.0, beta) == pytest.approx(0.5)
    assert choose_beta([1.0, 1.0], "auto", default=0.7)[0] == 0.7  # all isotropic: keep the default
    assert choose_beta([5.0], 0.25)[0] == 0.25
    with pytest.raises(ValueError, match="--beta: must be 'auto' or a number > 0"):
        choose_beta([2.0], -1.0)


def test_recorder_matches_policy_statistics(pipe):
    """Per-prompt rho / mean entropy of the recorder == what the ToProVAR policy computes online (tau = 1:
    D is never reached, so the policy records rho at every scale); layer ratios == the online R's input."""
    seed = fresh_seed()
    prompt = ["a cyber fox"]
    cfg = ToProVARConfig(stage="full", tau=1.0)
    rec = CalibrationRecorder(cfg)
    pipe.generate(prompt, seed=seed, policy=rec, progress=False)
    pol = ToProVARPolicy(cfg)
    pipe.generate(prompt, seed=seed, policy=pol, progress=False)
    r = rec.records[0]
    assert pol.D is None
    for si in range(7):
        assert r["rho"][si] == pytest.approx(pol.rho[si], abs=1e-7), (si, seed)
        assert r["mean_entropy"][si] == pytest.approx(pol.mean_entropy[si], rel=1e-6), (si, seed)
    assert r["layer_ratio"] == pytest.approx(pol.ratio, rel=1e-9)


def test_calibration_json_round_trip_and_generation(pipe, tmp_path):
    prompts = ["a cyber fox", "the letter W", "two red apples"]
    data = calibrate(pipe, prompts, ToProVARConfig(), seed=fresh_seed(), batch=2)
    assert data["format"] == CALIBRATION_FORMAT and data["prompts"] == 3 and data["depth"] == 4
    assert len(data["per_scale"]["rho"]) == 7 and len(data["per_scale"]["mean_entropy"]) == 7
    assert data["per_scale"]["rho"][0] == 0.0  # one token: nothing below its own mean
    assert len(data["layers"]["score"]) == 4 and data["rep_scale"] == 3
    pol = data["policy"]
    assert pol["layer_score_mode"] == "static" and pol["layer_scores"] == pytest.approx(data["layers"]["score"])
    assert 0.35 <= pol["tau"] <= 0.45 and sum(data["depth_histogram"].values()) == 3
    path = write_calibration(tmp_path / "cal" / "tiny.json", data)
    assert [p.name for p in path.parent.iterdir()] == ["tiny.json"]  # atomic: no temporary left behind
    for name in ("toprovar", "toprovar-scale-layer", "fastvar", "none"):
        policy = make_policy(name, str(path))
        res = pipe.generate(["a cyber fox"], seed=1, policy=policy, progress=False)
        assert policy_report(res.trace, pipe.cfg)["relative_flops"] <= 1.0
        if isinstance(policy, ToProVARPolicy):
            assert policy.config.layer_scores == tuple(pol["layer_scores"]) and policy.config.tau == pol["tau"]
            assert policy.R == list(pol["layer_scores"])  # static: known from scale 0
    assert make_policy("toprovar-scale", str(path)).config.stage == "scale"


def test_calibration_for_another_model_is_a_clear_error(pipe, tmp_path):
    data = {"format": CALIBRATION_FORMAT, "model": "infinity-2b", "depth": 32,
            "policy": ToProVARConfig(layer_score_mode="static", layer_scores=(0.5,) * 32).to_dict()}
    path = tmp_path / "2b.json"
    path.write_text(json.dumps(data))
    with pytest.raises(ValueError, match=r"--calibration: .*2b\.json: made for a 32-layer model"):
        pipe.generate(["x"], policy=make_policy("toprovar", str(path)), progress=False)
    data["policy"]["a_max"] = 3.0
    path.write_text(json.dumps(data))
    with pytest.raises(ValueError, match=r"--calibration: .*: ToProVARConfig\.a_max: must be"):
        make_policy("toprovar", str(path))
    path.write_text("{not json")
    with pytest.raises(ValueError, match="not a JSON file"):
        make_policy("toprovar", str(path))


def test_summarise_handles_rank_one_layers():
    recs = [{"rho": [0.0, 0.5], "mean_entropy": [0.0, 1.0], "layer_ratio": [math.inf, 2.0],
             "layer_mean_entropy": [1.0, 1.0]}]
    out = summarise(recs, [(1, 1), (2, 2)], 2, ToProVARConfig(), beta=1.0)
    assert out["layers"]["ratio"] == [None, 2.0]  # JSON has no inf
    assert out["layers"]["score"] == pytest.approx([0.0, math.exp(-1.0)])
    json.dumps(out, allow_nan=False)


def test_config_from_sets():
    cfg = config_from_sets(["rep_scale=2", "rho_layers=[0, 1]", "full_layers=[0, 1]", "stage=scale"])
    assert cfg.rep_scale == 2 and cfg.rho_layers == (0, 1) and cfg.stage == "scale"
    with pytest.raises(ValueError, match=r"ToProVARConfig\.nope: unknown parameter"):
        config_from_sets(["nope=1"])
    with pytest.raises(ValueError, match="--set: expected FIELD=VALUE"):
        config_from_sets(["rep_scale"])


def test_cli_calibrate_then_generate(tmp_path, capsys):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("# calibration prompts\na cyber fox\n\nthe letter W\n")
    assert read_prompts(prompts) == ["a cyber fox", "the letter W"]
    out = tmp_path / "cal.json"
    assert main(["calibrate", "--model", "tiny", "--prompts", str(prompts), "--prompt", "a blue bird",
                 "-o", str(out), "--device", "cpu", "--seed", "4", "--tau-rule", "fixed"]) == 0
    assert str(out) in capsys.readouterr().out
    data = json.loads(out.read_text())
    assert data["prompts"] == 3 and data["policy"]["tau"] == 0.4 and data["tau_rule"]["rule"] == "fixed"
    png = tmp_path / "img.png"
    assert main(["generate", "--model", "tiny", "--prompt", "a cyber fox", "--policy", "toprovar",
                 "--calibration", str(out), "-o", str(png), "--device", "cpu", "--profile"]) == 0
    assert png.is_file() and "relative" in capsys.readouterr().err
    assert main(["calibrate", "--model", "tiny", "-o", str(out), "--device", "cpu"]) == 2
    assert "give at least one calibration prompt" in capsys.readouterr().err
