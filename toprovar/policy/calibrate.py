"""``toprovar calibrate``: pre-sampling statistics and the calibration JSON (paper appendix A.2).

Each prompt is generated WITHOUT pruning; a recorder policy asks for the head-mean entropy of the
``rho_layers`` at every scale and of every layer at the representative scale, on the conditional
half, per prompt. Per prompt it records the mean entropy and rho_s of every scale and sigma1/sigma2 of
every layer's entropy map at the representative scale. Then:

* tau rule "band" (default; A.2: high-quality generations concentrate around rho ~ 0.4): with
  rho_bar_s the mean over prompts and the band [target - width, target + width] (0.35..0.45), the
  onset scale s* is the first scale s >= 1 from which rho_bar stays >= target - width for every later
  scale; tau = rho_bar_{s*} clipped to the band, so an average prompt starts pruning at s*. If no
  such scale exists, tau = target and ``entered`` is false (most prompts will not prune).
  Rule "fixed": tau = target.
* beta "auto": beta = ln 2 / (median_l(mean ratio_l) - 1), so the median layer scores R = 0.5 and
  layers split around it into Global (R < 0.5) and Detail (R > 0.5); a number keeps that beta.
* static layer scores R_l = mean over prompts of exp(-beta (ratio - 1)) (inf ratio -> 0).

The JSON (format ``toprovar-calibration/1``) carries the statistics and a ``policy`` object: the
ToProVARConfig fields with ``layer_score_mode`` "static", the calibrated ``tau``, ``beta`` and
``layer_scores``; ``make_policy(name, path)`` reads it (``ToProVARPolicy.from_calibration``), as does
the export step. It is written atomically.
"""
from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
from pathlib import Path
from typing import Any, Sequence

import torch

from .base import CALIBRATION_FORMAT, GenerationInfo, Policy
from .config import ToProVARConfig
from .stats import layer_score, low_entropy_ratio, principal_ratio

TAU_RULES = ("band", "fixed")


class CalibrationRecorder(Policy):
    """Runs everything; records per prompt (conditional rows) rho_s, mean entropy per scale and the
    representative scale's sigma1/sigma2 per layer."""

    name = "calibration-recorder"

    def __init__(self, config: ToProVARConfig | None = None):
        self.config = config if config is not None else ToProVARConfig()
        self.records: list[dict] = []

    def start(self, info: GenerationInfo) -> None:
        super().start(info)
        c = self.config
        c.check_model(info.depth, len(info.schedule))
        self.schedule = [tuple(s) for s in info.schedule]
        self.rep = c.rep_index(len(info.schedule))
        self.rho_set, self.last_rho = frozenset(c.rho_layers), max(c.rho_layers)
        S, B = len(info.schedule), info.batch
        self._cur = [{"rho": [None] * S, "mean_entropy": [None] * S, "layer_ratio": [None] * info.depth,
                      "layer_mean_entropy": [None] * info.depth} for _ in range(B)]
        self.records.extend(self._cur)
        self._buf: list[torch.Tensor] = []

    def wants_entropy(self, si: int, layer: int) -> bool:
        return layer in self.rho_set or si == self.rep

    def observe(self, si: int, layer: int, entropy: torch.Tensor, kept: torch.Tensor | None) -> None:
        e = entropy.float()  # (B, n): conditional rows, one per prompt
        if layer in self.rho_set:
            self._buf.append(e)
            if layer == self.last_rho:
                h = torch.stack(self._buf).mean(dim=0)
                self._buf = []
                rho, mean = low_entropy_ratio(h).tolist(), h.mean(dim=-1).tolist()
                for b, rec in enumerate(self._cur):
                    rec["rho"][si], rec["mean_entropy"][si] = rho[b], mean[b]
        if si == self.rep:
            hh, ww = self.schedule[si]
            for b, rec in enumerate(self._cur):
                rec["layer_ratio"][layer] = principal_ratio(e[b].reshape(hh, ww), self.config.svd_center)
                rec["layer_mean_entropy"][layer] = float(e[b].mean())


