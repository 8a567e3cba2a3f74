"""How much sharpness the scenes checker needs (CPU): ground-truth scenes blurred or noised, scored again.

A tokenizer whose reconstructions fail the checker caps every generated image at that score, so its PSNR target
comes from here: held-out scenes (dataset seed --seed) under Gaussian blur of each --blur sigma and Gaussian
pixel noise of each --noise sigma (uint8 after rounding), their mean PSNR to the clean images and the checker's
overall and per-attribute accuracy.

    python bench/checker_sharpness.py --images 60 --out bench/results     # checker_sharpness.{json,md}
"""
from __future__ import annotations

import argparse

import numpy as np
from common import RESULTS, environment, write_results
from scipy import ndimage

from toprovar.eval.datasets import dataset_for


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    """Mean PSNR (dB) of uint8 images b against a, per image."""
    mse = ((a.astype(np.float64) - b) ** 2).mean(axis=(1, 2, 3))
    return float(np.mean(10 * np.log10(255.0 ** 2 / np.maximum(mse, 1e-12))))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--images", type=int, default=60)
    ap.add_argument("--seed", type=int, default=1000, help="dataset seed (1000: the held-out scenes)")
    ap.add_argument("--blur", default="0.7,1.0,1.5,2.0,3.0", help="Gaussian blur sigmas in pixels")
    ap.add_argument("--noise", default="5,10,20", help="pixel noise sigmas (0-255 scale)")
    ap.add_argument("--out", default=str(RESULTS))
    args = ap.parse_args(argv)
    data = dataset_for("scenes")
    images, _, scenes = data.make(args.images, args.seed)
    specs = [s.spec for s in scenes]
    rng = np.random.default_rng(args.seed)
    cases = [("clean", 0.0, images)]
    for s in (float(v) for v in args.blur.split(",")):
        blurred = ndimage.gaussian_filter(images.astype(np.float32), (0, s, s, 0))
        cases.append(("blur", s, np.clip(np.rint(blurred), 0, 255).astype(np.uint8)))
    for s in (float(v) for v in args.noise.split(",")):
        noisy = images + rng.normal(0, s, images.shape)
        cases.append(("noise", s, np.clip(np.rint(noisy), 0, 255).astype(np.uint8)))
    rows = []
    for kind, sigma, imgs in cases:
        r = data.evaluate(list(imgs), specs)
        rows.append({"degradation": kind, "sigma": sigma,
                     "PSNR dB": float("inf") if kind == "clean" else round(psnr(images, imgs), 1),
                     "checker overall": round(r["overall"], 3),
                     **{a: round(v, 3) for a, v in r["per_attribute"].items()}})
        print(rows[-1], flush=True)
    write_results("checker_sharpness", {"images": args.images, "seed": args.seed, "rows": rows,
                                        "environment": environment("cpu")}, rows,
                  f"Scenes checker on degraded ground truth ({args.images} held-out scenes, dataset seed {args.seed})",
                  args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
