"""Serving benchmark (issue 16): offline batched throughput, then a real ``toprovar serve`` under load.

    python bench/serve.py --model infinity-2b --out $OUT                          # GPU: everything
    python bench/serve.py --model tiny --device cpu --batch-sizes 1,2 --concurrency 1,2 --runs 1 --out /tmp/s

1. Offline: ``Pipeline.generate_from_features`` (PyTorch backend; on CUDA bf16, compiled pieces, whole-scale
   CUDA graphs) on B prompts (random text features, one seed each, CFG 3: 2B rows) for every ``--batch-sizes``
   and ``--policies`` (the ToProVAR variants at the pinned operating point of ``toprovar bench``): median
   latency of ``--runs`` after ``--warmup``, images/s = B / latency, peak device memory per batch size (each
   row starts from freed buffers and graphs and a reset peak counter) and ``graphs``: whether the timed runs
   replayed whole-scale CUDA graphs or ran eagerly (and why).
2. Serving (unless ``--no-serve``): ``toprovar serve`` in a subprocess (random weights, a random 2-layer T5
   standing in for flan-t5-xl, ``--max-batch``, ``--queue-delay-ms``, one instance per visible GPU), then per
   ``--serve-policies`` a warm-up and, for every ``--concurrency`` c, a closed-loop load of c clients
   (``toprovar.serving.client.load``, gRPC): images/s and latency p50/p95/p99; SIGTERM at the end.
3. Peer anchor (``--official-repo DIR``): bench/official_anchor.py at the same batch sizes, in a subprocess
   stopped after ``--official-timeout`` s.

Writes OUT/NAME.json and OUT/NAME.md (NAME = ``--name``, default serve_MODEL) with device and versions, again
after every measured row (a run stopped from outside keeps what it measured); ``--time-budget`` skips the
offline/serving rows that would not end in time (recorded as skipped).
"""
from __future__ import annotations

import argparse
import gc
import json
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import ROOT, environment, markdown_table, time_fn, timing_method, write_results  # noqa: E402

import torch  # noqa: E402

from toprovar.benchmark.e2e import build_policy  # noqa: E402
from toprovar.cli_args import DTYPES  # noqa: E402
from toprovar.pipeline import Pipeline, resolve_schedule, vae_stride  # noqa: E402
from toprovar.serving.client import Client, load, wait_ready  # noqa: E402
from toprovar.serving.server import free_ports  # noqa: E402
from toprovar.serving.service import PINNED  # noqa: E402

N_TEXT = 32


def ints(text: str) -> list[int]:
    return [int(v) for v in text.split(",") if v.strip()]


def names(text: str) -> list[str]:
    return [v.strip() for v in text.split(",") if v.strip()]


class Budget:
    """Seconds left of ``--time-budget`` (None: unlimited) and the estimated cost of the next row."""

    def __init__(self, seconds: float | None):
        self.t0, self.seconds = time.monotonic(), seconds

    def left(self) -> float:
        return float("inf") if self.seconds is None else self.seconds - (time.monotonic() - self.t0)

    def skip(self, estimate_s: float) -> str | None:
        """Why the next row is skipped (its estimate does not fit the time left), or None to run it."""
        left = self.left()
        if left <= 0 or estimate_s > left:
            return f"skipped: time budget ({left:.0f} s left, about {estimate_s:.0f} s needed)"
        return None


def row_estimate(walls: dict, name: str, B: int) -> float:
    """Seconds a (policy, batch) row will take: the policy's last row scaled by batch, else the same batch
    of another policy, else 0 (unknown). ``walls``: {(policy, batch): seconds}."""
    same = [(b, w) for (p, b), w in walls.items() if p == name]
    if same:
        b, w = same[-1]
        return w * max(1.0, B / b)
    other = [w for (p, b), w in walls.items() if b == B]
    return max(other) if other else 0.0


def one_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]


