"""Entropy analysis of a trained model: are the ToProVAR paper's patterns there?

Generates held-out prompts of the model's dataset unpruned with ``EntropyProbe`` (every layer's
self-attention entropy at every scale) and writes OUT/entropy_<model>.json (``summarise_probe``: rho_s and
mean entropy per scale, each layer's sigma1/sigma2 raw and centred at every scale, the layer classes) and
OUT/entropy_<model>.png (rho_s curves, the normalised mean-entropy curve, centred and raw sigma1/sigma2 per
layer and scale; JSON -> PNG again: ``python tools/entropy_analysis.py --replot OUT/entropy_<model>.json``).

    python tools/entropy_analysis.py --model shapes --prompts 64 --out bench/results
    python tools/entropy_analysis.py --model scenes --weights runs/scenes --device cuda --out $OUT
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from toprovar.eval.datasets import dataset_for
from toprovar.model.checkpoint import atomic_write
from toprovar.pipeline import Pipeline, resolve_schedule
from toprovar.policy.probe import EntropyProbe, summarise_probe


def analyse(pipe: Pipeline, prompts: list[str], seed: int = 0, batch: int = 1, progress: bool = True) -> dict:
    """Run ``prompts`` unpruned through the probe (batch i uses seed ``seed + i``) and summarise."""
    probe = EntropyProbe()
    for i in tqdm(range(0, len(prompts), batch), desc="entropy probe", unit="batch", disable=not progress):
        pipe.generate(prompts[i:i + batch], seed=seed + i // batch, policy=probe, progress=False)
    return summarise_probe(probe.records, resolve_schedule(pipe.cfg, None, 1.0), pipe.cfg.depth)


def plot(data: dict, path: Path, title: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    ps, pl = data["per_scale"], data["per_layer"]
    S = len(ps["tokens"])
    x = np.arange(S)
    fig, ax = plt.subplots(1, 4, figsize=(19, 4.2))
    ax[0].plot(x, ps["rho_layer0"], "o-", label="rho_s, layer 0 (below the scale mean)")
    ax[0].plot(x, ps["rho_all_layers"], "s--", label="rho_s, mean over layers")
    ax[0].plot(x, ps["rho_fixed_layer0"], "^-", label=f"rho_fixed, layer 0 (H < {data['fixed_fraction']} ln K)")
    ax[0].axhspan(0.35, 0.45, color="gray", alpha=0.2, label="paper band 0.4 +- 0.05")
    ax[0].set_ylim(0, 1)
    ax[0].set_xlabel("scale index")
    ax[0].legend(fontsize=7)
    norm = lambda ms: [m / u if m is not None and u > 0 else np.nan  # noqa: E731  (scale 0: one key, ln 1 = 0)
                       for m, u in zip(ms, ps["uniform_entropy"])]
    norm0, norma = norm(ps["mean_entropy_layer0"]), norm(ps["mean_entropy_all_layers"])
    ax[1].plot(x, norm0, "o-", label="layer 0")
    ax[1].plot(x, norma, "s--", label="mean over layers")
    ax[1].set_ylabel("mean entropy / ln K (1 = uniform attention)")
    ax[1].set_xlabel("scale index")
    ax[1].legend(fontsize=8)
    for a, key, lab in ((ax[2], "ratio_centred", "sigma1/sigma2, centred map"),
                        (ax[3], "ratio_raw", "log10 sigma1/sigma2, raw map")):
        m = np.array([[np.nan if v is None else v for v in row] for row in pl[key]], float).T  # (L, S)
        m[:, [min(hw) < data["min_class_side"] for hw in data["schedule"]]] = np.nan  # 2x2 maps: noise
        if key == "ratio_raw":
            m = np.log10(m)
        im = a.imshow(m, aspect="auto", origin="lower", cmap="viridis")
        a.set_xlabel("scale index")
        a.set_ylabel("layer")
        a.set_title(lab + f" (maps >= {data['min_class_side']}x{data['min_class_side']})", fontsize=9)
        fig.colorbar(im, ax=a)
    fig.suptitle(title)
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=100))
    plt.close(fig)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="shapes")
    ap.add_argument("--weights", default=None, help="weights directory (default: the packaged one)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--prompts", type=int, default=64, help="held-out prompts (dataset seed 2000)")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--out", default="bench/results")
    ap.add_argument("--replot", default=None, metavar="JSON", help="only redraw the PNG of an analysis JSON")
    args = ap.parse_args(argv)
    if args.replot:
        src = Path(args.replot)
        if not src.is_file():
            sys.exit(f"--replot: {src}: file not found")
        data = json.loads(src.read_text())
        plot(data, src.with_suffix(".png"), f"{data['model']}: entropy patterns ({data['prompts']} prompts)")
        print(src.with_suffix(".png"))
        return 0
    if args.prompts < 1:
        sys.exit("--prompts: must be >= 1")
    t0 = time.perf_counter()
    pipe = Pipeline.load(args.model, weights=args.weights, device=args.device)
    _, prompts, _ = dataset_for(args.model).make(args.prompts, 2000)
    data = analyse(pipe, prompts, batch=args.batch)
    data.update(model=args.model, weights=args.weights or "packaged", device=args.device,
                seconds=round(time.perf_counter() - t0, 1))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    js = out / f"entropy_{args.model}.json"
    atomic_write(js, lambda tmp: Path(tmp).write_text(json.dumps(data, indent=1, allow_nan=False)))
    plot(data, out / f"entropy_{args.model}.png", f"{args.model}: entropy patterns ({data['prompts']} prompts)")
    print(js)
    print(out / f"entropy_{args.model}.png")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
