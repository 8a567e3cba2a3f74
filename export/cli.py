"""``toprovar-export``: export the model and the policy as ONNX pieces + manifest, optionally TensorRT engines.

    toprovar-export --model tiny --out export/                       # ONNX pieces + manifest.json
    toprovar-export --model infinity-2b --checkpoint infinity_2b.pth --vae infinity_vae_d32.pth \\
        --t5 flan-t5-xl/ --resolution 1024 --dtype bfloat16 --out export-2b/ --engines

Layout (demo/Diffusion style): OUT/onnx/*.onnx, OUT/engine/*.plan, OUT/manifest.json (docs/export-format.md).
Exit status: 0 done; 2 bad input (one error line); 3 TensorRT not importable (the ONNX export is done).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

PROG = "toprovar-export"
EXIT_INPUT, EXIT_NO_TENSORRT = 2, 3


def build_parser() -> argparse.ArgumentParser:
    from .onnx_export import DEFAULT_OPSET, DTYPES
    p = argparse.ArgumentParser(prog=PROG, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("model")
    g.add_argument("--model", default="tiny", choices=["tiny", "shapes", "scenes", "infinity-2b", "infinity-8b"],
                   help="shapes loads its packaged trained weights (or --weights DIR); scenes needs --weights DIR "
                        "(tools/train_small.py --model scenes)")
    g.add_argument("--weights", default=None, help="weights directory of a trained small model (model/vae/"
                                                     "text_encoder .safetensors, tools/train_small.py)")
    g.add_argument("--checkpoint", default=None, help="transformer weights (.pth or .safetensors); default: random")
    g.add_argument("--vae", default=None, help="VAE weights (official .pth or .safetensors); default: random")
    g.add_argument("--t5", default=None, help="local T5 directory for the text_encoder piece (real models; "
                                              "without it the piece is skipped, noted in the manifest)")
    g.add_argument("--weights-seed", type=int, default=0, help="seed of the random weights (no checkpoint)")
    g.add_argument("--resolution", type=int, default=None, help="longer image side in pixels (default: the "
                                                                 "model's default preset)")
    g.add_argument("--h-div-w", type=float, default=1.0, help="aspect ratio h/w of the schedule")
    g.add_argument("--calibration", default=None, help="calibration JSON (`toprovar calibrate`): policy parameters "
                                                       "of the policy_sXX pieces and the profiles' token minimum")
    g = p.add_argument_group("ONNX")
    g.add_argument("--out", required=True, help="export directory (manifest.json, onnx/, engine/)")
    g.add_argument("--onnx-dir", default=None, help="ONNX directory inside --out (default OUT/onnx)")
    g.add_argument("--opset", "--onnx-opset", dest="opset", type=int, default=DEFAULT_OPSET,
                   help=f"ONNX opset (>= 18; default {DEFAULT_OPSET})")
    g.add_argument("--dtype", choices=sorted(DTYPES), default="float32",
                   help="matrix/KV dtype of the pieces (norms, AdaLN, head and sampling stay float32)")
    g.add_argument("--batch-size", type=int, default=1, help="prompts per generation the engines are tuned for")
    g.add_argument("--max-batch-size", type=int, default=None, help="largest batch (prompts) the engines accept "
                                                                    "(default: max(4, --batch-size))")
    g.add_argument("--pieces", nargs="+", default=None, metavar="NAME",
                   help="export only these pieces (names or patterns like 'block_*'); the manifest lists only them")
    g.add_argument("--jobs", type=int, default=1, help="export worker processes (each holds the model: for small "
                                                      "models or machines with memory to spare)")
    g.add_argument("--skip-export", action="store_true", help="reuse OUT's pieces (verified) and only build engines")
    g = p.add_argument_group("TensorRT")
    g.add_argument("--engines", action="store_true", help="also build TensorRT engines (needs tensorrt and a GPU)")
    g.add_argument("--engine-dir", default=None, help="engine directory inside --out (default OUT/engine)")
    g.add_argument("--plugins", nargs="+", default=None, metavar="PATH",
                   help="FAE TensorRT plugin library (default $TOPROVAR_FAE_PLUGIN or "
                        "build/native/libtoprovar_fae_trt.so)")
    g.add_argument("--timing-cache", default=None, help="timing cache file (default OUT/engine/timing.cache)")
    g.add_argument("--optimization-level", type=int, default=None, help="TensorRT builder optimization level (0-5)")
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
        lines.append(f"{len(manifest['engines'])} engines (TensorRT {manifest['versions'].get('tensorrt')}, "
                     f"{next(iter(manifest['engines'].values()))['gpu']})")
    for note in manifest.get("notes", []):
        lines.append(f"note: {note}")
    return "\n".join(lines)


def _error(msg: str) -> None:
    print(f"{PROG}: error: {msg}", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from toprovar.model.checkpoint import CheckpointError
    from .engine import EngineError, TensorRTUnavailable, build_engines, find_plugins, import_tensorrt
    from .manifest import ManifestError, load_manifest, verify
    from .onnx_export import ExportError, ExportRequest, export_model
    out = Path(args.out)
    try:
        no_trt = None
        if args.engines:  # fail before a long export, not after it (without TensorRT: export, then say so)
            try:
                import_tensorrt()
                find_plugins(args.plugins)
            except TensorRTUnavailable as exc:
                no_trt = exc
        if args.skip_export:
            manifest = load_manifest(out)
            verify(manifest)
        else:
            req = ExportRequest(model=args.model, out=str(out), checkpoint=args.checkpoint, vae=args.vae, t5=args.t5,
                                resolution=args.resolution, h_div_w=args.h_div_w, dtype=args.dtype, opset=args.opset,
                                onnx_dir=args.onnx_dir, calibration=args.calibration, weights_seed=args.weights_seed, weights=args.weights,
                                batch_size=args.batch_size,
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
            manifest = build_engines(manifest, Path(args.engine_dir) if args.engine_dir else None, args.plugins,
                                     args.timing_cache, workspace=int(args.workspace * (1 << 30)),
                                     opt_level=args.optimization_level, verbose=args.verbose,
                                     progress=not args.no_progress)
        except TensorRTUnavailable as exc:
            _error(f"{exc}; ONNX export is done, engines were not built")
            return EXIT_NO_TENSORRT
        print(summary_table(load_manifest(out)))
        return 0
    except (ExportError, ManifestError, EngineError, CheckpointError, ValueError, FileNotFoundError) as exc:
        msg = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        _error(msg)
        return EXIT_INPUT
    except KeyboardInterrupt:
        _error("interrupted; completed pieces are in place, the manifest was not rewritten")
        return 130


if __name__ == "__main__":
    sys.exit(main())