def offline(args, device: torch.device, dtype: str, budget: Budget, flush) -> tuple[dict, list[dict]]:
    """Batched throughput per policy and batch size (``run`` entries and Markdown rows). Before each row the
    previous row's buffers and CUDA graphs are freed and the peak-memory counter reset (peak GiB is that
    batch size's own); ``graphs`` says whether the timed runs replayed whole-scale CUDA graphs or ran
    eagerly (and why). ``flush(runs, rows)`` is called after every row."""
    pipe = Pipeline.load(args.model, device=str(device), dtype=DTYPES[dtype], seed=args.weights_seed,
                         text_encoder=False)
    pipe.compile = device.type == "cuda" if args.compile is None else args.compile
    cfg = pipe.cfg
    schedule = resolve_schedule(cfg, args.resolution, 1.0)
    resolution = max(schedule[-1]) * vae_stride(cfg)
    g = torch.Generator().manual_seed(0)
    runs, rows, walls = {"resolution": resolution, "compile": pipe.compile}, [], {}
    for name in args.policies:
        for B in args.batch_sizes:
            key = f"{name}/B{B}"
            why = budget.skip(row_estimate(walls, name, B))
            if why:
                runs[key] = {"policy": name, "batch": B, "skipped": why}
                rows.append({"policy": name, "batch": B, "graphs": why})
                print(f"{key}: {why}", file=sys.stderr, flush=True)
                flush(runs, rows)
                continue
            text = torch.randn(B, N_TEXT, cfg.text_channels, generator=g).to(device)
            lengths = torch.full((B,), N_TEXT, dtype=torch.int32, device=device)
            make = lambda: build_policy(name, cfg.depth, None, len(schedule))  # noqa: E731
            fn = lambda: pipe.generate_from_features(text, lengths, seed=list(range(1, B + 1)),  # noqa: E731
                                                     resolution=resolution, cfg=3.0, tau=0.5, policy=make(),
                                                     progress=False)
            pipe.release()  # the previous row's KV caches, workspace and graphs
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats(device)
            t0 = time.monotonic()
            try:
                with warnings.catch_warnings(record=True) as caught:
                    warnings.simplefilter("always", RuntimeWarning)
                    t = time_fn(fn, device, warmup=args.warmup, runs=args.runs)
            except Exception as exc:  # noqa: BLE001  (recorded: e.g. out of memory at a batch size)
                runs[key] = {"policy": name, "batch": B, "error": one_line(exc)}
                rows.append({"policy": name, "batch": B, "graphs": f"error: {runs[key]['error']}"})
                print(f"{key}: error: {runs[key]['error']}", file=sys.stderr, flush=True)
                walls[(name, B)] = time.monotonic() - t0
                flush(runs, rows)
                continue
            walls[(name, B)] = time.monotonic() - t0
            mode = pipe.orchestrator(schedule).graphs.mode(B) if device.type == "cuda" else "eager (CPU)"
            peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
            runs[key] = {"policy": name, "batch": B, "latency": t, "images_per_s": B / (t["median_ms"] * 1e-3),
                         "peak_memory_gib": peak, "graphs": mode, "wall_s": round(walls[(name, B)], 1),
                         "warnings": [str(w.message) for w in caught][:5]}
            rows.append({"policy": name, "batch": B, "latency ms": t["median_ms"],
                         "images/s": runs[key]["images_per_s"], "ms/image": t["median_ms"] / B,
                         "peak GiB": "-" if peak is None else round(peak, 2), "graphs": mode})
            print(json.dumps(rows[-1]), flush=True)
            flush(runs, rows)
    pipe.release()
    del pipe
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return runs, rows