def choose_tau(rho_bar: Sequence[float], rule: str = "band", target: float = 0.4, width: float = 0.05
               ) -> tuple[float, dict]:
    """tau from the mean rho per scale by ``rule`` (module docstring); returns (tau, description)."""
    if rule not in TAU_RULES:
        raise ValueError(f"--tau-rule: must be one of {list(TAU_RULES)}, got {rule!r}")
    if not 0.0 <= target <= 1.0:
        raise ValueError(f"--tau-target: must be in [0, 1], got {target}")
    if not 0.0 <= width <= 0.5:
        raise ValueError(f"--tau-band: must be in [0, 0.5], got {width}")
    info: dict[str, Any] = {"rule": rule, "target": target, "width": width}
    if rule == "fixed":
        return target, info
    lo, hi = target - width, target + width
    onset = next((s for s in range(1, len(rho_bar)) if all(r >= lo for r in rho_bar[s:])), None)
    info["onset_scale"], info["entered"] = onset, onset is not None
    if onset is None:
        return target, info
    return round(min(hi, max(lo, rho_bar[onset])), 6), info


def choose_beta(mean_ratios: Sequence[float], beta: float | str = "auto", default: float = 0.5) -> tuple[float, dict]:
    """beta by ``beta`` ("auto": the median layer gets R = 0.5; a number: itself)."""
    if beta != "auto":
        b = float(beta)
        if not (b > 0 and math.isfinite(b)):
            raise ValueError(f"--beta: must be 'auto' or a number > 0, got {beta!r}")
        return b, {"rule": "fixed", "beta": b}
    finite = [r for r in mean_ratios if math.isfinite(r)]
    med = statistics.median(finite) if finite else math.inf
    if not math.isfinite(med) or med <= 1.0 + 1e-9:
        return default, {"rule": "auto", "median_ratio": med, "fallback": default}
    return math.log(2.0) / (med - 1.0), {"rule": "auto", "median_ratio": med}


def _mean(vals: list[float | None]) -> float | None:
    v = [x for x in vals if x is not None]
    return sum(v) / len(v) if v else None


def _std(vals: list[float | None]) -> float | None:
    v = [x for x in vals if x is not None]
    return statistics.pstdev(v) if len(v) > 1 else (0.0 if v else None)


def summarise(records: list[dict], schedule: list[tuple[int, int]], depth: int, config: ToProVARConfig, *,
              tau_rule: str = "band", tau_target: float = 0.4, tau_band: float = 0.05,
              beta: float | str = "auto", meta: dict | None = None) -> dict:
    """Per-prompt records -> the calibration JSON object."""
    if not records:
        raise ValueError("calibrate: no prompts were run")
    S = len(schedule)
    rho = [[r["rho"][s] for r in records] for s in range(S)]
    ent = [[r["mean_entropy"][s] for r in records] for s in range(S)]
    rho_bar = [_mean(v) or 0.0 for v in rho]
    tau, tau_info = choose_tau(rho_bar, tau_rule, tau_target, tau_band)
    ratios = [[r["layer_ratio"][l] for r in records] for l in range(depth)]
    mean_ratio = [statistics.fmean(v) if all(math.isfinite(x) for x in v) else math.inf for v in ratios]
    b, beta_info = choose_beta(mean_ratio, beta, config.beta)
    scores = [statistics.fmean(layer_score(x, b) for x in v) for v in ratios]
    hist: dict[str, int] = {}
    for r in records:
        d = next((s for s, x in enumerate(r["rho"]) if x is not None and x >= tau), None)
        key = "none" if d is None else str(d)
        hist[key] = hist.get(key, 0) + 1
    policy = config.replace(tau=tau, beta=b, layer_score_mode="static",
                            layer_scores=tuple(min(1.0, max(0.0, s)) for s in scores)).to_dict()
    policy.pop("stage")
    finite = lambda x: x if x is None or math.isfinite(x) else None  # noqa: E731  (JSON has no inf)
    return {
        "format": CALIBRATION_FORMAT,
        **(meta or {}),
        "depth": depth,
        "schedule": [list(s) for s in schedule],
        "prompts": len(records),
        "rep_scale": config.rep_index(S),
        "rho_layers": list(config.rho_layers),
        "per_scale": {"tokens": [h * w for h, w in schedule], "mean_entropy": [_mean(v) for v in ent],
                      "mean_entropy_std": [_std(v) for v in ent], "rho": rho_bar, "rho_std": [_std(v) for v in rho]},
        "layers": {"ratio": [finite(x) for x in mean_ratio], "score": scores,
                   "mean_entropy": [_mean([r["layer_mean_entropy"][l] for r in records]) for l in range(depth)]},
        "tau_rule": tau_info,
        "beta_rule": beta_info,
        "depth_histogram": hist,
        "policy": policy,
    }


