"""Quality vs compute of every pruning policy family on a trained model (shapes or scenes), with bootstrap
confidence intervals over the prompt set.

For held-out prompts of the model's dataset (seed 1000 + --seed), each policy setting generates one image per
prompt at batch 1 (ToProVAR's statistics are per prompt) with the prompt's own sampling seed, so every
setting sees the same noise as the unpruned run. Per setting: the checker's accuracy (per category and
overall), SSIM and PSNR to the unpruned image of the same prompt and seed, the kept-token fraction and the
FLOPs relative to unpruned (``policy_report``), each with a 95% percentile bootstrap interval over prompts.
Each family (none; ToProVAR full and each ablation stage, with and without ``restore``; FastVAR at its
setting and swept; SkipVAR-style; fixed scale exit) is swept over operating points; the matched-compute
table interpolates every family at fixed relative FLOPs, with paired bootstrap intervals (the same prompt
resample for every setting) of each family and of its difference to ToProVAR. ToProVAR reads its
parameters from the model's calibration file (``toprovar calibrate``).

Writes OUT/quality_<model>.{json,md}, quality_<model>.png (accuracy and SSIM vs FLOPs with intervals) and,
when the calibration has them, quality_<model>_entropy.png (its rho_s curve and per-layer sigma1/sigma2, R).

    python bench/quality.py                 # shapes, CPU is enough (a few minutes per 100 prompts x settings)
    python bench/quality.py --model scenes --weights runs/scenes --device cuda --prompts 200 --grid full
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from toprovar.eval.datasets import dataset_for
from toprovar.eval.metrics import psnr, ssim
from toprovar.model.checkpoint import atomic_write
from toprovar.images import to_uint8
from toprovar.pipeline import Pipeline, resolve_schedule
from toprovar.policy import (FastVARConfig, FastVARPolicy, ScaleExitConfig, ScaleExitPolicy, SkipVARConfig,
                             SkipVARStylePolicy, ToProVARConfig, ToProVARPolicy, policy_report, read_calibration)
from toprovar.policy.base import Policy

RESULTS = Path(__file__).resolve().parent / "results"
# matched-compute comparison points (FLOPs relative to the unpruned generation)
TARGETS = (0.5, 0.6, 0.7, 0.8)
GRIDS = ("reduced", "full")
REFERENCE_FAMILY = "toprovar"


def settings(calibration: dict, num_scales: int, grid: str = "full") -> list[tuple[str, str, Policy]]:
    """(family, label, policy) for every compared setting; the ToProVAR families from the calibration.

    The sweeps are written relative to the schedule (S scales): ToProVAR's depth D pinned at S-5..S-2 (besides
    the calibrated rule), FastVAR's ratio on the last two scales, the SkipVAR-style conditional-only start,
    and the scale exit. ``grid="reduced"`` keeps fewer points per family (a short GPU run)."""
    if grid not in GRIDS:
        raise ValueError(f"--grid: must be one of {list(GRIDS)}, got {grid!r}")
    full = grid == "full"
    S = num_scales
    base = dict(calibration["policy"])
    tp = lambda stage, **kw: ToProVARPolicy(ToProVARConfig.from_dict({**base, "stage": stage, **kw}))  # noqa: E731
    depths = [d for d in ((S - 5, S - 4, S - 3, S - 2) if full else (S - 4, S - 2)) if d >= 1]
    out: list[tuple[str, str, Policy]] = [("none", "unpruned", Policy())]
    for restore in (False, True):
        sfx = "+restore" if restore else ""
        out.append(("toprovar" + sfx, "calibrated", tp("full", restore=restore)))
        out += [("toprovar" + sfx, f"D={d}", tp("full", fixed_depth=d, restore=restore)) for d in depths]
        if full:
            out.append(("toprovar" + sfx, f"D={depths[-2]}, a_max=0.6",
                        tp("full", fixed_depth=depths[-2], a_max=0.6, restore=restore)))
        for stage in ("scale-layer", "scale-token"):
            out += [(f"toprovar-{stage}{sfx}", f"D={d}", tp(stage, fixed_depth=d, restore=restore))
                    for d in (depths if full else depths[-1:])]
    out += [("toprovar-scale", f"D={d}", tp("scale", fixed_depth=d)) for d in depths[-2:]]
    out.append(("toprovar-scale", "calibrated", tp("scale")))
    if S >= 6:  # its Table 8 setting needs a cache scale before -4
        out.append(("fastvar", "preset (-4: 0.4, -3: 0.6)", FastVARPolicy(FastVARConfig())))
    for r in ((0.25, 0.5, 0.75) if full else (0.5,)):
        out.append(("fastvar", f"last two scales at {r:g}",
                    FastVARPolicy(FastVARConfig(ratios={-2: r, -1: r}, cache_scale=-3))))
    for u in ((-2, -3, -4) if full else (-2, -4)):
        out.append(("skipvar", f"cond-only from {u}", SkipVARStylePolicy(SkipVARConfig(uncond_drop_from=u,
                                                                                        skip_from=None))))
    out.append(("skipvar", "cond-only from -2, skip -1", SkipVARStylePolicy(SkipVARConfig(uncond_drop_from=-2,
                                                                                           skip_from=-1))))
    for e in ((-1, -2, -3) if full else (-1, -2)):
        out.append(("scale-exit", f"exit from {e}", ScaleExitPolicy(ScaleExitConfig(exit_from=e))))
    return out


def run_setting(pipe: Pipeline, prompts: list[str], policy: Policy) -> tuple[np.ndarray, list[dict]]:
    """Images (n, H, W, 3) uint8 and per-prompt policy reports, one generation per prompt (seed = index)."""
    images, reports = [], []
    for i, p in enumerate(prompts):
        res = pipe.generate([p], seed=i, policy=policy, progress=False)
        images.append(to_uint8(res.images)[0])
        reports.append(policy_report(res.trace, pipe.cfg))
    return np.stack(images), reports


def _relative(path: Path) -> str:
    """``path`` relative to the working directory when inside it (results name no machine's paths)."""
    try:
        return str(path.resolve().relative_to(Path.cwd()))
    except ValueError:
        return str(path)


def interpolate(points: list[tuple[float, float]], x: float) -> float | None:
    """Piecewise-linear value at x of (flops, value) points; None outside their range."""
    pts = sorted(points)
    if not pts or x < pts[0][0] - 1e-9 or x > pts[-1][0] + 1e-9:
        return None
    for (x0, y0), (x1, y1) in zip(pts, pts[1:]):
        if x0 <= x <= x1:
            return y0 if x1 == x0 else y0 + (y1 - y0) * (x - x0) / (x1 - x0)
    return pts[0][1]


def stratified_indices(categories: list[str], n_boot: int, seed: int) -> np.ndarray:
    """(n_boot, n) prompt indices: each replicate resamples every category's prompts with replacement within
    that category, so column j always holds a prompt of prompt j's category."""
    rng = np.random.default_rng(seed)
    cats = np.asarray(categories)
    idx = np.empty((n_boot, len(cats)), np.int64)
    for c in dict.fromkeys(categories):
        cols = np.nonzero(cats == c)[0]
        idx[:, cols] = cols[rng.integers(len(cols), size=(n_boot, len(cols)))]
    return idx


def overall(correct: np.ndarray, categories: list[str]) -> np.ndarray:
    """GenEval overall score (mean of the per-category accuracies) of correct (..., n) bool -> (...)."""
    cats = np.asarray(categories)
    return np.mean([correct[..., cats == c].mean(-1) for c in dict.fromkeys(categories)], axis=0)


def ci(samples: np.ndarray) -> list[float] | None:
    """95% percentile interval of bootstrap samples (NaN = undefined replicates are dropped)."""
    s = samples[np.isfinite(samples)]
    return [float(np.percentile(s, 2.5)), float(np.percentile(s, 97.5))] if len(s) else None


def bootstrap(rows: list[dict], categories: list[str], n_boot: int, seed: int) -> dict:
    """Adds "ci" to every row (accuracy, SSIM, PSNR, relative FLOPs) and returns the matched-compute table:
    {family: {metric: {target: {"value", "ci", "diff_vs_toprovar", "diff_ci"}}}}; the same prompt resample
    serves every setting (paired)."""
    idx = stratified_indices(categories, n_boot, seed)
    boot = []
    for r in rows:
        pp = r["per_prompt"]
        b = {"accuracy": overall(np.asarray(pp["correct"])[idx], categories),
             "ssim": np.asarray(pp["ssim"])[idx].mean(1),
             "relative_flops": np.asarray(pp["relative_flops"])[idx].mean(1)}
        if r["psnr"] is not None:
            b["psnr"] = np.minimum(np.asarray(pp["psnr"]), 100.0)[idx].mean(1)
        r["ci"] = {k: ci(v) for k, v in b.items()}
        boot.append(b)
    families = list(dict.fromkeys(r["family"] for r in rows if r["family"] != "none"))
    matched: dict = {}
    curves = {}
    for fam in families:
        sel = [i for i, r in enumerate(rows) if r["family"] == fam]
        for m in ("accuracy", "ssim"):
            point = [interpolate([(rows[i]["relative_flops"], rows[i][m]) for i in sel], t) for t in TARGETS]
            reps = np.array([[np.nan if v is None else v for v in
                              (interpolate([(boot[i]["relative_flops"][k], boot[i][m][k]) for i in sel], t)
                               for t in TARGETS)] for k in range(n_boot)])  # (n_boot, targets)
            curves[fam, m] = (point, reps)
    for fam in families:
        matched[fam] = {}
        for m in ("accuracy", "ssim"):
            point, reps = curves[fam, m]
            ref_point, ref_reps = curves.get((REFERENCE_FAMILY, m), (None, None))
            cells = {}
            for j, t in enumerate(TARGETS):
                cell = {"value": point[j], "ci": ci(reps[:, j]) if point[j] is not None else None}
                if ref_point is not None and fam != REFERENCE_FAMILY and point[j] is not None \
                        and ref_point[j] is not None:
                    cell["diff_vs_toprovar"] = point[j] - ref_point[j]
                    cell["diff_ci"] = ci(reps[:, j] - ref_reps[:, j])
                cells[str(t)] = cell
            matched[fam][m] = cells
    return matched


def plot(rows: list[dict], path: Path, title: str) -> None:
    """Accuracy and SSIM vs relative FLOPs, one line per family, 95% intervals as error bars."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 2, figsize=(13, 5))
    families = list(dict.fromkeys(r["family"] for r in rows))
    colors = plt.get_cmap("tab20").colors
    for i, fam in enumerate(families):
        pts = sorted((r for r in rows if r["family"] == fam), key=lambda r: r["relative_flops"])
        style = dict(marker="os^Dv<>p"[i % 8], label=fam, color=colors[i % 20], capsize=2,
                     linestyle=("--" if "restore" in fam else "-") if len(pts) > 1 else "none")
        x = [r["relative_flops"] for r in pts]
        for ax, m in zip(axes, ("accuracy", "ssim")):
            y = [r[m] for r in pts]
            err = [[max(0.0, r[m] - r["ci"][m][0]) for r in pts], [max(0.0, r["ci"][m][1] - r[m]) for r in pts]] \
                if all(r.get("ci", {}).get(m) for r in pts) else None
            ax.errorbar(x, y, yerr=err, **style)
    axes[0].set_ylabel("checker accuracy (overall; 95% bootstrap CI)")
    axes[1].set_ylabel("SSIM to the unpruned image")
    for ax in axes:
        ax.set_xlabel("FLOPs relative to unpruned")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7, ncol=2)
    fig.suptitle(title)
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=100))
    plt.close(fig)


def plot_entropy(calibration: dict, path: Path) -> None:
    """The calibration's entropy patterns: mean entropy and rho_s per scale, sigma1/sigma2 and R per layer."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    ps, ly = calibration["per_scale"], calibration["layers"]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.0))
    x = range(len(ps["rho"]))
    axes[0].plot(x, ps["rho"], marker="o", label="rho_s (fraction below the scale's mean entropy)")
    axes[0].axhline(calibration["policy"]["tau"], color="gray", linestyle="--", label=f"tau = {calibration['policy']['tau']:g}")
    ax2 = axes[0].twinx()
    ax2.plot(x, ps["mean_entropy"], marker="s", color="tab:orange", label="mean entropy (nats)")
    axes[0].set_xlabel("scale index")
    axes[0].set_ylim(0, 1)
    axes[0].legend(fontsize=8, loc="lower left")
    ax2.legend(fontsize=8, loc="lower right")
    layers = range(len(ly["ratio"]))
    axes[1].bar(layers, ly["ratio"], label="sigma1/sigma2 (centred entropy map, rep. scale)")
    axes[1].plot(layers, ly["score"], marker="o", color="tab:red", label="R = exp(-beta (ratio - 1))")
    axes[1].set_xlabel("layer")
    axes[1].legend(fontsize=8)
    fig.suptitle(f"entropy patterns of the {calibration['model']} model ({calibration['prompts']} calibration prompts)")
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=110))
    plt.close(fig)


