"""GPU check of issue 14: an export's ONNX Runtime / PyTorch runs, and the ``trt`` backend refusing TensorRT-RTX
engines on a GPU TensorRT-RTX does not run on (the H100/H200: compute 9.0), in one line.

    python bench/rtx_check.py --out-dir /tmp/rtx-check --rtx-export build/rtx-shapes [--results DIR]

1. exports the packaged ``shapes`` model (ONNX pieces, float32) into OUT-DIR/shapes unless it is there;
2. generates one image with ``onnxruntime`` (CPU) and ``torch`` (CUDA and CPU) from the same prompt and seed:
   sampled-bit agreement with ONNX Runtime, sha256 of the bits and of the PNG, PNG paths;
3. opens ``--rtx-export`` (a TensorRT-RTX export built on a machine without a GPU, e.g.
   ``toprovar-export --model shapes --dtype bfloat16 --out build/rtx-shapes --pieces 'policy_s*' --engines
   --trt-flavor rtx``) with ``--backend trt``, through the Python API and through ``toprovar generate``,
   and records the error line (expected: one line naming the compute capability, before any TensorRT import).

Results: RESULTS/rtx_check.{json,md} (default bench/results).
"""
from __future__ import annotations

import argparse
import hashlib
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, environment, write_results  # noqa: E402

from toprovar.images import save_images  # noqa: E402
from toprovar.runtime.engine_dir import EngineRuntime  # noqa: E402

RUNS = [("onnxruntime", "cpu"), ("torch", "cuda"), ("torch", "cpu")]


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()[:16]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out-dir", required=True, help="work directory (the shapes export and the PNGs go here)")
    ap.add_argument("--rtx-export", required=True, help="a TensorRT-RTX export directory (manifest + engines)")
    ap.add_argument("--results", default=str(RESULTS), help="where rtx_check.{json,md} are written")
    ap.add_argument("--model", default="shapes", help="model exported for the ONNX Runtime / PyTorch runs")
    ap.add_argument("--prompt", default="three yellow triangles")
    ap.add_argument("--seed", type=int, default=1)
    args = ap.parse_args()
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    exp = out / args.model
    payload = {"model": args.model, "prompt": args.prompt, "seed": args.seed, "runs": [], "trt": {}}
    if not (exp / "manifest.json").is_file():
        from toprovar.export.onnx_export import ExportRequest, export_model
        t0 = time.perf_counter()
        export_model(ExportRequest(model=args.model, out=str(exp), progress=False))
        payload["export_s"] = round(time.perf_counter() - t0, 1)
        print(f"exported {args.model} in {payload['export_s']} s", flush=True)
    rows, ref = [], None
    for backend, device in RUNS:
        if device == "cuda" and not torch.cuda.is_available():
            continue
        rt = EngineRuntime.open(exp, backend, device)
        t0 = time.perf_counter()
        res = rt.generate([args.prompt], seed=args.seed, progress=False)
        secs = time.perf_counter() - t0
        bits = torch.cat([b.detach().cpu().flatten() for b in res.bits])
        ref = bits if ref is None else ref
        png = save_images(res.images.detach().cpu(), out / f"{backend}-{device}.png")[0]
        run = {"backend": backend, "device": device, "seconds": round(secs, 2),
               "bits_agree_with_onnxruntime": float((bits == ref).float().mean()),
               "bits_sha256": _sha(bits.numpy().tobytes()), "png": str(png), "png_sha256": _sha(png.read_bytes())}
        payload["runs"].append(run)
        rows.append({k: run[k] for k in ("backend", "device", "seconds", "bits_agree_with_onnxruntime",
                                         "bits_sha256", "png_sha256")})
        print(f"{backend}/{device}: {secs:.2f} s, bits agree {run['bits_agree_with_onnxruntime']:.6f}, "
              f"png {png}", flush=True)
    # the trt backend on TensorRT-RTX engines: refused before import / deserialisation
    try:
        EngineRuntime.open(args.rtx_export, "trt", "cuda")
        api = "opened (not refused)"
    except Exception as exc:  # noqa: BLE001 - the message is the result
        api = f"{type(exc).__name__}: {exc}"
    cli = subprocess.run([sys.executable, "-m", "toprovar.cli", "generate", "--engine-dir", args.rtx_export,
                          "--backend", "trt", "--prompt", args.prompt, "-o", str(out / "trt.png")],
                         capture_output=True, text=True, timeout=600)
    err = [ln for ln in cli.stderr.splitlines() if ln.strip()]
    cap = torch.cuda.get_device_capability() if torch.cuda.is_available() else None
    payload["trt"] = {"gpu": torch.cuda.get_device_name() if cap else None, "capability": cap, "api_error": api,
                      "cli_returncode": cli.returncode, "cli_stderr": err[-5:],
                      "one_line": len([ln for ln in err if "error:" in ln]) == 1}
    print(f"trt (API): {api}\ntrt (CLI, rc {cli.returncode}): {err[-1] if err else ''}", flush=True)
    rows.append({"backend": "trt", "device": "cuda", "seconds": None,
                 "bits_agree_with_onnxruntime": None, "bits_sha256": f"refused (rc {cli.returncode})",
                 "png_sha256": None})
    payload["environment"] = environment()
    md = write_results("rtx_check", payload, rows, f"{args.model} export: ONNX Runtime / PyTorch runs, trt backend "
                       f"on TensorRT-RTX engines", Path(args.results),
                       sections=[f"trt backend error line (CLI): `{err[-1] if err else ''}`"])
    print(md.read_text())


if __name__ == "__main__":
    main()