def write_calibration(path: str | Path, data: dict) -> Path:
    """Write the calibration JSON atomically."""
    from ..outputs import atomic_write
    text = json.dumps(data, indent=2, allow_nan=False) + "\n"
    return atomic_write(path, lambda tmp: Path(tmp).write_text(text), "-o")


def calibrate(pipe, prompts: Sequence[str], config: ToProVARConfig | None = None, *, seed: int = 0,
              batch: int = 1, resolution: int | None = None, h_div_w: float = 1.0, cfg=None, tau=None,
              top_p: float | None = None, tau_rule: str = "band", tau_target: float = 0.4, tau_band: float = 0.05,
              beta: float | str = "auto", progress: bool = False) -> dict:
    """Run ``prompts`` through a ``toprovar.pipeline.Pipeline`` unpruned and return the calibration object.

    Batch i (``batch`` prompts) uses seed ``seed + i``; statistics are per prompt either way.
    """
    from ..pipeline import resolve_schedule
    config = config if config is not None else ToProVARConfig()
    prompts = list(prompts)
    if not prompts:
        raise ValueError("--prompt/--prompts: no prompts given")
    if batch < 1:
        raise ValueError(f"--batch: must be >= 1, got {batch}")
    schedule = resolve_schedule(pipe.cfg, resolution, h_div_w)
    config.check_model(pipe.cfg.depth, len(schedule))
    recorder = CalibrationRecorder(config)
    for i in range(0, len(prompts), batch):
        pipe.generate(prompts[i:i + batch], seed=seed + i // batch, resolution=resolution, h_div_w=h_div_w,
                      cfg=cfg, tau=tau, top_p=top_p, policy=recorder, progress=progress)
    meta = {"model": pipe.cfg.name, "h_div_w": h_div_w, "seed": seed, "batch": batch,
            "random_weights": bool(getattr(pipe, "random_weights", False))}
    return summarise(recorder.records, schedule, pipe.cfg.depth, config, tau_rule=tau_rule, tau_target=tau_target,
                     tau_band=tau_band, beta=beta, meta=meta)


# ---------------------------------------------------------------------- command line
def read_prompts(path: str | Path) -> list[str]:
    """One prompt per line; blank lines and lines starting with '#' are skipped."""
    from ..inputs import file_problem
    path = Path(path)
    problem = file_problem(path)
    if problem:
        raise FileNotFoundError(f"--prompts: {path}: {problem}")
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ValueError(f"--prompts: {path}: not valid UTF-8 (byte {exc.start})") from None
    return [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.strip().startswith("#")]


def _beta(text: str) -> float | str:
    return text if text == "auto" else float(text)