def _cell(v, c=None, fmt="{:.3f}") -> str:
    if v is None:
        return "-"
    return fmt.format(v) + ("" if not c else f" [{fmt.format(c[0])}, {fmt.format(c[1])}]")


def markdown(data: dict) -> str:
    cats = data["categories"]
    lines = [f"# Quality vs compute on the trained {data['model']} model ({data['device']})", "",
             f"{data['n_prompts']} held-out prompts (dataset seed {data['eval_seed']}), batch 1, sampling seed = "
             f"prompt index; ToProVAR from `{data['calibration_path']}`; grid `{data['grid']}`. Checker accuracy "
             f"of the ground-truth images: {data['ground_truth_accuracy']:.3f}; chance (images vs deranged "
             f"prompts): {data['chance_accuracy']:.3f}. Intervals: 95% bootstrap over prompts "
             f"({data['n_boot']} stratified resamples).", "",
             "| family | setting | rel. FLOPs | kept tokens | overall acc [95% CI] | " + " | ".join(cats) +
             " | SSIM [95% CI] | PSNR dB |", "|" + "---|" * (7 + len(cats))]
    for r in data["rows"]:
        per = " | ".join(f"{r['per_category'][c]:.2f}" if c in r["per_category"] else "-" for c in cats)
        ps = "-" if r["psnr"] is None else f"{r['psnr']:.1f}"
        lines.append(f"| {r['family']} | {r['label']} | {r['relative_flops']:.3f} | {r['kept_fraction']:.3f} | "
                     f"{_cell(r['accuracy'], r['ci']['accuracy'])} | {per} | {_cell(r['ssim'], r['ci']['ssim'])} | "
                     f"{ps} |")
    lines += ["", "Matched compute: each family interpolated along its measured settings (- = outside its "
              "FLOP range), [95% CI]; Δ = family minus ToProVAR (full, pass-through) at the same FLOPs, "
              "paired bootstrap.", "",
              "| family | metric | " + " | ".join(f"@ {t:g} FLOPs" for t in TARGETS) + " |",
              "|" + "---|" * (2 + len(TARGETS))]
    for fam, ms in data["matched"].items():
        for m, cells in ms.items():
            row = []
            for t in TARGETS:
                c = cells[str(t)]
                txt = _cell(c["value"], c["ci"])
                if "diff_vs_toprovar" in c:
                    txt += f"; Δ {_cell(c['diff_vs_toprovar'], c['diff_ci'], '{:+.3f}')}"
                row.append(txt)
            lines.append(f"| {fam} | {m} | " + " | ".join(row) + " |")
    lines += ["", f"torch {data['versions']['torch']}, {data['seconds']:.0f} s."]
    return "\n".join(lines) + "\n"


