"""End-to-end GPU benchmark: latency, FLOPs, kept tokens and policy overhead of every policy.

    python bench/e2e.py --model infinity-2b --runs 5

Random weights (drawn on the CPU from a seed), random text features standing in for flan-t5-xl,
batch 1 with CFG (2 rows), bf16, 1024x1024, the PyTorch backend with CUDA-graph replay of unpruned
layers. Random weights give no meaningful entropy, so the ToProVAR variants run a pinned operating point
(``OPERATING_POINT``, or ``--calibration``): D, Global/Detail layer classes and the Detail keep fraction
are fixed, while every per-token computation (FAE entropy, P_keep, top-k selection, gather/scatter)
still runs. Policy overhead = ToProVAR's latency minus a replay of the same kept-token sets with no
entropy, statistics or selection (the work the policy adds).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import environment, time_cuda, write_results  # noqa: E402

from toprovar.pipeline import Pipeline  # noqa: E402
from toprovar.policy import POLICIES, Policy, ToProVARConfig, make_policy, policy_report  # noqa: E402
from toprovar.policy.toprovar import ToProVARPolicy  # noqa: E402

PEAK_TFLOPS = 790.0  # measured bf16 dense matmul rate of this workplace's H100/H200 (device notes)
POLICY_NAMES = ["none", "toprovar", "toprovar-scale", "toprovar-scale-layer", "toprovar-scale-token",
                "fastvar", "fastvar-public", "skipvar", "scale-exit"]


def operating_point(depth: int) -> dict:
    """The pinned ToProVAR operating point: pruning from the 32x32 scale (index 9 of 13, where FastVAR
    also starts), the first 3 and last 2 layers Global (R = 0: never pruned), the others Detail
    (R = 1) keeping 30% of their tokens (the paper: Detail layers keep fidelity at up to 90% compression)."""
    scores = [0.0 if (l < 3 or l >= depth - 2) else 1.0 for l in range(depth)]
    return dict(fixed_depth=9, keep_fraction=0.3, layer_score_mode="static", layer_scores=scores,
                full_layers=[0], rho_layers=[0], layer_skip=False)


class ReplayPolicy(Policy):
    """Replays recorded kept-token sets and scale decisions; computes nothing (overhead reference)."""
    name = "replay"

    def __init__(self, trace_idx: dict, ran: set, cfg_batch: dict):
        self.idx, self.ran, self.cfg_batch = trace_idx, ran, cfg_batch

    def run_scale(self, si):
        return si in self.ran

    def use_cfg(self, si):
        return self.cfg_batch.get(si, True)

    def keep(self, si, layer, n):
        return self.idx.get((si, layer))


class Recorder:
    """Wraps a policy and records its keep() answers."""

    def __init__(self, inner: Policy):
        self.inner, self.log = inner, {}

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def keep(self, si, layer, n):
        idx = self.inner.keep(si, layer, n)
        self.log[(si, layer)] = None if idx is None else idx.clone()
        return idx


def build_policy(name: str, depth: int, calibration: str | None) -> Policy:
    if name.startswith("toprovar"):
        if calibration:
            return make_policy(name, calibration)
        cls = POLICIES[name]
        return cls(ToProVARConfig(stage=cls.stage, **operating_point(depth)))
    return make_policy(name)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--model", default="infinity-2b")
    ap.add_argument("--resolution", type=int, default=1024)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--policies", default=",".join(POLICY_NAMES))
    ap.add_argument("--calibration", default=None)
    ap.add_argument("--no-cuda-graphs", action="store_true")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    pipe = Pipeline.load(args.model, device="cuda", dtype=torch.bfloat16, text_encoder=False)
    pipe.cuda_graphs = not args.no_cuda_graphs
    cfg = pipe.cfg
    g = torch.Generator().manual_seed(0)
    text = torch.randn(1, 32, cfg.text_channels, generator=g).cuda()
    lengths = torch.tensor([32], dtype=torch.int32, device="cuda")

    def gen(policy, profile=False):
        return pipe.generate_from_features(text, lengths, seed=1, resolution=args.resolution, cfg=3.0, tau=0.5,
                                           policy=policy, profile=profile, progress=False)

    rows, runs = [], {}
    base_ms = None
    for name in args.policies.split(","):
        factory = lambda: build_policy(name, cfg.depth, args.calibration)  # noqa: E731
        try:
            timing = time_cuda(lambda: gen(factory()), warmup=2, runs=args.runs)
            rec = Recorder(factory())
            prof = gen(rec, profile=True)
        except Exception as exc:  # recorded, not fatal: the table says why a row is missing
            runs[name] = {"error": str(exc).strip().splitlines()[0]}
            print(f"{name}: error: {runs[name]['error']}", flush=True)
            continue
        rep = policy_report(prof.trace, cfg)
        ms = timing["median_ms"]
        base_ms = ms if name == "none" else base_ms
        run = {"latency": timing, "scale_ms": prof.scale_ms, "stage_ms": prof.stage_ms,
               "tokens": prof.trace.tokens, "kept": prof.trace.kept, "relative_flops": rep["relative_flops"],
               "flops": rep["flops"], "scale_kept_fraction": rep["scale_kept_fraction"],
               "skipped_scales": rep["skipped_scales"], "policy": factory().params()}
        if isinstance(rec.inner, ToProVARPolicy):
            replay = ReplayPolicy({k: v for k, v in rec.log.items()}, set(prof.trace.kept),
                                  dict(prof.trace.cfg_batch))
            rt = time_cuda(lambda: gen(replay), warmup=2, runs=args.runs)
            run["replay_latency"] = rt
            run["policy_overhead_ms"] = ms - rt["median_ms"]
            run["report"] = rec.inner.report()
        runs[name] = run
        floor_ms = rep["flops"] / (PEAK_TFLOPS * 1e12) * 1e3
        rows.append({"policy": name, "latency ms": ms, "speedup": (base_ms / ms) if base_ms else float("nan"),
                     "rel. FLOPs": rep["relative_flops"], "TFLOP": rep["flops"] / 1e12,
                     "TFLOP/s": rep["flops"] / (ms * 1e-3) / 1e12, "x floor": ms / floor_ms,
                     "kept (last run scale)": rep["scale_kept_fraction"][max(prof.trace.kept)],
                     "overhead %": 100 * run.get("policy_overhead_ms", 0.0) / ms})
        print(json.dumps(rows[-1]), flush=True)
    name = args.out or f"e2e_{args.model}"
    payload = {"model": args.model, "resolution": args.resolution, "dtype": "bfloat16", "batch": 1,
               "cfg": 3.0, "cuda_graphs": pipe.cuda_graphs, "peak_tflops": PEAK_TFLOPS,
               "operating_point": args.calibration or operating_point(cfg.depth), "runs": runs,
               "environment": environment(),
               "note": "random weights and random text features; toprovar variants at a pinned operating point"}
    md = write_results(name, payload, rows, f"End to end, {args.model} {args.resolution}px bf16, batch 1 + CFG "
                                            f"(median of {args.runs}, CUDA events)")
    print(md.read_text())


if __name__ == "__main__":
    main()
