"""Quality vs compute of every pruning policy on the project's trained shapes model.

For held-out prompts of the shapes dataset (seed 1000 + --seed, --prompts of them, the categories in
equal parts), each policy setting generates one image per prompt at batch 1 (ToProVAR's statistics are
per prompt) with the prompt's own sampling seed, so every setting sees the same noise as the unpruned
run. Per setting: the GenEval-style checker's accuracy (per category and overall), SSIM and PSNR to the
unpruned image of the same prompt and seed, the kept-token fraction and the FLOPs relative to unpruned
(from shapes, ``policy_report``). ToProVAR reads its parameters from the model's calibration file
(``toprovar calibrate``; toprovar/weights/shapes/calibration.json).

Writes bench/results/quality_shapes.{json,md}, quality_shapes.png (accuracy and SSIM vs FLOPs) and
quality_shapes_entropy.png (the calibration's rho_s curve and per-layer sigma1/sigma2 and R).

    python bench/quality.py                 # CPU is enough (a few minutes per 100 prompts x settings)
    python bench/quality.py --device cuda --prompts 400
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

from toprovar.eval.checker import chance_accuracy, evaluate
from toprovar.eval.metrics import psnr, ssim
from toprovar.eval.shapes import CATEGORIES, make_dataset
from toprovar.model.checkpoint import atomic_write
from toprovar.images import to_uint8
from toprovar.pipeline import Pipeline
from toprovar.policy import (FastVARConfig, FastVARPolicy, ScaleExitConfig, ScaleExitPolicy, SkipVARConfig,
                             SkipVARStylePolicy, ToProVARConfig, ToProVARPolicy, policy_report, read_calibration)
from toprovar.policy.base import Policy

RESULTS = Path(__file__).resolve().parent / "results"
# matched-compute comparison points (FLOPs relative to the unpruned generation)
TARGETS = (0.5, 0.6, 0.7)


def settings(calibration: dict) -> list[tuple[str, str, Policy]]:
    """(family, label, policy) for every compared setting; the ToProVAR family from the calibration."""
    base = dict(calibration["policy"])
    tp = lambda stage, **kw: ToProVARPolicy(ToProVARConfig.from_dict({**base, "stage": stage, **kw}))  # noqa: E731
    out: list[tuple[str, str, Policy]] = [("none", "unpruned", Policy())]
    out.append(("toprovar", "calibrated", tp("full")))
    for d in (3, 4, 5):  # D pinned later than measured: the compute/quality trade-off along the scales
        out.append(("toprovar", f"D={d}", tp("full", fixed_depth=d)))
    out.append(("toprovar", "D=4, a_max=0.6", tp("full", fixed_depth=4, a_max=0.6)))
    out.append(("toprovar-scale", "D=5", tp("scale", fixed_depth=5)))
    out.append(("toprovar-scale", "calibrated", tp("scale")))
    for d in (3, 5):
        out.append(("toprovar-scale-layer", f"D={d}", tp("scale-layer", fixed_depth=d)))
    for d in (3, 5):
        out.append(("toprovar-scale-token", f"D={d}", tp("scale-token", fixed_depth=d)))
    # restore=True: pruned tokens get the layer's resized previous-scale update (FastVAR-style) instead of
    # passing the layer unchanged; the same settings, to isolate that one difference
    out.append(("toprovar+restore", "calibrated", tp("full", restore=True)))
    for d in (4, 5):
        out.append(("toprovar+restore", f"D={d}", tp("full", fixed_depth=d, restore=True)))
    for d in (3, 5):
        out.append(("toprovar-scale-layer+restore", f"D={d}", tp("scale-layer", fixed_depth=d, restore=True)))
    for d in (3, 5):
        out.append(("toprovar-scale-token+restore", f"D={d}", tp("scale-token", fixed_depth=d, restore=True)))
    for r in (0.25, 0.5, 0.75):
        out.append(("fastvar", f"last two scales at {r:g}",
                    FastVARPolicy(FastVARConfig(ratios={-2: r, -1: r}, cache_scale=-3))))
    out.append(("skipvar", "cond-only from -2", SkipVARStylePolicy(SkipVARConfig(uncond_drop_from=-2, skip_from=None))))
    out.append(("skipvar", "cond-only from -2, skip -1", SkipVARStylePolicy(SkipVARConfig(uncond_drop_from=-2,
                                                                                           skip_from=-1))))
    for e in (-1, -2):
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


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    families = list(dict.fromkeys(r["family"] for r in rows))
    colors = plt.get_cmap("tab20").colors
    for i, fam in enumerate(families):
        pts = sorted((r["relative_flops"], r["accuracy"], r["ssim"]) for r in rows if r["family"] == fam)
        style = dict(marker="os^D"[i % 4], label=fam, color=colors[(2 * i) % 20 if i < 10 else (2 * i + 1) % 20],
                     linestyle="-" if len(pts) > 1 else "none")
        axes[0].plot([p[0] for p in pts], [p[1] for p in pts], **style)
        axes[1].plot([p[0] for p in pts], [p[2] for p in pts], **style)
    axes[0].set_ylabel("checker accuracy (overall)")
    axes[1].set_ylabel("SSIM to the unpruned image")
    for ax in axes:
        ax.set_xlabel("FLOPs relative to unpruned")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle("shapes model (64x64, 7 scales): quality vs compute per policy")
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=110))
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


def markdown(data: dict) -> str:
    cats = list(CATEGORIES)
    lines = [f"# Quality vs compute on the trained shapes model ({data['device']})", "",
             f"{data['n_prompts']} held-out prompts (dataset seed {data['eval_seed']}), batch 1, sampling seed = "
             f"prompt index; ToProVAR from `{data['calibration_path']}`. Checker accuracy of the ground-truth "
             f"images: {data['ground_truth_accuracy']:.3f}; chance (images vs deranged prompts): "
             f"{data['chance_accuracy']:.3f}.", "",
             "| family | setting | rel. FLOPs | kept tokens | overall acc | " + " | ".join(cats) +
             " | SSIM | PSNR dB |", "|" + "---|" * (8 + len(cats))]
    for r in data["rows"]:
        per = " | ".join(f"{r['per_category'][c]:.2f}" if c in r["per_category"] else "-" for c in cats)
        ps = "-" if r["psnr"] is None else f"{r['psnr']:.1f}"
        lines.append(f"| {r['family']} | {r['label']} | {r['relative_flops']:.3f} | {r['kept_fraction']:.3f} | "
                     f"{r['accuracy']:.3f} | {per} | {r['ssim']:.3f} | {ps} |")
    lines += ["", "Matched compute (each family's accuracy / SSIM interpolated along its measured settings; "
              "- = outside the family's measured FLOP range):", "",
              "| family | " + " | ".join(f"acc @ {t:g}" for t in TARGETS) + " | " +
              " | ".join(f"SSIM @ {t:g}" for t in TARGETS) + " |", "|" + "---|" * (1 + 2 * len(TARGETS))]
    for fam, vals in data["matched"].items():
        cell = lambda v: "-" if v is None else f"{v:.3f}"  # noqa: E731
        lines.append(f"| {fam} | " + " | ".join(cell(vals["accuracy"][str(t)]) for t in TARGETS) + " | " +
                     " | ".join(cell(vals["ssim"][str(t)]) for t in TARGETS) + " |")
    lines += ["", f"torch {data['versions']['torch']}, {data['seconds']:.0f} s."]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="shapes")
    ap.add_argument("--weights", default=None, help="weights directory (default: the packaged one)")
    ap.add_argument("--calibration", default=None, help="default: calibration.json of the weights directory")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--prompts", type=int, default=200)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=str(RESULTS))
    args = ap.parse_args(argv)
    t0 = time.perf_counter()
    pipe = Pipeline.load(args.model, weights=args.weights, device=args.device)
    pipe.cuda_graphs = False  # batch-1 runs of many policies: graphs would only add capture time
    cal_path = Path(args.calibration) if args.calibration else Path(args.weights or pipe.cfg.weights_dir) / "calibration.json"
    calibration = read_calibration(cal_path)
    eval_seed = 1000 + args.seed
    gt_images, prompts, scenes = make_dataset(args.prompts, eval_seed)
    specs = [s.spec for s in scenes]
    rows, ref = [], None
    for family, label, policy in tqdm(settings(calibration), desc="settings", unit="setting"):
        images, reports = run_setting(pipe, prompts, policy)
        if ref is None:
            ref = images
        ev = evaluate(list(images), specs)
        rows.append({
            "family": family, "label": label, "params": policy.params(),
            "accuracy": ev["overall"], "per_category": ev["per_category"],
            "ssim": float(np.mean([ssim(a, b) for a, b in zip(images, ref)])),
            # PSNR of identical images is infinite: averaged capped at 100 dB, null for the reference itself
            "psnr": float(np.mean([min(psnr(a, b), 100.0) for a, b in zip(images, ref)])) if family != "none" else None,
            "relative_flops": float(np.mean([r["relative_flops"] for r in reports])),
            "kept_fraction": float(np.mean([np.mean([f for fs in r["kept_fraction"].values() for f in fs])
                                            for r in reports])),
        })
        print(f"{family:22s} {label:28s} flops {rows[-1]['relative_flops']:.3f} acc {ev['overall']:.3f} "
              f"ssim {rows[-1]['ssim']:.3f}", file=sys.stderr)
    matched = {}
    for fam in dict.fromkeys(r["family"] for r in rows if r["family"] != "none"):
        pts = [r for r in rows if r["family"] == fam]
        matched[fam] = {m: {str(t): interpolate([(r["relative_flops"], r[m]) for r in pts], t) for t in TARGETS}
                        for m in ("accuracy", "ssim")}
    data = {
        "model": args.model, "device": torch.cuda.get_device_name(0) if args.device == "cuda" else "CPU",
        "versions": {"torch": torch.__version__, "numpy": np.__version__}, "n_prompts": len(prompts),
        "eval_seed": eval_seed, "calibration_path": _relative(cal_path), "calibration_policy": calibration["policy"],
        "ground_truth_accuracy": evaluate(list(gt_images), specs)["overall"],
        "chance_accuracy": chance_accuracy(list(gt_images), specs, seed=args.seed)["overall"],
        "rows": rows, "matched": matched, "seconds": time.perf_counter() - t0,
    }
    out = Path(args.out)
    atomic_write(out / "quality_shapes.json", lambda tmp: Path(tmp).write_text(json.dumps(data, indent=1)))
    atomic_write(out / "quality_shapes.md", lambda tmp: Path(tmp).write_text(markdown(data)))
    plot(rows, out / "quality_shapes.png")
    plot_entropy(calibration, out / "quality_shapes_entropy.png")
    for name in ("quality_shapes.json", "quality_shapes.md", "quality_shapes.png", "quality_shapes_entropy.png"):
        print(out / name)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
