"""VAE decode at 1024x1024 (infinity-2b decoder, random weights): which dtype / layout / compile is fastest.

Each variant of ``toprovar.benchmark.vae_variants`` (float32 with TF32 / bfloat16 / float16, plain or subpixel
upsample convs, contiguous or channels-last, eager or torch.compile) runs in its own subprocess under
--candidate-timeout s (and what is left of --budget s): median of --runs CUDA-event timings after warm-up
(compilation is warm-up), on the same latent (1, d, --latent, --latent), and the max abs difference of its image to the
float32 plain eager image. JSON + Markdown are rewritten after every row; a variant that times out or fails
gets a row saying so.

    python bench/vae_decode.py --budget 150 --candidate-timeout 60 --out bench/results
    python bench/vae_decode.py --candidate-timeout 150 --variants "bfloat16 subpixel compiled,bfloat16 subpixel channels-last compiled"
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from common import RESULTS, environment, time_fn, write_results

from toprovar.benchmark.vae_variants import REFERENCE, Variant, pick, prepare
from toprovar.model.vae import build_decoder


def run_one(vae: str, variant: Variant, runs: int, image_path: str, device: str, side: int) -> dict:
    """Time one variant; saves its image (float32, CPU) to ``image_path``."""
    dev = torch.device(device)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    dec = build_decoder(vae, seed=0)
    z = torch.randn(1, dec.cfg.codebook_dim, side, side, generator=torch.Generator().manual_seed(0)) * 0.2
    fn, conv = prepare(dec, variant, dev)
    zin = conv(z)
    t0 = time.perf_counter()
    with torch.no_grad():
        img = fn(zin)
        if dev.type == "cuda":
            torch.cuda.synchronize()
        first_s = time.perf_counter() - t0
        t = time_fn(lambda: fn(zin), dev.type, warmup=2, runs=runs)
    torch.save(img.float().cpu(), image_path)
    return {"median ms": t["median_ms"], "first call s": first_s}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--vae", default="infinity-2b")
    ap.add_argument("--runs", type=int, default=10)
    ap.add_argument("--latent", type=int, default=64, help="latent side (64: 1024 px with infinity-2b)")
    ap.add_argument("--budget", type=float, default=600.0, help="seconds for all variants")
    ap.add_argument("--candidate-timeout", type=float, default=120.0, help="seconds per variant (subprocess)")
    ap.add_argument("--out", default=str(RESULTS), help="output directory of vae_decode.{json,md}")
    ap.add_argument("--device", default="cuda", help="cuda (the benchmark) or cpu (a smoke run)")
    ap.add_argument("--variants", default=None,
                    help="comma-separated variant labels to run (the float32 plain reference always runs first); "
                         "default: all, most informative first")
    ap.add_argument("--one", default=None, help=argparse.SUPPRESS)  # internal: JSON variant, image path
    args = ap.parse_args()
    if args.one:
        spec = json.loads(args.one)
        print(json.dumps(run_one(args.vae, Variant(**spec["variant"]), args.runs, spec["image"], args.device, args.latent)))
        return
    try:
        chosen = pick(args.variants)
    except ValueError as exc:
        sys.exit(f"bench/vae_decode.py: {exc}")
    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("bench/vae_decode.py: --device cuda: CUDA is not available")
    out, t_end = Path(args.out), time.monotonic() + args.budget
    payload = {"vae": args.vae, "latent_side": args.latent, "runs": args.runs, "budget_s": args.budget,
               "candidate_timeout_s": args.candidate_timeout, "environment": environment(args.device)}
    rows, ref = [], None
    with tempfile.TemporaryDirectory() as tmp:
        for i, v in enumerate(chosen):
            left = min(args.candidate_timeout, t_end - time.monotonic())
            row = {"variant": v.label, **v.as_dict(), "median ms": float("nan"), "first call s": float("nan"),
                   "max abs diff vs fp32": float("nan"), "status": "ok"}
            if left < 5:
                row["status"] = "skipped (budget)"
            else:
                img = f"{tmp}/{i}.pt"
                cmd = [sys.executable, __file__, "--vae", args.vae, "--runs", str(args.runs), "--device", args.device,
                       "--latent", str(args.latent),
                       "--one", json.dumps({"variant": v.as_dict(), "image": img})]
                # own process group: a timeout ends the variant and its compile workers
                proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                        start_new_session=True)
                try:
                    stdout, stderr = proc.communicate(timeout=left)
                    if proc.returncode:
                        row["status"] = "failed: " + (stderr.strip().splitlines() or ["?"])[-1][:160]
                    else:
                        row.update(json.loads(stdout.strip().splitlines()[-1]))
                        image = torch.load(img)
                        if v == REFERENCE:
                            ref = image
                        if ref is not None:
                            row["max abs diff vs fp32"] = (image - ref).abs().max().item()
                except subprocess.TimeoutExpired:
                    os.killpg(proc.pid, signal.SIGKILL)
                    proc.communicate()
                    row["status"] = f"timeout ({left:.0f} s)"
            rows.append(row)
            print(json.dumps(row), flush=True)
            write_results("vae_decode", {**payload, "rows": rows}, rows,
                          f"VAE decode, latent {args.latent}x{args.latent} ({args.vae} decoder, random weights, median of {args.runs})", out)


if __name__ == "__main__":
    main()
