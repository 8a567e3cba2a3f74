"""VAE decode at 1024x1024 (infinity-2b decoder, random weights): which dtype / layout / cuDNN mode is fastest.

The decoder is 19% of the unpruned end-to-end time and does not shrink with pruning. Variants, each timed
with CUDA events (median of --runs after warm-up) on the same latent (1, 32, 64, 64): float32 (TF32 convs,
the runtime's current setting) and bfloat16, contiguous and channels-last, with and without
``torch.backends.cudnn.benchmark`` (algorithm search per shape), and both dtypes through torch.compile (what
``toprovar bench`` runs). Also the max abs difference to float32.

    python bench/vae_decode.py        # writes bench/results/vae_decode.{json,md}
"""
from __future__ import annotations

import argparse

import torch
from common import environment, time_cuda, write_results

from toprovar.model.vae import build_decoder


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--vae", default="infinity-2b")
    ap.add_argument("--runs", type=int, default=10)
    args = ap.parse_args()
    dev = torch.device("cuda")
    base = build_decoder(args.vae, seed=0).to(dev).eval().requires_grad_(False)
    z = (torch.randn(1, base.cfg.codebook_dim, 64, 64, generator=torch.Generator().manual_seed(0)) * 0.2).to(dev)
    with torch.no_grad():
        ref = base(z).float()
    rows = []
    for dtype in (torch.float32, torch.bfloat16):
        for channels_last in (False, True):
            for bench in (False, True):
                dec = build_decoder(args.vae, seed=0).to(dev, dtype).eval().requires_grad_(False)
                fmt = torch.channels_last if channels_last else torch.contiguous_format
                dec = dec.to(memory_format=fmt)
                zin = z.to(dtype).contiguous(memory_format=fmt)
                with torch.no_grad(), torch.backends.cudnn.flags(enabled=True, benchmark=bench,
                                                                 deterministic=False, allow_tf32=True):
                    t = time_cuda(lambda: dec(zin), warmup=3, runs=args.runs)
                    err = (dec(zin).float() - ref).abs().max().item()
                rows.append({"dtype": str(dtype).removeprefix("torch."), "channels_last": channels_last,
                             "cudnn_benchmark": bench, "median ms": t["median_ms"], "max abs diff vs fp32": err})
                print(rows[-1], flush=True)
    for dtype in (torch.float32, torch.bfloat16):  # torch.compile (Inductor fuses GroupNorm + SiLU, adds)
        dec = torch.compile(build_decoder(args.vae, seed=0).to(dev, dtype).eval().requires_grad_(False))
        zin = z.to(dtype)
        with torch.no_grad():
            t = time_cuda(lambda: dec(zin), warmup=3, runs=args.runs)
            err = (dec(zin).float() - ref).abs().max().item()
        rows.append({"dtype": str(dtype).removeprefix("torch.") + " compiled", "channels_last": False,
                     "cudnn_benchmark": False, "median ms": t["median_ms"], "max abs diff vs fp32": err})
        print(rows[-1], flush=True)
    write_results("vae_decode", {"vae": args.vae, "latent": [1, base.cfg.codebook_dim, 64, 64],
                                 "environment": environment(dev)}, rows,
                  f"VAE decode 1024x1024 ({args.vae} decoder, random weights, median of {args.runs})")


if __name__ == "__main__":
    main()
