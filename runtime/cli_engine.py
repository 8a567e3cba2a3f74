"""``toprovar generate --engine-dir DIR --backend {trt,onnxruntime,torch}``: generation from an export."""
from __future__ import annotations

import argparse
import sys
import time

from .engine_dir import BACKENDS, EngineDirError, check_backend


def add_engine_args(p: argparse.ArgumentParser) -> None:
    """The engine-directory flags of ``toprovar generate``."""
    g = p.add_argument_group("export directory (toprovar-export output)")
    g.add_argument("--engine-dir", default=None, metavar="DIR",
                   help="generate from this export directory (manifest.json, onnx/, engine/); --model and --dtype "
                        "come from its manifest")
    g.add_argument("--backend", default="torch", metavar="{" + ",".join(BACKENDS) + "}",
                   help="trt: TensorRT engines (CUDA); onnxruntime: the ONNX pieces (CPU, or CUDA with "
                        "onnxruntime-gpu); torch: the PyTorch modules (default)")
    g.add_argument("--plugin", default=None, metavar="LIB",
                   help="TensorRT FAE plugin library (default: $TOPROVAR_FAE_PLUGIN, the export's plugins/, "
                        "build/native/)")
    g.add_argument("--cuda-graph", action="store_true", help="TensorRT: capture CUDA graphs of unpruned calls")
    g.add_argument("--no-verify", action="store_true", help="skip the sha256 check of pieces and engines")


def wants_engine_dir(args: argparse.Namespace) -> bool:
    return bool(getattr(args, "engine_dir", None)) or getattr(args, "backend", "torch") != "torch"


def cmd_generate_engine(args: argparse.Namespace) -> int:
    """Generate with ``EngineRuntime``; same outputs and report as the PyTorch pipeline path."""
    from toprovar.images import save_images
    from toprovar.policy import make_policy
    from .engine_dir import EngineRuntime
    backend = check_backend(args.backend)
    if not args.engine_dir:
        raise EngineDirError(f"--backend {backend} needs --engine-dir DIR (a toprovar-export output directory)")
    from toprovar.export.manifest import load_manifest
    from toprovar.policy.base import check_calibration_model
    manifest = load_manifest(args.engine_dir)
    calibration = args.calibration or packaged_calibration(manifest)
    policy = make_policy(args.policy, str(calibration) if calibration else None)
    check_calibration_model(policy, manifest["model"].get("name", ""))
    t0 = time.perf_counter()
    rt = EngineRuntime.open(args.engine_dir, backend, args.device, verify=not args.no_verify, plugin=args.plugin,
                            cuda_graph=args.cuda_graph, checkpoint=args.checkpoint, vae=args.vae, t5=args.t5)
    load_s = time.perf_counter() - t0
    if rt.manifest.get("random_weights"):
        print(f"note: export of model '{rt.cfg.name}' has RANDOM weights: the image is noise-like and shows the "
              "pipeline, not a trained model", file=sys.stderr)
    res = rt.generate(args.prompt, seed=args.seed, resolution=args.resolution,
                      h_div_w=args.h_div_w if args.h_div_w != 1.0 else None, cfg=args.cfg, tau=args.tau,
                      top_p=args.top_p, policy=policy, profile=args.profile)
    from toprovar.cli_args import print_report
    print_report(res, args.profile)
    if args.profile:
        total = sum(res.scale_ms) + sum(res.stage_ms.values())
        stages = ", ".join(f"{k} {v:.2f} ms" for k, v in res.stage_ms.items())
        print(f"backend {rt.backend_name} on {rt.backend.device}: {stages}, total {total:.2f} ms "
              f"(load {load_s:.1f} s)", file=sys.stderr)
        try:
            from toprovar.policy.flops import format_report, policy_report
            print(format_report(policy_report(res.trace, rt.cfg)), file=sys.stderr)
        except ImportError:
            pass
    save_images(res.images, args.output)
    return 0


def packaged_calibration(manifest):
    """The calibration the pipeline path uses for the export's weights: the packaged (or --weights) directory's
    calibration.json when the export was made from such a directory, else None."""
    from toprovar.config import get_config
    weights = manifest.get("weights")
    if not isinstance(weights, dict):
        return None
    try:
        cfg = get_config(manifest["model"].get("name", ""))
    except ValueError:
        return None
    return cfg.packaged_calibration(weights.get("dir"))


__all__ = ["add_engine_args", "cmd_generate_engine", "wants_engine_dir"]
