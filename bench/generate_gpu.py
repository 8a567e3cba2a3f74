"""GPU check: a random-weight model of a real config generates one image; latency, peak memory, per scale.

    python bench/generate_gpu.py --model infinity-2b --resolution 1024 --dtype bfloat16 --runs 3

Random text features stand in for flan-t5-xl (not available here); latency is CUDA-event time of
``generate_from_features`` (transformer + sampling + VAE decode), batch 1 with CFG, after a warm-up run.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import environment, time_cuda, write_results  # noqa: E402

from toprovar.images import save_png, to_uint8  # noqa: E402
from toprovar.pipeline import Pipeline  # noqa: E402
from toprovar.policy import make_policy  # noqa: E402

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--model", default="infinity-2b")
    ap.add_argument("--resolution", type=int, default=1024)
    ap.add_argument("--dtype", default="bfloat16", choices=sorted(DTYPES))
    ap.add_argument("--policy", default="none")
    ap.add_argument("--calibration", default=None)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--text-len", type=int, default=32)
    ap.add_argument("--out", default=None, help="results name (default generate_gpu_<model>_<policy>)")
    args = ap.parse_args()
    torch.backends.cuda.matmul.allow_tf32 = True
    pipe = Pipeline.load(args.model, device="cuda", dtype=DTYPES[args.dtype], text_encoder=False)
    g = torch.Generator().manual_seed(0)
    text = torch.randn(1, args.text_len, pipe.cfg.text_channels, generator=g).cuda()
    lengths = torch.tensor([args.text_len], dtype=torch.int32, device="cuda")

    def run(profile=False):
        return pipe.generate_from_features(text, lengths, seed=1, resolution=args.resolution,
                                           policy=make_policy(args.policy, args.calibration),
                                           profile=profile, progress=False)

    torch.cuda.reset_peak_memory_stats()
    timing = time_cuda(run, warmup=1, runs=args.runs)
    peak = torch.cuda.max_memory_allocated() / 2**30
    prof = run(profile=True)
    name = args.out or f"generate_gpu_{args.model}_{args.policy}"
    png = save_png(to_uint8(prof.images)[0], Path("output") / f"{name}.png")
    rows = [{"scale": si, "tokens": n, "kept_frac": sum(prof.trace.kept[si]) / max(1, n * len(prof.trace.kept[si])),
             "ms (synced)": prof.scale_ms[si]} for si, n in prof.trace.tokens.items()]
    payload = {"model": args.model, "resolution": args.resolution, "dtype": args.dtype, "policy": args.policy,
               "batch": 1, "cfg_batch": 2, "latency": timing, "peak_memory_gib": peak,
               "per_scale": rows, "image": str(png), "environment": environment(),
               "note": "random weights; random text features stand in for flan-t5-xl"}
    md = write_results(name, payload, rows,
                       f"{args.model} {args.resolution}px {args.dtype}, policy {args.policy}: "
                       f"{timing['median_ms']:.1f} ms median of {args.runs}, peak {peak:.1f} GiB")
    print(md.read_text())


if __name__ == "__main__":
    main()