def add_calibrate_args(p: argparse.ArgumentParser) -> None:
    """The ``toprovar calibrate`` options (the model options mirror ``toprovar generate``)."""
    from ..cli_args import add_model_args, add_sampling_args, positive_int, prompt_text, unit_float
    add_model_args(p)
    p.add_argument("--prompt", action="append", default=[], type=prompt_text,
                   help="a calibration prompt (repeatable)")
    p.add_argument("--prompts", default=None, help="text file, one prompt per line")
    p.add_argument("-o", "--output", default=None, help="calibration JSON (default: calibration.json in --weights "
                   "DIR when given, else calibration/<model>.json)")
    p.add_argument("--batch", type=positive_int, default=1, help="prompts per generation")
    add_sampling_args(p, tau_help="SAMPLING temperature (> 0; not the threshold), or one per scale")
    p.add_argument("--tau-rule", choices=TAU_RULES, default="band", help="how the threshold tau is chosen")
    p.add_argument("--tau-target", type=unit_float, default=0.4, help="the rho band's centre (paper: 0.4)")
    p.add_argument("--tau-band", type=unit_float, default=0.05, help="the rho band's half width")
    p.add_argument("--beta", type=_beta, default="auto", help="'auto' (median layer R = 0.5) or a number")
    p.add_argument("--set", action="append", default=[], metavar="FIELD=JSON",
                   help="other ToProVARConfig fields, e.g. --set rep_scale=6 --set 'rho_layers=[0,1]'")


def config_from_sets(sets: Sequence[str]) -> ToProVARConfig:
    """ToProVARConfig from FIELD=JSON strings (one clear error per bad entry)."""
    params = {}
    for item in sets:
        key, sep, val = item.partition("=")
        if not sep:
            raise ValueError(f"--set: expected FIELD=VALUE, got {item!r}")
        try:
            params[key.strip()] = json.loads(val)
        except json.JSONDecodeError:
            params[key.strip()] = val
    return ToProVARConfig.from_dict(params)


def cmd_calibrate(args: argparse.Namespace) -> int:
    from ..cli_args import DTYPES, check_device, vae_dtype
    from ..config import get_config
    from ..outputs import check_output_file
    from ..pipeline import Pipeline, resolve_schedule
    from ..sampling import check_sampling
    check_device(args.device)
    prompts = list(args.prompt) + (read_prompts(args.prompts) if args.prompts else [])
    if not prompts:
        raise ValueError("--prompt/--prompts: give at least one calibration prompt")
    config = config_from_sets(args.set)
    out = args.output or (f"{args.weights}/calibration.json" if args.weights else f"calibration/{args.model}.json")
    check_output_file(out, "-o")
    model_cfg = get_config(args.model)
    schedule = resolve_schedule(model_cfg, args.resolution, args.h_div_w)
    check_sampling(model_cfg.default_cfg if args.cfg is None else args.cfg,
                   model_cfg.default_tau if args.tau is None else args.tau,
                   model_cfg.top_p if args.top_p is None else args.top_p, len(schedule))
    pipe = Pipeline.load(args.model, checkpoint=args.checkpoint, vae=args.vae, t5=args.t5, device=args.device,
                         dtype=DTYPES[args.dtype], seed=args.weights_seed, weights=args.weights,
                         keep_fp32_params=args.keep_fp32_params, vae_dtype=vae_dtype(args.vae_dtype))
    if pipe.random_weights:
        print(f"note: model '{args.model}' has RANDOM weights: the calibration shows the procedure only",
              file=sys.stderr)
    data = calibrate(pipe, prompts, config, seed=args.seed, batch=args.batch, resolution=args.resolution,
                     h_div_w=args.h_div_w, cfg=args.cfg, tau=args.tau, top_p=args.top_p, tau_rule=args.tau_rule,
                     tau_target=args.tau_target, tau_band=args.tau_band, beta=args.beta, progress=True)
    path = write_calibration(out, data)
    pol = data["policy"]
    print(f"tau {pol['tau']:.3f} ({data['tau_rule']['rule']}), beta {pol['beta']:.4g}, D over prompts "
          f"{data['depth_histogram']}", file=sys.stderr)
    print(path)
    return 0


__all__ = ["CalibrationRecorder", "choose_tau", "choose_beta", "summarise", "calibrate", "write_calibration",
           "read_prompts", "add_calibrate_args", "cmd_calibrate", "config_from_sets"]
