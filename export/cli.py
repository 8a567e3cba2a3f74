"""``toprovar-export``: export the model and the policy as ONNX pieces + manifest, optionally TensorRT engines.

    toprovar-export --model tiny --out export/                       # ONNX pieces + manifest.json
    toprovar-export --model infinity-2b --checkpoint infinity_2b.pth --vae infinity_vae_d32.pth \\
        --t5 flan-t5-xl/ --resolution 1024 --dtype bfloat16 --out export-2b/ --engines

Layout (demo/Diffusion style): OUT/onnx/*.onnx, OUT/engine/*.plan, OUT/manifest.json (docs/export-format.md).
    toprovar-export --model shapes --out export-shapes/ --dtype bfloat16 --engines --trt-flavor rtx \
        --trt-target sm86,sm89,sm120                                  # TensorRT-RTX engines, no GPU needed

Exit status: 0 done; 2 bad input (one error line); 3 TensorRT not importable (the ONNX export is done).
"""
from __future__ import annotations

import argparse
import fnmatch
import os
import sys
from pathlib import Path

PROG = "toprovar-export"
EXIT_INPUT, EXIT_NO_TENSORRT = 2, 3


def build_parser() -> argparse.ArgumentParser:
    from toprovar.cli_args import OneLineParser, aspect_ratio, positive_int, seed_value
    from .onnx_export import DEFAULT_OPSET, DTYPES
    p = OneLineParser(prog=PROG, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("model")
    g.add_argument("--model", default="tiny",
                   choices=["tiny", "shapes", "scenes", "infinity-2b", "infinity-8b", "hart-0.7b", "hart-tiny"],
                   help="shapes loads its packaged trained weights (or --weights DIR); scenes needs --weights DIR "
                        "(tools/train_small.py --model scenes)")
    g.add_argument("--weights", default=None, help="weights directory of a trained small model (model/vae/"
                                                     "text_encoder .safetensors, tools/train_small.py)")
    g.add_argument("--checkpoint", default=None, help="transformer weights (.pth or .safetensors); default: random")
    g.add_argument("--vae", "--tokenizer", dest="vae", default=None,
                   help="VAE weights (official .pth or .safetensors); HART: the tokenizer; default: random")
    g.add_argument("--t5", default=None, help="local T5 directory for the text_encoder piece (real models; "
                                              "without it the piece is skipped, noted in the manifest)")
    g.add_argument("--weights-seed", type=seed_value, default=0, help="seed of the random weights (no checkpoint)")
    g.add_argument("--resolution", type=positive_int, default=None, help="longer image side in pixels (default: the "
                                                                 "model's default preset)")
    g.add_argument("--h-div-w", type=aspect_ratio, default=1.0,
                   help="aspect ratio h/w of the schedule, 0.333..3 (the nearest template is used)")
    g.add_argument("--calibration", default=None, help="calibration JSON (`toprovar calibrate`): policy parameters "
                                                       "of the policy_sXX pieces and the profiles' token minimum")
    g = p.add_argument_group("ONNX")
    g.add_argument("--out", required=True, help="export directory (manifest.json, onnx/, engine/)")
    g.add_argument("--onnx-dir", default=None, help="ONNX directory inside --out (default OUT/onnx)")
    g.add_argument("--opset", "--onnx-opset", dest="opset", type=int, default=DEFAULT_OPSET,
                   help=f"ONNX opset (>= 18; default {DEFAULT_OPSET})")
    g.add_argument("--dtype", choices=sorted(DTYPES), default="float32",
                   help="matrix/KV dtype of the pieces (norms, AdaLN, head and sampling stay float32)")
    g.add_argument("--keep-fp32-params", action="store_true",
                   help="with --dtype bfloat16/float16: keep the blocks' ada_gss, ca_norm and scale_mul float32 "
                        "(default: cast like the official load_infinity)")
    g.add_argument("--batch-size", type=positive_int, default=1, help="prompts per generation the engines are tuned for")
    g.add_argument("--max-batch-size", type=positive_int, default=None, help="largest batch (prompts) the engines accept "
                                                                    "(default: max(4, --batch-size))")
    g.add_argument("--pieces", nargs="+", default=None, metavar="NAME",
                   help="export (and build engines of) only these pieces (names or patterns like 'block_*'); "
                        "the manifest lists only them")
    g.add_argument("--jobs", type=positive_int, default=1, help="export worker processes (each holds the model: for "
                                                               "small models or machines with memory to spare); also "
                                                               "the TensorRT-RTX engine build processes")
    g.add_argument("--skip-export", action="store_true", help="reuse OUT's pieces (verified) and only build engines")
    g = p.add_argument_group("TensorRT")
    g.add_argument("--engines", action="store_true", help="also build TensorRT engines (--trt-flavor)")
    g.add_argument("--trt-flavor", "--trt-flavour", dest="trt_flavor", choices=["tensorrt", "rtx"], default="tensorrt",
                   help="tensorrt: TensorRT 11, built on the GPU it runs on; rtx: TensorRT-RTX, built ahead of time "
                        "(no GPU needed) for RTX GPUs of --trt-target")
    g.add_argument("--trt-target", default=None, metavar="SM,...",
                   help="TensorRT-RTX compute capabilities, comma separated (sm80, sm86, sm89, sm120, sm121; default "
                        "sm86,sm89,sm120: RTX 30xx/40xx/50xx)")
    g.add_argument("--engine-dir", default=None, help="engine directory inside --out (default OUT/engine)")
    g.add_argument("--plugin", "--plugins", dest="plugins", nargs="+", default=None, metavar="PATH",
                   help="FAE TensorRT plugin library (default $TOPROVAR_FAE_PLUGIN; without one the _entropy pieces "
                        "are built from the ONNX function body)")
    g.add_argument("--timing-cache", default=None, help="timing cache file (default OUT/engine/timing.cache; "
                                                        "TensorRT only)")
    g.add_argument("--optimization-level", type=int, default=None, choices=range(6), metavar="0-5",
                   help="builder optimization level (default: the builder's, 3)")
    g.add_argument("--workspace", type=float, default=8.0, help="builder workspace limit in GiB")
    p.add_argument("-v", "--verbose", action="store_true", help="exporter and TensorRT logs")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def _fmt_bytes(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def _fmt_tensor(t: dict) -> str:
    short = {"float32": "f32", "float16": "f16", "bfloat16": "bf16", "int64": "i64", "int32": "i32"}
    dt = short.get(t["dtype"], t["dtype"])
    return f"{t['name']}[{','.join(str(d) for d in t['shape'])}]{dt}"


def summary_table(manifest: dict) -> str:
    """piece | file | size | inputs (one row per piece), then engines and notes."""
    rows = []
    for name, pc in manifest["pieces"].items():
        size = pc["bytes"] + sum(e["bytes"] for e in pc.get("external_data", []))
        rows.append((name, pc["file"] + (" (+data)" if pc.get("external_data") else ""), _fmt_bytes(size),
                     " ".join(_fmt_tensor(t) for t in pc["inputs"])))
    head = ("piece", "file", "size", "inputs")
    w = [max(len(r[i]) for r in rows + [head]) for i in range(3)]
    lines = [f"{head[0]:<{w[0]}}  {head[1]:<{w[1]}}  {head[2]:>{w[2]}}  {head[3]}",
             f"{'-' * w[0]}  {'-' * w[1]}  {'-' * w[2]}  {'-' * 6}"]
    lines += [f"{a:<{w[0]}}  {b:<{w[1]}}  {c:>{w[2]}}  {d}" for a, b, c, d in rows]
    total = sum(pc["bytes"] + sum(e["bytes"] for e in pc.get("external_data", []))
                for pc in manifest["pieces"].values())
    lines.append(f"{len(rows)} pieces, {_fmt_bytes(total)}, dtype {manifest['dtype']}, "
                 f"{len(manifest['schedule'])} scales up to {manifest['schedule'][-1]}")
    if manifest.get("engines"):
        engines = manifest["engines"]
        e0 = next(iter(engines.values()))
        where = f"for {','.join(e0['targets'])}" if e0.get("targets") else f"for {e0.get('gpu')}"
        fae = sorted({e["fae"] for e in engines.values() if e.get("fae")})
        lines.append(f"{len(engines)} engines ({'TensorRT-RTX' if e0['flavour'] == 'rtx' else 'TensorRT'} "
                     f"{e0['tensorrt']} {where}, {_fmt_bytes(sum(e.get('bytes', 0) for e in engines.values()))}"
                     + (f", FAE: {'/'.join(fae)}" if fae else "") + ")")
    for note in manifest.get("notes", []):
        lines.append(f"note: {note}")
    return "\n".join(lines)


def check_args(args: argparse.Namespace) -> None:
    """Every argument that can be checked without exporting (ValueError, one line naming it): the output
    directories, the opset range, batch sizes, the schedule of --resolution / --h-div-w, the weight files,
    the calibration (its format and its model). Called before anything is written."""
    from toprovar.config import get_config
    from toprovar.outputs import check_output_dir
    from . import fae_onnx
    from .onnx_export import max_opset, resolve_schedule
    out = check_output_dir(args.out, "--out")
    for arg, sub in (("--onnx-dir", args.onnx_dir), ("--engine-dir", args.engine_dir)):
        if sub:
            check_output_dir(sub, arg)
            try:
                Path(sub).resolve().relative_to(out.resolve())
            except ValueError:
                raise ValueError(f"{arg} {sub} must lie inside --out {out} (the manifest uses relative paths)") \
                    from None
    if args.skip_export:
        return
    top = max_opset()
    if not fae_onnx.MIN_OPSET <= args.opset <= top:
        raise ValueError(f"--opset: {args.opset} is outside the range this exporter writes, "
                         f"{fae_onnx.MIN_OPSET}..{top}")
    if args.max_batch_size is not None and args.max_batch_size < args.batch_size:
        raise ValueError(f"--max-batch-size {args.max_batch_size} is smaller than --batch-size {args.batch_size}")
    cfg = get_config(args.model)
    _, schedule = resolve_schedule(cfg, args.resolution, args.h_div_w)
    cfg.weight_files(args.weights, args.checkpoint)  # a missing --weights directory
    from toprovar.inputs import file_problem
    for arg, path in (("--checkpoint", args.checkpoint), ("--vae", args.vae), ("--calibration", args.calibration)):
        problem = path and file_problem(path)
        if problem:
            raise ValueError(f"{arg}: {path}: {problem}")
    if args.t5 and not (Path(args.t5) / "config.json").is_file():
        raise ValueError(f"--t5: {args.t5} is not a T5 directory (no config.json)")
    if args.calibration:
        from toprovar.policy import make_policy
        from toprovar.policy.base import check_calibration_model
        pol = make_policy("toprovar", args.calibration)
        check_calibration_model(pol, cfg.name)
        pol.config.check_model(cfg.depth, len(schedule))


def _error(msg: str) -> None:
    print(f"{PROG}: error: {msg}", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from toprovar.model.checkpoint import CheckpointError
    from .engine import EngineError, TensorRTUnavailable, build_engines, import_tensorrt, plugin_paths
    from .trt_flavour import TargetError, parse_targets
    from .manifest import ManifestError, load_manifest, verify
    from .onnx_export import ExportError, ExportRequest, export_model
    out = Path(args.out)
    created = not os.path.lexists(out)
    try:
        check_args(args)
        no_trt = None
        if args.engines:  # fail before a long export, not after it (without TensorRT: export, then say so)
            if args.trt_flavor == "rtx":
                parse_targets(args.trt_target)
            elif args.trt_target:
                raise TargetError("--trt-target: only with --trt-flavor rtx")
            plugin_paths(args.plugins)
            try:
                import_tensorrt(args.trt_flavor)
            except TensorRTUnavailable as exc:
                no_trt = exc
        if args.skip_export:
            manifest = load_manifest(out)
            verify(manifest)
        else:
            req = ExportRequest(model=args.model, out=str(out), checkpoint=args.checkpoint, vae=args.vae, t5=args.t5,
                                resolution=args.resolution, h_div_w=args.h_div_w, dtype=args.dtype, opset=args.opset,
                                onnx_dir=args.onnx_dir, calibration=args.calibration, weights_seed=args.weights_seed, weights=args.weights,
                                batch_size=args.batch_size, keep_fp32_params=args.keep_fp32_params,
                                max_batch_size=args.max_batch_size or max(4, args.batch_size),
                                only=args.pieces, jobs=args.jobs, verbose=args.verbose,
                                progress=not args.no_progress)
            export_model(req)
            manifest = load_manifest(out)
        print(summary_table(manifest))
        print(f"manifest: {manifest.path}")
        if not args.engines:
            return 0
        if no_trt is not None:
            _error(f"{no_trt}; ONNX export is done, engines were not built")
            return EXIT_NO_TENSORRT
        try:
            names = ([n for n in manifest["pieces"] if any(fnmatch.fnmatchcase(n, p) for p in args.pieces)]
                     if args.pieces else None)
            manifest = build_engines(manifest, Path(args.engine_dir) if args.engine_dir else None, args.plugins,
                                     args.timing_cache, names=names, workspace=int(args.workspace * (1 << 30)),
                                     opt_level=args.optimization_level, verbose=args.verbose,
                                     progress=not args.no_progress, flavour=args.trt_flavor, targets=args.trt_target,
                                     jobs=args.jobs)
        except TensorRTUnavailable as exc:
            _error(f"{exc}; ONNX export is done, engines were not built")
            return EXIT_NO_TENSORRT
        print(summary_table(load_manifest(out)))
        return 0
    except (ExportError, ManifestError, EngineError, CheckpointError, ValueError, OSError) as exc:
        from toprovar.cli_args import error_line
        _error(error_line(exc))
        _remove_if_empty(out, created)
        return EXIT_INPUT
    except KeyboardInterrupt:
        from toprovar.cli_args import end_progress_lines
        end_progress_lines()
        _error("interrupted; completed pieces are in place, the manifest was not rewritten")
        _remove_if_empty(out, created)
        return 130


def _remove_if_empty(out: Path, created: bool) -> None:
    """Remove --out (and its onnx/ and engine/) when this run created it and left nothing in it."""
    if not created:
        return
    for d in (out / "onnx", out / "engine", out):
        try:
            d.rmdir()
        except OSError:
            pass


if __name__ == "__main__":
    sys.exit(main())
