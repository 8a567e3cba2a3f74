"""Runtime check on a GPU machine: one export directory, several backends, the same seeds.

    python bench/runtime_gpu.py --out-dir /tmp/export-tiny            # exports the tiny model first

For each (backend, device, policy): per-scale time (CUDA events on CUDA) and kept tokens of a profiled run
after a warm-up, and the agreement of its sampled bits with the ONNX Runtime CPU backend (the reference
every backend is compared with in tests). Results: bench/results/runtime_gpu_<model>.{json,md}.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import environment, write_results  # noqa: E402

from toprovar.policy import make_policy  # noqa: E402
from toprovar.runtime.engine_dir import EngineRuntime  # noqa: E402

RUNS = [("onnxruntime", "cpu"), ("torch", "cpu"), ("torch", "cuda"), ("onnxruntime", "cuda"), ("trt", "cuda")]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--model", default="tiny")
    ap.add_argument("--out-dir", required=True, help="export directory (exported here unless it has a manifest)")
    ap.add_argument("--policies", default="none,toprovar")
    ap.add_argument("--prompt", default="a red fox in the snow")
    ap.add_argument("--seed", type=int, default=1)
    args = ap.parse_args()
    out = Path(args.out_dir)
    if not (out / "manifest.json").is_file():
        from toprovar.export.onnx_export import ExportRequest, export_model
        t0 = time.perf_counter()
        export_model(ExportRequest(model=args.model, out=str(out), progress=False))
        print(f"exported {args.model} in {time.perf_counter() - t0:.1f} s", flush=True)
    rows, payload = [], {"model": args.model, "prompt": args.prompt, "seed": args.seed, "runs": []}
    refs = {}
    for policy in args.policies.split(","):
        for backend, device in RUNS:
            try:
                rt = EngineRuntime.open(out, backend, device)
            except Exception as exc:  # backend not available on this machine: recorded, not fatal
                payload["runs"].append({"backend": backend, "device": device, "policy": policy,
                                        "unavailable": str(exc).splitlines()[0]})
                print(f"{backend}/{device}: unavailable: {str(exc).splitlines()[0]}", flush=True)
                continue
            rt.generate([args.prompt], seed=args.seed, policy=make_policy(policy), progress=False)  # warm-up
            res = rt.generate([args.prompt], seed=args.seed, policy=make_policy(policy), profile=True,
                              progress=False)
            bits = [b.cpu() for b in res.bits]
            ref = refs.setdefault(policy, bits)
            same = sum(int((a == b).sum()) for a, b in zip(bits, ref)) if len(bits) == len(ref) else 0
            total = sum(b.numel() for b in ref)
            scales_equal = [bool(torch.equal(a, b)) for a, b in zip(bits, ref)]
            run = {"backend": backend, "device": device, "policy": policy, "scale_ms": res.scale_ms,
                   "stage_ms": res.stage_ms, "kept": {str(k): v for k, v in res.trace.kept.items()},
                   "bits_agree_with_onnxruntime_cpu": same / total, "scales_equal": scales_equal}
            payload["runs"].append(run)
            print(f"{backend}/{device} {policy}: {sum(res.scale_ms):.1f} ms over scales, bits agree "
                  f"{same}/{total}, equal scales {sum(scales_equal)}/{len(scales_equal)}", flush=True)
            for si, ms in enumerate(res.scale_ms):
                n = res.trace.tokens[si]
                kept = res.trace.kept[si]
                rows.append({"backend": f"{backend}/{device}", "policy": policy, "scale": si, "tokens": n,
                             "kept_frac": sum(kept) / max(1, n * len(kept)), "ms": ms})
    payload["environment"] = environment()
    md = write_results(f"runtime_gpu_{args.model}", payload, rows,
                       f"runtime backends on one export ({args.model}), per-scale time and kept tokens")
    print(md.read_text())


if __name__ == "__main__":
    main()
