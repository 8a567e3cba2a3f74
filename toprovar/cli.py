"""``toprovar`` command line: generate (PyTorch pipeline or an exported engine directory), calibrate, bench,
policies."""
from __future__ import annotations

import argparse
import sys

from .cli_args import DTYPES, add_generation_args, add_model_args, print_report


def cmd_generate(args: argparse.Namespace) -> int:
    from .runtime.cli_engine import cmd_generate_engine, wants_engine_dir
    if wants_engine_dir(args):  # --engine-dir DIR --backend {trt,onnxruntime,torch}
        return cmd_generate_engine(args)
    from .images import save_images
    from .pipeline import Pipeline
    from .policy import make_policy
    from .config import get_config
    calibration = args.calibration or get_config(args.model).packaged_calibration(args.weights)
    policy = make_policy(args.policy, str(calibration) if calibration else None)
    from .pipeline import resolve_schedule
    resolve_schedule(get_config(args.model), args.resolution, args.h_div_w)  # a bad --resolution before loading
    pipe = Pipeline.load(args.model, checkpoint=args.checkpoint, vae=args.vae, t5=args.t5,
                         device=args.device, dtype=DTYPES[args.dtype], seed=args.weights_seed, weights=args.weights)
    pipe.compile = args.compile
    if pipe.random_weights:
        print(f"note: model '{args.model}' has RANDOM weights (no --checkpoint given): the image is noise-like "
              "and shows the pipeline, not a trained model", file=sys.stderr)
    res = pipe.generate(args.prompt, seed=args.seed, resolution=args.resolution, h_div_w=args.h_div_w,
                        cfg=args.cfg, tau=args.tau, top_p=args.top_p, policy=policy, profile=args.profile)
    print_report(res, args.profile)
    if args.profile:  # policy report: kept fraction per scale and layer, FLOPs relative to unpruned
        from .policy.flops import format_report, policy_report
        print(format_report(policy_report(res.trace, pipe.cfg)), file=sys.stderr)
    save_images(res.images, args.output)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="toprovar", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    g = sub.add_parser("generate", help="generate images from text")
    add_model_args(g)
    add_generation_args(g)
    from .runtime.cli_engine import add_engine_args
    add_engine_args(g)
    g.set_defaults(func=cmd_generate)
    from .policy.calibrate import add_calibrate_args, cmd_calibrate
    c = sub.add_parser("calibrate", help="calibrate ToProVAR (tau, layer scores) on a prompt list -> JSON")
    add_calibrate_args(c)
    c.set_defaults(func=cmd_calibrate)
    from .benchmark.e2e import add_bench_args, cmd_bench
    b = sub.add_parser("bench", help="end-to-end benchmark of the policies -> JSON + Markdown (per scale, per piece)")
    add_bench_args(b)
    b.set_defaults(func=cmd_bench)
    sub.add_parser("policies", help="list pruning policies").set_defaults(
        func=lambda a: print("\n".join(__import__("toprovar.policy", fromlist=["POLICIES"]).POLICIES)) or 0)
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError, RuntimeError) as exc:
        msg = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        print(f"toprovar: error: {msg}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