def serving(args, device: torch.device, dtype: str, log: Path, budget: Budget, flush) -> tuple[dict, list[dict]]:
    """``toprovar serve`` under closed-loop load at each concurrency, per policy; SIGTERM at the end (its
    exit status and shutdown time recorded). ``flush(out, rows)`` is called after every row."""
    http, grpc, metrics = free_ports(3)
    cmd = [sys.executable, "-m", "toprovar.cli", "serve", "--model", args.model, "--dtype", dtype,
           "--device", "cpu" if device.type == "cpu" else "auto", "--weights-seed", str(args.weights_seed),
           "--random-text-encoder", "--max-batch", str(args.max_batch), "--queue-delay-ms", str(args.queue_delay_ms),
           "--http-port", str(http), "--grpc-port", str(grpc), "--metrics-port", str(metrics),
           "--instances-per-gpu", str(args.instances_per_gpu),
           "--warmup", ",".join(PINNED if n == "toprovar" else n for n in args.serve_policies)]
    if args.resolution:
        cmd += ["--resolution", str(args.resolution)]
    if args.compile or (args.compile is None and device.type == "cuda"):
        cmd.append("--compile")
    url = f"grpc://localhost:{grpc}"
    out: dict = {"command": " ".join(cmd[1:]), "log": str(log)}
    rows: list[dict] = []
    t0 = time.monotonic()
    with open(log, "w") as fh:
        proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, cwd=str(ROOT))
        try:
            wait_ready(url, min(args.startup_timeout, max(1.0, budget.left())), proc)  # an exit: its log says why
            out["startup_s"] = round(time.monotonic() - t0, 1)
            c = Client(url)
            out["server"] = c._c.get_server_metadata(as_json=True)
            c.close()
            flush(out, rows)
            # equal token counts: the text length is part of a scale-graph plan's key
            prompts = [f"a photo of object number {i:03d}" for i in range(64)]
            walls: dict = {}
            for name in args.serve_policies:
                policy = PINNED if name == "toprovar" else name
                for conc in [None] + args.concurrency:  # None: the warm-up at the largest concurrency
                    key = f"{name}/warmup" if conc is None else f"{name}/c{conc}"
                    why = budget.skip(row_estimate(walls, name, conc or max(args.concurrency)))
                    if why:
                        out[key] = {"skipped": why}
                        if conc is not None:
                            rows.append({"policy": name, "concurrency": conc, "requests": why})
                        print(f"serving {key}: {why}", file=sys.stderr, flush=True)
                        flush(out, rows)
                        continue
                    tr = time.monotonic()
                    if conc is None:
                        out[key] = load(url, max(args.concurrency), 2 * max(args.concurrency), prompts,
                                        policy).summary()
                        flush(out, rows)
                        continue
                    res = load(url, conc, max(args.min_requests, args.requests_per_client * conc), prompts, policy,
                               seed=1000 * conc).summary()
                    walls[(name, conc)] = time.monotonic() - tr
                    out[key] = res
                    lat = res["latency_ms"]
                    rows.append({"policy": name, "concurrency": conc, "requests": res["requests"],
                                 "errors": res["errors"], "images/s": res["images_per_s"], "p50 ms": lat["p50"],
                                 "p95 ms": lat["p95"], "p99 ms": lat["p99"]})
                    print(json.dumps(rows[-1]), flush=True)
                    flush(out, rows)
        except Exception as exc:  # noqa: BLE001  (recorded with the server's log tail)
            out["error"] = one_line(exc)
            print(f"serving: error: {out['error']}", file=sys.stderr, flush=True)
        finally:
            ts = time.monotonic()
            proc.send_signal(signal.SIGTERM)
            try:
                rc = proc.wait(timeout=args.shutdown_timeout)
                out["exit_status"] = rc
                out["shutdown"] = (f"{'clean' if rc == 0 else 'exit status ' + str(rc)} after SIGTERM in "
                                   f"{time.monotonic() - ts:.1f} s")
            except subprocess.TimeoutExpired:
                proc.kill()
                out["exit_status"] = f"killed after {args.shutdown_timeout:g} s"
                out["shutdown"] = f"not clean: still running {args.shutdown_timeout:g} s after SIGTERM (killed)"
    out["log_tail"] = log.read_text()[-3000:]
    flush(out, rows)
    return out, rows


def official(args, out_dir: Path, flush) -> tuple[dict, list[dict]]:
    """bench/official_anchor.py at the same batch sizes (a subprocess: its own imports and memory), stopped
    after ``--official-timeout`` s; it writes its JSON after every batch size, so a stopped run keeps the
    batch sizes it finished."""
    cmd = [sys.executable, str(ROOT / "bench" / "official_anchor.py"), "--official-repo", args.official_repo,
           "--batch-sizes", ",".join(map(str, args.batch_sizes)), "--runs", str(args.runs),
           "--out", "official_anchor_batch", "--out-dir", str(out_dir)]
    if args.model != "infinity-2b":
        cmd.append("--tiny-check")
    out: dict = {"command": " ".join(cmd[1:]), "timeout_s": args.official_timeout}
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.official_timeout)
        out["exit_status"], stderr = proc.returncode, proc.stderr
    except subprocess.TimeoutExpired as exc:
        out["exit_status"] = f"stopped after {args.official_timeout:g} s (--official-timeout)"
        stderr = exc.stderr.decode(errors="replace") if isinstance(exc.stderr, bytes) else (exc.stderr or "")
    path = out_dir / "official_anchor_batch.json"
    data = json.loads(path.read_text()) if path.is_file() else {"error": stderr[-2000:]}
    out["result"] = data
    done = data.get("batches", {})
    rows = []
    for B in args.batch_sizes:
        r = done.get(str(B), done.get(B))
        if r is None:
            rows.append({"batch": B, "error": "not run (stopped or failed before it)"})
            continue
        rows.append({"batch": B, "latency ms": r.get("timing", {}).get("median_ms", float("nan")),
                     "images/s": r.get("images_per_s", float("nan")), "peak GiB": r.get("peak_memory_gib", "-"),
                     "error": r.get("error", "")})
    flush(out, rows)
    return out, rows


