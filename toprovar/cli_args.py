"""Command-line pieces shared by ``toprovar generate``, ``calibrate``, ``bench`` and the engine-directory path:
model/weights flags, generation flags, dtype names, the per-scale report."""
from __future__ import annotations

import argparse
import sys

import torch

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def parse_floats(text: str) -> float | list[float]:
    vals = [float(v) for v in text.split(",")]
    return vals[0] if len(vals) == 1 else vals


def add_model_args(p: argparse.ArgumentParser) -> None:
    """Which model and weights to load, and where (shared by ``generate`` and ``calibrate``)."""
    p.add_argument("--model", default="shapes",
                   help="shapes (trained, packaged; default) | scenes (trained: --weights DIR) | tiny (random) | "
                        "infinity-2b | infinity-8b")
    p.add_argument("--weights", default=None, help="weights directory of a trained small model "
                   "(model/vae/text_encoder .safetensors; default: the model's packaged one)")
    p.add_argument("--checkpoint", default=None, help="transformer weights (.pth or .safetensors)")
    p.add_argument("--vae", default=None, help="VAE weights (official .pth or .safetensors)")
    p.add_argument("--t5", default=None, help="local flan-t5-xl directory")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    p.add_argument("--weights-seed", type=int, default=0, help="seed of the random weights (no checkpoint)")


def add_generation_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--prompt", action="append", required=True, help="text prompt (repeat for a batch)")
    p.add_argument("-o", "--output", default="output/toprovar.png",
                   help="PNG path (with several prompts, _i is appended)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--cfg", type=parse_floats, default=None, help="CFG scale, or one per scale: 1,1,3,...")
    p.add_argument("--tau", type=parse_floats, default=None, help="sampling temperature, or one per scale")
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--resolution", type=int, default=None, help="longer image side in pixels")
    p.add_argument("--h-div-w", type=float, default=1.0, help="aspect ratio h/w")
    p.add_argument("--policy", default="none", help="pruning policy (see `toprovar policies`)")
    p.add_argument("--calibration", default=None,
                   help="calibration JSON for the policy (default: the weights directory's calibration.json)")
    p.add_argument("--profile", action="store_true", help="per-scale timing and kept tokens")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the blocks and the VAE decoder (pays off over many images, not one)")


def print_report(res, profile: bool) -> None:
    """Per-scale kept-token table (and time with --profile) on stderr."""
    if not profile:
        return
    print(f"{'scale':>5} {'tokens':>7} {'kept%':>7} {'cfg':>4} {'ms':>9}", file=sys.stderr)
    for si, n in res.trace.tokens.items():
        kept = res.trace.kept[si]
        frac = sum(kept) / max(1, n * len(kept))
        ms = res.scale_ms[si] if si < len(res.scale_ms) else float("nan")
        print(f"{si:>5} {n:>7} {100 * frac:>6.1f}% {'x2' if res.trace.cfg_batch[si] else 'x1':>4} {ms:>9.2f}",
              file=sys.stderr)