def run(pipe: Pipeline, model: str, calibration: dict, cal_path: Path, n_prompts: int, seed: int = 0,
        grid: str = "full", n_boot: int = 1000, device: str = "cpu", progress: bool = True,
        families: list[str] | None = None) -> dict:
    """Every setting of ``settings`` (of ``families`` only, when given; "none" always runs first: it is the
    SSIM/PSNR reference) on ``n_prompts`` held-out prompts -> the result object (see module)."""
    t0 = time.perf_counter()
    data = dataset_for(model)
    eval_seed = 1000 + seed
    gt_images, prompts, scenes = data.make(n_prompts, eval_seed)
    specs = [s.spec for s in scenes]
    categories = [sp.category for sp in specs]
    S = len(resolve_schedule(pipe.cfg, None, 1.0))
    todo = [x for x in settings(calibration, S, grid) if families is None or x[0] in ("none", *families)]
    rows, ref = [], None
    for family, label, policy in tqdm(todo, desc="settings", unit="setting", disable=not progress):
        images, reports = run_setting(pipe, prompts, policy)
        if ref is None:
            ref = images
        ev = data.evaluate(list(images), specs)
        ss = [ssim(a, b) for a, b in zip(images, ref)]
        pn = [psnr(a, b) for a, b in zip(images, ref)]
        fl = [r["relative_flops"] for r in reports]
        rows.append({
            "family": family, "label": label, "params": policy.params(),
            "accuracy": ev["overall"], "per_category": ev["per_category"],
            "per_attribute": ev.get("per_attribute"),
            "ssim": float(np.mean(ss)),
            # PSNR of identical images is infinite: averaged capped at 100 dB, null for the reference itself
            "psnr": float(np.mean(np.minimum(pn, 100.0))) if family != "none" else None,
            "relative_flops": float(np.mean(fl)),
            "kept_fraction": float(np.mean([np.mean([f for fs in r["kept_fraction"].values() for f in fs])
                                            for r in reports])),
            "per_prompt": {"correct": [bool(c) for c in ev["correct"]], "ssim": ss,
                           "psnr": [min(p, 100.0) for p in pn], "relative_flops": fl},
        })
        print(f"{family:30s} {label:28s} flops {rows[-1]['relative_flops']:.3f} acc {ev['overall']:.3f} "
              f"ssim {rows[-1]['ssim']:.3f}", file=sys.stderr)
    matched = bootstrap(rows, categories, n_boot, seed)
    return {
        "model": model, "device": torch.cuda.get_device_name(0) if device == "cuda" else "CPU",
        "versions": {"torch": torch.__version__, "numpy": np.__version__}, "n_prompts": len(prompts),
        "categories": list(data.categories), "eval_seed": eval_seed, "grid": grid, "n_boot": n_boot,
        "calibration_path": _relative(cal_path), "calibration_policy": calibration["policy"],
        "ground_truth_accuracy": data.evaluate(list(gt_images), specs)["overall"],
        "chance_accuracy": data.chance(list(gt_images), specs, seed=seed)["overall"],
        "rows": rows, "matched": matched, "seconds": time.perf_counter() - t0,
    }


