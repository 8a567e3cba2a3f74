"""``toprovar`` command line: generate (PyTorch pipeline or an exported engine directory), calibrate, bench,
policies."""
from __future__ import annotations

import argparse
import sys

from .cli_args import (DTYPES, vae_dtype, OneLineParser, add_generation_args, add_model_args, check_device, end_progress_lines, error_line,
                       print_report)


def cmd_generate(args: argparse.Namespace) -> int:
    from .images import output_paths, save_images
    from .runtime.cli_engine import cmd_generate_engine, wants_engine_dir
    check_device(args.device)
    output_paths(args.output, len(args.prompt))  # refused before any work
    if wants_engine_dir(args):  # --engine-dir DIR --backend {trt,onnxruntime,torch}
        return cmd_generate_engine(args)
    from .config import get_config
    from .pipeline import Pipeline, resolve_schedule
    from .policy import make_policy
    from .policy.base import check_calibration_model
    from .sampling import check_sampling
    model_cfg = get_config(args.model)
    schedule = resolve_schedule(model_cfg, args.resolution, args.h_div_w)
    check_sampling(model_cfg.default_cfg if args.cfg is None else args.cfg,
                   model_cfg.default_tau if args.tau is None else args.tau,
                   model_cfg.top_p if args.top_p is None else args.top_p, len(schedule))
    calibration = args.calibration or model_cfg.packaged_calibration(args.weights)
    policy = make_policy(args.policy, str(calibration) if calibration else None)
    check_calibration_model(policy, model_cfg.name)
    pipe = Pipeline.load(args.model, checkpoint=args.checkpoint, vae=args.vae, t5=args.t5,
                         device=args.device, dtype=DTYPES[args.dtype], seed=args.weights_seed, weights=args.weights,
                         keep_fp32_params=args.keep_fp32_params, vae_dtype=vae_dtype(args.vae_dtype))
    pipe.compile = args.compile
    if pipe.random_weights:
        print(f"note: model '{args.model}' has RANDOM weights ({', '.join(pipe.random_parts)}): the image is "
              "noise-like and shows the pipeline, not a trained model", file=sys.stderr)
    res = pipe.generate(args.prompt, seed=args.seed, resolution=args.resolution, h_div_w=args.h_div_w,
                        cfg=args.cfg, tau=args.tau, top_p=args.top_p, policy=policy, profile=args.profile)
    print_report(res, args.profile)
    if args.profile:  # policy report: kept fraction per scale and layer, FLOPs relative to unpruned
        from .policy.flops import format_report, policy_report
        print(format_report(policy_report(res.trace, pipe.cfg)), file=sys.stderr)
    save_images(res.images, args.output)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = OneLineParser(prog="toprovar", description=__doc__)
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
    from .serving import add_client_args, add_serve_args, cmd_client, cmd_serve
    s = sub.add_parser("serve", help="serve the model with Triton Inference Server (HTTP, gRPC, metrics)")
    add_serve_args(s)
    s.set_defaults(func=cmd_serve)
    cl = sub.add_parser("client", help="request images from a `toprovar serve` server -> PNG")
    add_client_args(cl)
    cl.set_defaults(func=cmd_client)
    sub.add_parser("policies", help="list pruning policies").set_defaults(
        func=lambda a: print("\n".join(__import__("toprovar.policy", fromlist=["POLICIES"]).POLICIES)) or 0)
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except KeyboardInterrupt:
        end_progress_lines()
        print("toprovar: interrupted; no output was written (nor a partial one)", file=sys.stderr)
        return 130
    except (ValueError, OSError, RuntimeError) as exc:
        print(f"toprovar: error: {error_line(exc)}", file=sys.stderr)
        return 2



if __name__ == "__main__":
    sys.exit(main())
