"""End-to-end benchmark (``toprovar bench``): latency, FLOPs, kept tokens, policy overhead of every policy,
and where the time goes per scale and per piece.

    toprovar bench --model infinity-2b --runs 5 --out bench/results          # GPU: the committed results
    toprovar bench --model tiny --device cpu --runs 2 --out /tmp/bench        # CPU smoke run

Random weights (drawn on the CPU from a seed), random text features standing in for flan-t5-xl, batch 1
with CFG (2 rows), the PyTorch backend (compiled pieces and whole-scale CUDA graphs on CUDA); on CUDA bf16
at the model's default resolution (1024x1024 for Infinity). Random weights give no meaningful entropy, so
the ToProVAR variants run a pinned operating point (``operating_point``, or ``--calibration``): D,
Global/Detail layer classes and the Detail keep fraction are fixed, while every per-token computation (FAE
entropy, P_keep, top-k selection, gather/scatter) still runs. Policy overhead = the median of paired differences
between ToProVAR and a replay of the same kept-token sets with no entropy, statistics or selection (the work
the policy adds), the two run alternately (``time_paired``, ``--overhead-runs`` pairs). A policy that fails
stops the run before anything is written: earlier results in ``--out`` are never replaced by partial ones.
Latency: CUDA events on CUDA, perf_counter on the CPU. One profiled run per policy gives the per-scale and
per-piece times (``GenerationResult.piece_ms``) written to the JSON and, for ``--breakdown`` policies,
as Markdown tables.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from ..cli_args import DTYPES, add_vae_dtype_arg, vae_dtype
from ..pipeline import Pipeline, resolve_schedule, vae_stride
from ..policy import POLICIES, Policy, ToProVARConfig, make_policy, policy_report
from ..policy.toprovar import ToProVARPolicy
from .breakdown import breakdown_section, check_pieces, piece_totals
from .common import environment, time_fn, time_paired, timing_method, write_results

PEAK_TFLOPS = 790.0  # measured bf16 dense matmul rate of this workplace's H100/H200 (device notes)
POLICY_NAMES = ["none", "toprovar", "toprovar-scale", "toprovar-scale-layer", "toprovar-scale-token",
                "fastvar", "fastvar-public", "skipvar", "scale-exit"]
DTYPE_LABELS = {"bfloat16": "bf16", "float16": "fp16", "float32": "fp32"}


def operating_point(depth: int, num_scales: int = 13) -> dict:
    """The pinned ToProVAR operating point: pruning from the 4th-last scale (the 32x32 scale, index 9 of
    13 at 1024x1024, where FastVAR also starts; 6x6 of the tiny model's 7), the first 3 and last 2 layers
    Global (R = 0: never pruned; with fewer than 8 layers only layer 0), the others Detail (R = 1)
    keeping 30% of their tokens (the paper: Detail layers keep fidelity at up to 90% compression)."""
    first, last = (3, 2) if depth >= 8 else (1, 0)
    scores = [0.0 if (l < first or l >= depth - last) else 1.0 for l in range(depth)]
    return dict(fixed_depth=max(0, num_scales - 4), keep_fraction=0.3, layer_score_mode="static",
                layer_scores=scores, full_layers=[0], rho_layers=[0], layer_skip=False)


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

    def plan_key(self):
        return f"replay:{id(self)}"  # its recorded index tensors are what a scale graph reads


class Recorder:
    """Wraps a policy and records its keep() answers."""

    def __init__(self, inner: Policy):
        self.inner, self.log = inner, {}

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def plan_key(self):
        return None  # keep() must run in Python to be recorded

    def keep(self, si, layer, n):
        idx = self.inner.keep(si, layer, n)
        self.log[(si, layer)] = None if idx is None else idx.clone()
        return idx


def build_policy(name: str, depth: int, calibration: str | None, num_scales: int = 13) -> Policy:
    """A policy by name; ToProVAR variants at the pinned operating point unless ``calibration`` is given."""
    if name.startswith("toprovar"):
        if calibration:
            return make_policy(name, calibration)
        if name not in POLICIES:
            make_policy(name)  # raises the registry's one-line error
        cls = POLICIES[name]
        return cls(ToProVARConfig(stage=cls.stage, **operating_point(depth, num_scales)))
    return make_policy(name)


def add_bench_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="infinity-2b",
                   help="tiny | infinity-2b | infinity-8b | hart-tiny | hart-0.7b (random weights)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=sorted(DTYPES), default=None,
                   help="default: bfloat16 on CUDA, float32 on the CPU")
    add_vae_dtype_arg(p)
    p.add_argument("--resolution", type=int, default=None,
                   help="longer image side in pixels (default: the model's, 1024 for Infinity, 64 for tiny)")
    p.add_argument("--runs", type=int, default=5, help="timed runs per policy (median reported)")
    p.add_argument("--warmup", type=int, default=2, help="untimed runs before the timed ones")
    p.add_argument("--overhead-runs", type=int, default=10,
                   help="ToProVAR / replay pairs, run alternately, for the policy overhead")
    p.add_argument("--policies", default=",".join(POLICY_NAMES), help="comma-separated policy names")
    p.add_argument("--calibration", default=None, help="calibration JSON for the ToProVAR variants "
                                                       "(default: the pinned operating point)")
    p.add_argument("--breakdown", default="none,toprovar",
                   help="policies whose per-scale x piece table goes into the Markdown (all are in the JSON)")
    p.add_argument("--no-cuda-graphs", action="store_true", help="run unpruned layers eagerly on CUDA")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="torch.compile the blocks and the VAE decoder (default: on CUDA; compile time is warm-up)")
    p.add_argument("--peak-tflops", type=float, default=PEAK_TFLOPS, help="dense matmul rate for 'x floor'")
    p.add_argument("--weights-seed", type=int, default=0, help="seed of the random weights")
    p.add_argument("--out", default="bench/results", help="output directory of NAME.json and NAME.md")
    p.add_argument("--name", default=None, help="result file stem (default: e2e_MODEL)")


def run_benchmark(args: argparse.Namespace) -> tuple[dict, list[dict], Path]:
    """Run the benchmark of ``args`` (``add_bench_args``); returns (JSON payload, table rows, Markdown path)."""
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {args.device}: CUDA is not available on this machine (use --device cpu)")
    if args.runs < 1 or args.warmup < 0 or args.overhead_runs < 1:
        raise ValueError(f"--runs {args.runs} / --warmup {args.warmup} / --overhead-runs {args.overhead_runs}: "
                         "need runs >= 1, warmup >= 0 and overhead-runs >= 1")
    names = [n.strip() for n in args.policies.split(",") if n.strip()]
    if not names:
        raise ValueError("--policies: no policy given")
    unknown = [n for n in names if n not in POLICIES]
    if unknown:
        raise ValueError(f"--policies: unknown policy {unknown[0]!r}; choose from {sorted(POLICIES)}")
    from ..config import get_config
    from ..outputs import check_output_dir, check_output_file
    from ..policy.base import check_calibration_model
    out = check_output_dir(args.out, "--out")
    stem = args.name or f"e2e_{args.model}"
    for suffix in (".json", ".md"):
        check_output_file(out / f"{stem}{suffix}", "--out")
    model_cfg = get_config(args.model)
    S = len(resolve_schedule(model_cfg, args.resolution, 1.0))
    for name in names:  # a bad --calibration is refused here, before any run
        check_calibration_model(build_policy(name, model_cfg.depth, args.calibration, S), model_cfg.name)
    dtype_name = args.dtype or ("bfloat16" if device.type == "cuda" else "float32")
    pipe = Pipeline.load(args.model, device=str(device), dtype=DTYPES[dtype_name], seed=args.weights_seed,
                         text_encoder=False, vae_dtype=vae_dtype(args.vae_dtype))
    pipe.cuda_graphs = not args.no_cuda_graphs
    pipe.compile = device.type == "cuda" if args.compile is None else args.compile
    cfg = pipe.cfg
    schedule = resolve_schedule(cfg, args.resolution, 1.0)
    resolution = max(schedule[-1]) * vae_stride(cfg)
    S = len(schedule)
    g = torch.Generator().manual_seed(0)
    n_text = cfg.text_maxlen if cfg.is_hart else 32  # HART: its context is always padded to text_maxlen
    text = torch.randn(1, n_text, cfg.text_channels, generator=g).to(device)
    lengths = torch.tensor([min(32, n_text)], dtype=torch.int32, device=device)
    cfg_scale = cfg.default_cfg if cfg.is_hart else 3.0
    clock = timing_method(device)

    def gen(policy, profile=False):
        return pipe.generate_from_features(text, lengths, seed=1, resolution=resolution, cfg=cfg_scale, tau=0.5,
                                           policy=policy, profile=profile, progress=False)

    def timed(fn):
        return time_fn(fn, device, warmup=args.warmup, runs=args.runs)

    rows, runs = [], {}
    base_ms = None
    for name in names:
        factory = lambda: build_policy(name, cfg.depth, args.calibration, S)  # noqa: E731
        try:
            timing = timed(lambda: gen(factory()))
            # profiled runs replay per-block graphs (no scale graphs): start them from free memory and
            # time the second run, so no capture falls inside the breakdown
            pipe.release_graphs()
            gen(Recorder(factory()), profile=True)
            rec = Recorder(factory())
            prof = gen(rec, profile=True)
        except (RuntimeError, ValueError) as exc:  # nothing is written: earlier results in --out stay as they are
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            raise RuntimeError(f"--policies: policy {name} failed ({first}); no results written to {out}") from None
        rep = policy_report(prof.trace, cfg)
        ms = timing["median_ms"]
        base_ms = ms if name == "none" else base_ms
        run = {"latency": timing, "scale_ms": prof.scale_ms, "stage_ms": prof.stage_ms,
               "piece_ms": prof.piece_ms, "piece_total_ms": piece_totals(prof.piece_ms),
               "piece_check": check_pieces(prof.scale_ms, prof.piece_ms),
               "tokens": prof.trace.tokens, "kept": prof.trace.kept, "relative_flops": rep["relative_flops"],
               "flops": rep["flops"], "scale_kept_fraction": rep["scale_kept_fraction"],
               "skipped_scales": rep["skipped_scales"], "policy": factory().params()}
        if isinstance(rec.inner, ToProVARPolicy):
            replay = ReplayPolicy(dict(rec.log), set(prof.trace.kept), dict(prof.trace.cfg_batch))
            pair = time_paired(lambda: gen(factory()), lambda: gen(replay), device, warmup=max(args.warmup, 2),
                               runs=args.overhead_runs)
            run["replay_latency"] = pair["b"]
            run["overhead_paired"] = pair
            run["policy_overhead_ms"] = pair["diff"]["median_ms"]
            run["report"] = rec.inner.report()
        runs[name] = run
        floor_ms = rep["flops"] / (args.peak_tflops * 1e12) * 1e3
        rows.append({"policy": name, "latency ms": ms, "speedup": (base_ms / ms) if base_ms else float("nan"),
                     "rel. FLOPs": rep["relative_flops"], "TFLOP": rep["flops"] / 1e12,
                     "TFLOP/s": rep["flops"] / (ms * 1e-3) / 1e12, "x floor": ms / floor_ms,
                     "kept (last run scale)": rep["scale_kept_fraction"][max(prof.trace.kept)],
                     "overhead %": 100 * run.get("policy_overhead_ms", 0.0) / ms})
        print(json.dumps(rows[-1]), flush=True)
    payload = {"model": args.model, "resolution": resolution, "dtype": dtype_name,
               "vae_dtype": str(next(pipe.decoder.parameters()).dtype).removeprefix("torch."), "batch": 1,
               "cfg": cfg_scale, "cuda_graphs": pipe.cuda_graphs and device.type == "cuda",
               "compile": pipe.compile, "scale_graphs": pipe.cuda_graphs and device.type == "cuda",
               "device": str(device),
               "timing": clock, "warmup": args.warmup, "peak_tflops": args.peak_tflops,
               "operating_point": args.calibration or operating_point(cfg.depth, S), "runs": runs,
               "environment": environment(device), "random_weights": pipe.random_weights,
               "note": ("random weights" if pipe.random_weights else "the model's packaged weights")
               + " and random text features; toprovar variants at a pinned operating point"}
    sections = []
    for name in [n.strip() for n in args.breakdown.split(",") if n.strip()]:
        if name in runs and "error" not in runs[name]:
            label = "unpruned" if name == "none" else "pinned operating point" if name.startswith(
                "toprovar") and not args.calibration else "policy run"
            sections.append(breakdown_section(f"Where the time goes: {name} ({label})", runs[name], cfg.depth))
    title = (f"End to end, {args.model} {resolution}px {DTYPE_LABELS.get(dtype_name, dtype_name)}, batch 1 + CFG "
             f"(median of {args.runs}, {clock})")
    md = write_results(stem, payload, rows, title, args.out, sections)
    return payload, rows, md


def cmd_bench(args: argparse.Namespace) -> int:
    """``toprovar bench``: exit 0 with every policy run and the results written; a failing policy is one error
    line (exit 2) and nothing is written."""
    payload, rows, md = run_benchmark(args)
    print(md.read_text())
    print(md.with_suffix(".json"))
    print(md)
    return 0