def versions() -> dict:
    out = {}
    for mod in ("pytriton", "tritonclient", "onnxruntime"):
        try:
            from importlib.metadata import version
            out[mod] = version({"pytriton": "nvidia-pytriton"}.get(mod, mod))
        except Exception:  # noqa: BLE001
            out[mod] = None
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="infinity-2b")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default=None, help="default: bfloat16 on CUDA, float32 on the CPU")
    ap.add_argument("--resolution", type=int, default=None, help="default: the model's (1024 for Infinity)")
    ap.add_argument("--weights-seed", type=int, default=0)
    ap.add_argument("--batch-sizes", type=ints, default=[1, 2, 4, 8, 16])
    ap.add_argument("--policies", type=names, default=["none", "toprovar", "fastvar-public", "skipvar"])
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=2, help="untimed runs (eager, then scale-graph capture)")
    ap.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None, help="default: on CUDA")
    ap.add_argument("--no-offline", action="store_true")
    ap.add_argument("--no-serve", action="store_true")
    ap.add_argument("--serve-policies", type=names, default=["none", "toprovar"])
    ap.add_argument("--concurrency", type=ints, default=[1, 4, 16])
    ap.add_argument("--requests-per-client", type=int, default=3)
    ap.add_argument("--min-requests", type=int, default=8)
    ap.add_argument("--max-batch", type=int, default=16)
    ap.add_argument("--instances-per-gpu", type=int, default=1, help="model instances on each GPU (issue 20)")
    ap.add_argument("--queue-delay-ms", type=float, default=20.0)
    ap.add_argument("--startup-timeout", type=float, default=600.0)
    ap.add_argument("--shutdown-timeout", type=float, default=120.0, help="seconds the server may take after SIGTERM")
    ap.add_argument("--time-budget", type=float, default=None, metavar="SECONDS",
                    help="offline and serving rows: a row that would end past this many seconds from the start is "
                         "skipped (recorded as skipped); the official anchor has its own --official-timeout")
    ap.add_argument("--official-repo", default=None, help="FoundationVision/Infinity checkout: the peer anchor")
    ap.add_argument("--official-timeout", type=float, default=None, metavar="SECONDS",
                    help="stop the official anchor after this many seconds (finished batch sizes are kept)")
    ap.add_argument("--out", required=True, help="output directory")
    ap.add_argument("--name", default=None, help="result file stem (default serve_MODEL)")
    args = ap.parse_args(argv)
    if argv is None:  # a command-line run stopped by `timeout`: unwind, so the server and the anchor are stopped
        signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        ap.error(f"--device {args.device}: CUDA is not available")
    dtype = args.dtype or ("bfloat16" if device.type == "cuda" else "float32")
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = args.name or f"serve_{args.model}"
    payload = {"model": args.model, "dtype": dtype, "device": str(device), "timing": timing_method(device),
               "cfg": 3.0, "weights": "random", "text": f"random features, {N_TEXT} tokens (offline); a random "
               "2-layer T5 in the server", "toprovar": "pinned operating point (toprovar.benchmark.e2e)",
               "batch_sizes": args.batch_sizes, "policies": args.policies, "versions": versions(),
               "environment": environment(device), "command": " ".join(sys.argv)}
    t0 = time.monotonic()
    budget = Budget(args.time_budget)
    parts: dict = {}  # section name -> Markdown rows

    def write() -> Path:
        """JSON + Markdown of everything so far (called after every measured row)."""
        payload["total_s"] = round(time.monotonic() - t0, 1)
        sections = []
        if "serving" in parts:
            err = payload.get("serving", {}).get("error")
            shut = payload.get("serving", {}).get("shutdown")
            sections.append("\n".join([f"## Serving: toprovar serve (max batch {args.max_batch}, queue delay "
                                       f"{args.queue_delay_ms:g} ms, closed loop over gRPC)", ""]
                                      + markdown_table(parts["serving"]) + ([""] if err or shut else [])
                                      + ([f"error: {err}"] if err else []) + ([f"shutdown: {shut}"] if shut else [])))
        if "official" in parts:
            sections.append("\n".join(["## Peer anchor: official Infinity autoregressive_infer_cfg, unpruned (VAE "
                                       "decode not timed)", ""] + markdown_table(parts["official"])))
        res = f" {payload['resolution']}px" if "resolution" in payload else ""
        title = f"Serving and batched throughput, {args.model}{res} {dtype}, CFG 3"
        if "offline" in parts:
            title += (f" (offline: median of {args.runs} after {args.warmup} warm-up, {payload['timing']}, "
                      f"torch.compile {'on' if payload['offline'].get('compile') else 'off'})")
        return write_results(stem, payload, parts.get("offline", []), title, out_dir, sections)

    def flusher(name: str):
        def flush(data, rows):
            payload[name], parts[name] = data, rows
            if name == "offline":
                payload["resolution"] = data["resolution"]
            write()
        return flush

    if not args.no_offline:
        offline(args, device, dtype, budget, flusher("offline"))
        payload["offline_s"] = round(time.monotonic() - t0, 1)
    if not args.no_serve:
        serving(args, device, dtype, out_dir / f"{stem}_server.log", budget, flusher("serving"))
    if args.official_repo:
        official(args, out_dir, flusher("official"))
    md = write()
    print(md.read_text())
    failed = ("error" in payload.get("serving", {})) or any("error" in v for v in payload.get("offline", {}).values()
                                                           if isinstance(v, dict))
    return 1 if failed else 0

if __name__ == "__main__":
    sys.exit(main())
