"""Which CUDA kernels one generation spends its GPU time in (torch.profiler, kernel level).

Runs the PyTorch pipeline eagerly (no CUDA graphs: every kernel launch is seen; torch.compile'd pieces
unless --no-compile) after warm-up, at 1024x1024 (every scale) and at 256x256 (only the first scales,
the launch-bound regime), and groups kernel time: matrix products, attention, Triton (Inductor's fused
elementwise/reduction kernels), sort, copies/indexing, convolutions, other. ``--overhead`` also sums the GPU
kernel time of pinned ToProVAR and of a replay of its kept-token sets: their difference is the policy's
device work (what it adds inside whole-scale graphs, where launch gaps are ~1 us), a far less noisy number
than the difference of two end-to-end latencies.

    python bench/kernel_profile.py --model infinity-2b --overhead   # bench/results/kernel_profile_infinity-2b.{json,md}
"""
from __future__ import annotations

import argparse
import re
from collections import defaultdict

import torch
from common import environment, write_results

from toprovar.benchmark.e2e import Recorder, ReplayPolicy, build_policy
from toprovar.pipeline import Pipeline, resolve_schedule

GROUPS = [("matmul", r"gemm|gemv|cutlass|sm90_xmma|nvjet|cublas"), ("attention", r"fmha|flash|attention|fae"),
          ("conv", r"conv|implicit|winograd|cudnn"), ("sort", r"sort|radix"),
          ("triton", r"^triton_"), ("copy/index", r"copy|index|gather|scatter|cat|fill")]


def group(name: str) -> str:
    for g, pat in GROUPS:
        if re.search(pat, name, re.I):
            return g
    return "other"


def profile_once(pipe, text, lengths, resolution, make_policy):
    """{kernel name: [launches, GPU ms]} of one generation with ``make_policy()`` (after two warm-up runs)."""
    def gen():
        return pipe.generate_from_features(text, lengths, seed=1, resolution=resolution, cfg=3.0, tau=0.5,
                                           policy=make_policy(), progress=False)
    for _ in range(2):
        gen()
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        gen()
        torch.cuda.synchronize()
    kernels = defaultdict(lambda: [0, 0.0])
    for ev in prof.events():
        if ev.device_type == torch.autograd.DeviceType.CUDA:
            k = kernels[ev.name]
            k[0] += 1
            k[1] += ev.device_time_total / 1e3 if hasattr(ev, "device_time_total") else ev.cuda_time_total / 1e3
    return kernels


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="infinity-2b")
    ap.add_argument("--policy", default="none")
    ap.add_argument("--no-compile", action="store_true")
    ap.add_argument("--top", type=int, default=12)
    ap.add_argument("--overhead", action="store_true",
                    help="also: GPU kernel time of pinned ToProVAR minus a replay of its kept sets (policy work)")
    args = ap.parse_args()
    dev = torch.device("cuda")
    pipe = Pipeline.load(args.model, device="cuda", dtype=torch.bfloat16, text_encoder=False)
    pipe.cuda_graphs, pipe.compile = False, not args.no_compile
    g = torch.Generator().manual_seed(0)
    text = torch.randn(1, 32, pipe.cfg.text_channels, generator=g).to(dev)
    lengths = torch.tensor([32], dtype=torch.int32, device=dev)
    rows, payload = [], {"model": args.model, "policy": args.policy, "compile": pipe.compile,
                         "environment": environment(dev), "runs": {}}
    depth = pipe.cfg.depth
    for res in (1024, 256):
        S = len(resolve_schedule(pipe.cfg, res, 1.0))
        kernels = profile_once(pipe, text, lengths, res, lambda: build_policy(args.policy, depth, None, S))
        total = sum(t for _, t in kernels.values())
        launches = sum(c for c, _ in kernels.values())
        groups = defaultdict(lambda: [0, 0.0])
        for name, (c, t) in kernels.items():
            gr = groups[group(name)]
            gr[0] += c
            gr[1] += t
        payload["runs"][res] = {"gpu_ms": total, "launches": launches,
                                "groups": {k: {"launches": c, "ms": t} for k, (c, t) in groups.items()},
                                "top": sorted(([n, c, t] for n, (c, t) in kernels.items()), key=lambda r: -r[2])[:40]}
        for k, (c, t) in sorted(groups.items(), key=lambda kv: -kv[1][1]):
            rows.append({"resolution": res, "group": k, "launches": c, "GPU ms": t, "share %": 100 * t / total,
                         "us per launch": 1e3 * t / max(c, 1)})
        rows.append({"resolution": res, "group": "all", "launches": launches, "GPU ms": total, "share %": 100.0,
                     "us per launch": 1e3 * total / max(launches, 1)})
        print(f"{res}px: {total:.1f} ms GPU in {launches} launches", flush=True)
        for n, c, t in payload["runs"][res]["top"][:args.top]:
            print(f"  {t:8.2f} ms {c:6d}x  {n[:110]}", flush=True)
    if args.overhead:  # GPU kernel time of ToProVAR (pinned) minus a replay of its kept sets, 1024x1024
        S = len(resolve_schedule(pipe.cfg, 1024, 1.0))
        rec = Recorder(build_policy("toprovar", depth, None, S))
        prof = pipe.generate_from_features(text, lengths, seed=1, resolution=1024, cfg=3.0, tau=0.5, policy=rec,
                                           progress=False)
        replay = ReplayPolicy(dict(rec.log), set(prof.trace.kept), dict(prof.trace.cfg_batch))
        ms, per = {}, {}
        for name, make in (("toprovar", lambda: build_policy("toprovar", depth, None, S)), ("replay", lambda: replay)):
            per[name] = profile_once(pipe, text, lengths, 1024, make)
            ms[name] = sum(t for _, t in per[name].values())
        payload["overhead_kernel_ms"] = ms
        # the kernels whose time differs most between the two: what the policy's device work consists of
        names = set(per["toprovar"]) | set(per["replay"])
        delta = sorted(([n, per["toprovar"].get(n, [0, 0.0])[0] - per["replay"].get(n, [0, 0.0])[0],
                         per["toprovar"].get(n, [0, 0.0])[1] - per["replay"].get(n, [0, 0.0])[1]] for n in names),
                       key=lambda r: -abs(r[2]))[:args.top]
        payload["overhead_kernel_deltas"] = delta
        for n, dc, dt in delta:
            print(f"  {dt:+8.2f} ms {dc:+6d}x  {n[:110]}", flush=True)
        rows.append({"resolution": 1024, "group": "toprovar minus replay (policy kernels)", "launches": 0,
                     "GPU ms": ms["toprovar"] - ms["replay"], "share %": 100 * (ms["toprovar"] - ms["replay"])
                     / ms["toprovar"], "us per launch": 0.0})
        print(f"policy kernels: toprovar {ms['toprovar']:.1f} ms GPU, replay {ms['replay']:.1f} ms", flush=True)
    write_results(f"kernel_profile_{args.model}", payload, rows,
                  f"GPU kernel time of one generation, {args.model} bf16, policy {args.policy}, "
                  f"{'compiled' if pipe.compile else 'eager'} pieces, no CUDA graphs (torch.profiler)")


if __name__ == "__main__":
    main()
