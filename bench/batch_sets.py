"""What per-prompt kept sets cost in a batch (ToProVAR, docs/runtime.md "Batches").

    python bench/batch_sets.py --model infinity-2b --out $OUT                       # GPU
    python bench/batch_sets.py --model tiny --device cpu --batch-sizes 1,4 --runs 1 --out /tmp/bs

Per batch size B and ToProVAR mode (pinned operating point; adaptive = the default configuration, whose
decisions read entropy): the generation as it runs (each prompt its own kept tokens, a pruned layer runs
prompt by prompt) against the same generation with ONE kept set for the batch (the first prompt's tokens
for every prompt: one batched block call per pruned layer, what a shared set costs). The difference is the
price of per-prompt sets; the kept counts are the same in both. Median of ``--runs`` after ``--warmup``.
Writes OUT/batch_sets_MODEL.{json,md}.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import environment, time_fn, timing_method, write_results  # noqa: E402

import torch  # noqa: E402

from toprovar.benchmark.e2e import build_policy  # noqa: E402
from toprovar.cli_args import DTYPES  # noqa: E402
from toprovar.pipeline import Pipeline, resolve_schedule  # noqa: E402
from toprovar.policy import Policy, make_policy  # noqa: E402


class SharedSet:
    """Wraps a policy: the first prompt's kept tokens for every prompt (one block call per pruned layer)."""

    def __init__(self, inner: Policy):
        self.inner = inner

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def plan_key(self):
        key = self.inner.plan_key()
        return None if key is None else key + "+shared"

    def keep(self, si, layer, n):
        idx = self.inner.keep(si, layer, n)
        return idx[0] if idx is not None and idx.dim() == 2 else idx

    def observe(self, si, layer, entropy, kept):
        if kept is not None and kept.dim() == 1 and entropy.shape[0] > 1:
            kept = kept.expand(entropy.shape[0], -1)
        self.inner.observe(si, layer, entropy, kept)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="infinity-2b")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default=None)
    ap.add_argument("--batch-sizes", type=lambda t: [int(v) for v in t.split(",")], default=[1, 4, 8, 16])
    ap.add_argument("--modes", default="pinned,adaptive")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None, help="default: on CUDA")
    ap.add_argument("--out", required=True)
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    dtype = args.dtype or ("bfloat16" if device.type == "cuda" else "float32")
    pipe = Pipeline.load(args.model, device=str(device), dtype=DTYPES[dtype], seed=0, text_encoder=False)
    pipe.compile = device.type == "cuda" if args.compile is None else args.compile
    cfg = pipe.cfg
    S = len(resolve_schedule(cfg, None, 1.0))
    g = torch.Generator().manual_seed(0)
    rows, runs = [], {}
    payload = {"model": args.model, "dtype": dtype, "device": str(device), "timing": timing_method(device),
               "compile": pipe.compile, "runs": runs, "environment": environment(device)}

    def write():  # after every row: a run stopped from outside keeps its rows
        return write_results(f"batch_sets_{args.model}", payload, rows,
                             f"Per-prompt kept sets vs one shared set, ToProVAR, {args.model} {dtype} "
                             f"(median of {args.runs}, {timing_method(device)})", args.out)
    for mode in [m.strip() for m in args.modes.split(",") if m.strip()]:
        make = (lambda: build_policy("toprovar", cfg.depth, None, S)) if mode == "pinned" else (
            lambda: make_policy("toprovar"))
        for B in args.batch_sizes:
            text = torch.randn(B, 32, cfg.text_channels, generator=g).to(device)
            lengths = torch.full((B,), 32, dtype=torch.int32, device=device)
            res = {}
            for variant, wrap in (("per-prompt", lambda p: p), ("shared", SharedSet)):
                def fn():
                    return pipe.generate_from_features(text, lengths, seed=list(range(B)), cfg=3.0, tau=0.5,
                                                       policy=wrap(make()), progress=False)
                res[variant] = time_fn(fn, device, warmup=args.warmup, runs=args.runs)
                kept = fn().trace.kept
                res[variant + "_kept"] = kept
            pipe.release()
            a, b = res["per-prompt"]["median_ms"], res["shared"]["median_ms"]
            runs[f"{mode}/B{B}"] = res
            rows.append({"mode": mode, "batch": B, "per-prompt sets ms": a, "one shared set ms": b,
                         "cost %": 100 * (a - b) / b, "same kept counts": res["per-prompt_kept"] == res["shared_kept"]})
            print(json.dumps(rows[-1]), flush=True)
            write()
    md = write()
    print(md.read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
