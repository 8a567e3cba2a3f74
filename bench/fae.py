"""Benchmark Flash Attention Entropy against SDPA (cuDNN, flash), the augmented-V baseline and a naive
materialised entropy, at Infinity-2B (H=16) and Infinity-8B (H=28) shapes: B=2 (CFG), d=128, bf16,
Nq = h*w of each scale, Nk = cumulative tokens incl. the current scale. CUDA events, median.

    python bench/fae.py [--out-dir bench/results] [--runs 20] [--quick] [--layout bshd]

``--layout bshd``: q, k, v as (B, H, N, d) views of token-major (B, N, H, d) memory, the layout the PyTorch
runtime passes (projections and KV caches are token-major); default: contiguous (B, H, N, d).
Writes fae.json and fae.md (fae_bshd.*) to --out-dir.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.common import RESULTS, environment, time_cuda, write_results  # noqa: E402
from toprovar.ops import fae  # noqa: E402

SIDES = [1, 2, 4, 6, 8, 12, 16, 20, 24, 32, 40, 48, 64]
MODELS = {"2B": 16, "8B": 28}
D = 128


def shapes():
    for model, heads in MODELS.items():
        cum = 0
        for s in SIDES:
            cum += s * s
            yield model, heads, s, s * s, cum


def tensor(B: int, heads: int, n: int, layout: str) -> torch.Tensor:
    """(B, heads, n, D) bf16 random, contiguous ("bhsd") or a view of (B, n, heads, D) memory ("bshd")."""
    if layout == "bshd":
        return torch.randn(B, n, heads, D, device="cuda", dtype=torch.bfloat16).transpose(1, 2)
    return torch.randn(B, heads, n, D, device="cuda", dtype=torch.bfloat16)


def naive(q, k, v, scale):
    s = torch.matmul(q, k.transpose(-1, -2)).float() * scale
    a = torch.softmax(s, dim=-1)
    h = -(a * torch.log(a.clamp_min(1e-38))).sum(-1)
    return torch.matmul(a.to(q.dtype), v), h


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--out-dir", type=Path, default=RESULTS)
    ap.add_argument("--runs", type=int, default=20)
    ap.add_argument("--quick", action="store_true", help="last 4 scales only")
    ap.add_argument("--variants", default="5,6,8,7,3", help="FAE kernel variants to time (fae_set_variant)")
    ap.add_argument("--layout", choices=("bhsd", "bshd"), default="bhsd",
                    help="memory order of q, k, v: contiguous (B, H, N, d) or token-major (B, N, H, d)")
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    variants = [int(x) for x in args.variants.split(",") if x]
    rows, table = [], []
    for model, heads, side, nq, nk in shapes():
        if args.quick and side < 40:
            continue
        B = 2
        q, k, v = (tensor(B, heads, n, args.layout) for n in (nq, nk, nk))
        scale = 1 / math.sqrt(D)
        flop = 4.0 * B * heads * nq * nk * D
        warm = 3
        t = {}

        def sdpa(backend):
            def f():
                with sdpa_kernel([backend]):
                    return F.scaled_dot_product_attention(q, k, v, scale=scale)
            return f

        errors = {}

        def timed(name, fn, w=warm, runs=args.runs):
            try:
                t[name] = time_cuda(fn, w, runs)
            except RuntimeError as e:  # e.g. cuDNN SDPA rejects Nk = 1
                errors[name] = str(e).splitlines()[0][:200]

        timed("cudnn_sdpa", sdpa(SDPBackend.CUDNN_ATTENTION))
        timed("flash_sdpa", sdpa(SDPBackend.FLASH_ATTENTION))
        timed("augmented_v", lambda: fae.augmented_v_entropy(q, k, v, scale))
        mem = B * heads * nq * nk * 4
        if mem <= 12 * 2**30:
            timed("naive", lambda: naive(q, k, v, scale), 1, max(3, args.runs // 4))
        for var in variants:
            timed(f"fae_v{var}", lambda: fae.fae_kernel(q, k, v, scale, variant=var))
        row = {"model": model, "heads": heads, "side": side, "nq": nq, "nk": nk, "tflop": flop / 1e12,
               "ms": {name: r["median_ms"] for name, r in t.items()}, "detail": t, "errors": errors}
        rows.append(row)
        nan = float("nan")
        fae_ms = [(row["ms"][f"fae_v{v_}"], v_) for v_ in variants if f"fae_v{v_}" in row["ms"]]
        best_fae = min(fae_ms) if fae_ms else (nan, -1)
        cud = row["ms"].get("cudnn_sdpa", nan)
        table.append({"model": model, "side": side, "Nq": nq, "Nk": nk, "cuDNN ms": cud,
                      "flash ms": row["ms"].get("flash_sdpa", nan), "aug-V ms": row["ms"].get("augmented_v", nan),
                      "naive ms": row["ms"].get("naive", nan),
                      **{f"FAE v{v_} ms": row["ms"].get(f"fae_v{v_}", nan) for v_ in variants},
                      "best FAE / cuDNN": best_fae[0] / cud,
                      "best FAE TFLOP/s": flop / best_fae[0] / 1e9,
                      "cuDNN TFLOP/s": flop / cud / 1e9})
        print(f"{model} side {side:2d} Nq {nq:5d} Nk {nk:5d}: " +
              " ".join(f"{n} {m:.3f}" for n, m in row["ms"].items()), flush=True)
        del q, k, v
        torch.cuda.empty_cache()
    payload = {"environment": environment(), "dtype": "bf16", "batch": 2, "head_dim": D, "layout": args.layout,
               "variants": {
                            1: "128 q x 64 k, 8 warps, 16 rows/warp", 2: "64 q x 128 k, 4 warps, 16 rows/warp",
                            3: "128 q x 64 k, 4 warps, 32 rows/warp, Q in smem",
                            4: "128 q x 32 k, 4 warps, 32 rows/warp, Q in smem",
                            0: "default route: Hopper kernel on compute 9.0 (as 6), else as 7",
                            5: "sm_90a: TMA + mbarrier 2-stage K/V ring, wgmma m64n128k16, producer warp + 2 consumer "
                               "warpgroups (128 q x 128 k), intra-warpgroup QK/PV overlap",
                            6: "as 5 with 3 stages", 7: "mma.sync 64 q x 64 k (the sm_80 default tiles)",
                            8: "as 6 with ping-pong of the 2 consumer warpgroups (named barriers)"},
               "results": rows}
    name, what = ("fae", "contiguous (B, H, N, d)") if args.layout == "bhsd" else ("fae_bshd", "token-major q/k/v")
    md = write_results(name, payload, table, f"Flash Attention Entropy vs SDPA (bf16, B=2, d=128, {what})",
                       out_dir=args.out_dir)
    print(md.read_text())


if __name__ == "__main__":
    main()