def write(data: dict, calibration: dict, out: Path) -> list[Path]:
    """quality_<model>.{json,md,png} and quality_<model>_entropy.png into ``out`` (atomically)."""
    name = f"quality_{data['model']}"
    out.mkdir(parents=True, exist_ok=True)
    atomic_write(out / f"{name}.json", lambda tmp: Path(tmp).write_text(json.dumps(data, indent=1)))
    atomic_write(out / f"{name}.md", lambda tmp: Path(tmp).write_text(markdown(data)))
    plot(data["rows"], out / f"{name}.png",
         f"{data['model']} model: quality vs compute per policy family ({data['n_prompts']} prompts)")
    plot_entropy(calibration, out / f"{name}_entropy.png")
    return [out / f"{name}{x}" for x in (".json", ".md", ".png", "_entropy.png")]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="shapes")
    ap.add_argument("--weights", default=None, help="weights directory (default: the packaged one)")
    ap.add_argument("--calibration", default=None, help="default: calibration.json of the weights directory")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--prompts", type=int, default=200)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--grid", choices=GRIDS, default="full", help="operating points per family")
    ap.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples")
    ap.add_argument("--families", nargs="+", default=None, help="only these families (default: all)")
    ap.add_argument("--out", default=str(RESULTS))
    args = ap.parse_args(argv)
    if args.prompts < 2 or args.bootstrap < 1:
        sys.exit("--prompts: need at least 2; --bootstrap: at least 1")
    pipe = Pipeline.load(args.model, weights=args.weights, device=args.device)
    pipe.cuda_graphs = False  # batch-1 runs of many policies: graphs would only add capture time
    cal_path = Path(args.calibration) if args.calibration else Path(args.weights or pipe.cfg.weights_dir) / "calibration.json"
    calibration = read_calibration(cal_path)
    data = run(pipe, args.model, calibration, cal_path, args.prompts, args.seed, args.grid, args.bootstrap,
               args.device, families=args.families)
    for path in write(data, calibration, Path(args.out)):
        print(path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
