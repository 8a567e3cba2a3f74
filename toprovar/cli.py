"""``toprovar`` command line: generate (PyTorch pipeline or an exported engine directory), calibrate, bench,
policies."""
from __future__ import annotations

import argparse
import sys

import torch

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _floats(text: str) -> float | list[float]:
    vals = [float(v) for v in text.split(",")]
    return vals[0] if len(vals) == 1 else vals


def add_model_args(p: argparse.ArgumentParser) -> None:
    """Which model and weights to load, and where (shared by ``generate`` and ``calibrate``)."""
    p.add_argument("--model", default="shapes",
                   help="shapes (trained, packaged; default) | tiny (random) | infinity-2b | infinity-8b")
    p.add_argument("--weights", default=None, help="weights directory of a trained small model "
                   "(model/vae/text_encoder .safetensors; default: the model's packaged one)")
    p.add_argument("--checkpoint", default=None, help="transformer weights (.pth or .safetensors)")
    p.add_argument("--vae", default=None, help="VAE weights (official .pth or .safetensors)")
    p.add_argument("--t5", default=None, help="local flan-t5-xl directory")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    p.add_argument("--weights-seed", type=int, default=0, help="seed of the random weights (no checkpoint)")


def add_generation_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--prompt", action="append", required=True, help="text prompt (repeat for a batch)")
    p.add_argument("-o", "--output", default="output/toprovar.png",
                   help="PNG path (with several prompts, _i is appended)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--cfg", type=_floats, default=None, help="CFG scale, or one per scale: 1,1,3,...")
    p.add_argument("--tau", type=_floats, default=None, help="sampling temperature, or one per scale")
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--resolution", type=int, default=None, help="longer image side in pixels")
    p.add_argument("--h-div-w", type=float, default=1.0, help="aspect ratio h/w")
    p.add_argument("--policy", default="none", help="pruning policy (see `toprovar policies`)")
    p.add_argument("--calibration", default=None,
                   help="calibration JSON for the policy (default: the weights directory's calibration.json)")
    p.add_argument("--profile", action="store_true", help="per-scale timing and kept tokens")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the blocks and the VAE decoder (pays off over many images, not one)")


def cmd_generate(args: argparse.Namespace) -> int:
    from .runtime.cli_engine import cmd_generate_engine, wants_engine_dir
    if wants_engine_dir(args):  # --engine-dir DIR --backend {trt,onnxruntime,torch}
        return cmd_generate_engine(args)
    from .pipeline import Pipeline, save_images
    from .policy import make_policy
    from .config import get_config
    calibration = args.calibration or get_config(args.model).packaged_calibration(args.weights)
    policy = make_policy(args.policy, str(calibration) if calibration else None)
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


def print_report(res, profile: bool) -> None:
    """Per-scale kept-token table (and time with --profile) on stderr."""
    if not profile:
        return
    print(f"{'scale':>5} {'tokens':>7} {'kept%':>7} {'cfg':>4} {'ms':>9}", file=sys.stderr)
    for si, n in res.trace.tokens.items():
        kept = res.trace.kept[si]
        frac = sum(kept) / max(1, n * len(kept))
        ms = res.scale_ms[si] if si < len(res.scale_ms) else float("nan")
        print(f"{si:>5} {n:>7} {100 * frac:>6.1f}% {'x2' if res.trace.cfg_batch[si] else 'x1':>4} {ms:>9.2f}",
              file=sys.stderr)


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
