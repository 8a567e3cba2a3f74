"""Per-scale time of a model's blocks (all layers of one scale, batch 1 + CFG) for the PyTorch backend's block
options, against the scale's memory and FLOP floors.

For each scale of the schedule (``--scales``, default all) and each variant of ``VARIANTS`` (``TorchBackend``
options; every variant on the same random weights, text and activations), the ``depth`` block calls of the
scale (``block_in_cache`` on token-major KV caches holding the earlier scales' ``P`` keys, as the
orchestrator runs them) are captured into one CUDA graph and replayed (launch overhead excluded, as inside
the runtime's whole-scale graphs): median of ``--runs`` replays timed by CUDA events. On the CPU the calls
run eagerly (perf_counter; a smoke test of the code paths, the times mean nothing).

Floors per scale, from the model (nothing hard-coded but the device peaks ``--bandwidth``/``--tflops``,
H200 defaults):
- ``floor_w``: the bytes of every block parameter read once (the text K/V projection ``ca.mat_kv``
  excluded: with ``text_kv_once`` it is read once per generation, not per scale) / bandwidth;
- ``floor_bytes``: floor_w + the KV-cache traffic (P + n keys and values read, n written, per layer);
- ``floor_flop``: the blocks' FLOPs (``toprovar.policy.flops.block_flops`` without the text K/V
  projection) / peak;
and ``x floor`` = best variant / max(floor_bytes, floor_flop). ``VARIANT diff``: the largest absolute
difference of the scale's output (after all its blocks) from the first variant's on the same inputs.

JSON and Markdown are rewritten after every measured (scale, variant); ``--time-budget`` seconds: no
(scale, variant) starts after it (what ran is kept; the rest is listed as skipped). Scales run in the
order given (``--scales 0,1,2,12,3``: the most wanted first).

    python bench/small_scales.py --model infinity-2b --time-budget 150       # bench/results/small_scales_infinity-2b.*
    python bench/small_scales.py --model tiny --device cpu --runs 2 --out /tmp  # CPU smoke run
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
from common import RESULTS, environment, graphed, time_fn, write_results

from toprovar.config import get_config
from toprovar.model import families
from toprovar.model.loading import load_parts
from toprovar.pipeline import resolve_schedule
from toprovar.policy.flops import block_flops
from toprovar.runtime.torch_backend import TorchBackend

# name -> TorchBackend options (each adds one change to the previous)
VARIANTS = {
    "baseline": dict(text_kv_once=False, cache_writes_inside=False),
    "+kv-once": dict(text_kv_once=True, cache_writes_inside=False),
    "+compiled-writes": dict(text_kv_once=True, cache_writes_inside=True),
    "+one-graph": dict(text_kv_once=True, cache_writes_inside=True, one_graph=True),
}


def block_weight_bytes(block: torch.nn.Module) -> int:
    """Bytes of the block's parameters and buffers read per call, the text K/V projection excluded."""
    skip = {id(block.ca.mat_kv.weight)} if hasattr(block, "ca") else set()
    return sum(t.numel() * t.element_size() for t in (*block.parameters(), *block.buffers()) if id(t) not in skip)


def floors(cfg, blocks, n: int, P: int, rows: int, text_len: int, itemsize: int, bandwidth: float,
           tflops: float) -> dict:
    """Milliseconds of the weight, memory-traffic and FLOP floors of one scale's blocks."""
    w = sum(block_weight_bytes(b) for b in blocks)
    cache = len(blocks) * rows * (P + 2 * n) * 2 * cfg.width * itemsize
    fl = block_flops(n, P, cfg.width, cfg.mlp_hidden, text_len, rows, "hart" if cfg.is_hart else "infinity")
    fl.pop("ca_kv", None)
    flops = len(blocks) * sum(fl.values())
    return {"floor_w_ms": 1e3 * w / bandwidth, "floor_bytes_ms": 1e3 * (w + cache) / bandwidth,
            "floor_flop_ms": 1e3 * flops / (tflops * 1e12), "weight_bytes": w, "flops": flops}


def parse_scales(text: str | None, S: int) -> list[int]:
    if text is None:
        return list(range(S))
    try:
        out = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise SystemExit(f"--scales: {text!r} is not a comma-separated list of scale indices") from None
    bad = [v for v in out if not 0 <= v < S]
    if bad or not out:
        raise SystemExit(f"--scales: {bad or text!r} outside the schedule's scales 0..{S - 1}")
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="infinity-2b")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--resolution", type=int, default=None, help="default: the model's default schedule")
    ap.add_argument("--scales", default=None, help="comma-separated scale indices (default: all)")
    ap.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated, of {','.join(VARIANTS)}")
    ap.add_argument("--runs", type=int, default=20)
    ap.add_argument("--text-len", type=int, default=32)
    ap.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                    help="torch.compile the block halves (default: on CUDA)")
    ap.add_argument("--time-budget", type=float, default=float("inf"), help="seconds; no scale starts after it")
    ap.add_argument("--bandwidth", type=float, default=4.8e12, help="bytes/s (H200 HBM3e)")
    ap.add_argument("--tflops", type=float, default=790.0, help="dense bf16 TFLOP/s (H200)")
    ap.add_argument("--out", default=str(RESULTS), help="results folder")
    ap.add_argument("--name", default=None, help="file stem (default small_scales_MODEL)")
    args = ap.parse_args(argv)
    t_start = time.perf_counter()
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    if not variants or any(v not in VARIANTS for v in variants):
        raise SystemExit(f"--variants: {args.variants!r}: choose from {','.join(VARIANTS)}")
    if args.runs < 1:
        raise SystemExit(f"--runs: {args.runs} must be >= 1")
    dev = torch.device(args.device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device: cuda asked but CUDA is not available")
    cuda = dev.type == "cuda"
    cfg = get_config(args.model)
    dtype = torch.bfloat16 if cuda else torch.float32
    compile_ = cuda if args.compile is None else args.compile
    parts = load_parts(args.model, device=str(dev), dtype=dtype, text_encoder=False)
    model = parts.model.eval()
    sched = resolve_schedule(cfg, args.resolution, 1.0)
    scales = parse_scales(args.scales, len(sched))
    ropes = [r.to(dev) for r in families.ropes_for(cfg, sched)]
    g = torch.Generator().manual_seed(0)
    text = torch.randn(1, args.text_len, cfg.text_channels, generator=g).to(dev)
    lengths = torch.tensor([args.text_len], dtype=torch.int32, device=dev)
    backends = {v: TorchBackend(model, parts.decoder, sched, compile=compile_, **VARIANTS[v]) for v in variants}
    cond = {v: be.condition(text, lengths, True) for v, be in backends.items()}
    _, _, ca_kv, _, x0 = cond[variants[0]]
    Bp, H, hd, depth = x0.shape[0], cfg.num_heads, cfg.head_dim, cfg.depth
    n0 = x0.shape[1] - sched[0][0] * sched[0][1]  # extra scale-0 tokens (HART: context tokens)
    total = sum(h * w for h, w in sched) + n0
    caches = [torch.randn(2, Bp, total, H, hd, generator=g).to(dev, dtype) for _ in range(depth)]
    blocks, itemsize = model.blocks, caches[0].element_size()
    name = args.name or f"small_scales_{args.model}"
    payload = {"model": args.model, "device": str(dev), "dtype": str(dtype), "compile": compile_,
               "environment": environment(dev), "timing": "CUDA graph of the scale's blocks, CUDA events, median"
               if cuda else "eager, perf_counter, median", "runs": args.runs, "batch_rows": Bp,
               "text_len": args.text_len, "bandwidth": args.bandwidth, "tflops": args.tflops,
               "variants": {v: VARIANTS[v] for v in variants}, "scales": [], "skipped": []}
    rows: list[dict] = []
    ref: dict[int, torch.Tensor] = {}

    def write():
        write_results(name, payload, rows, f"{args.model}: per-scale time of the {depth} blocks (batch {Bp}, "
                      f"{str(dtype).split('.')[-1]}, {payload['timing']}, {args.runs} runs) against the floors",
                      Path(args.out), sections=[f"Skipped (time budget), scale:variant: {payload['skipped']}"]
                      if payload["skipped"] else [])

    P_of = {si: n0 + sum(h * w for h, w in sched[:si]) for si in range(len(sched))}
    for si in scales:
        if time.perf_counter() - t_start > args.time_budget:
            payload["skipped"].extend(f"{si}:{v}" for v in backends)
            write()
            continue
        h, w = sched[si]
        n = h * w + (n0 if si == 0 else 0)
        P = P_of[si] - (n0 if si == 0 else 0)
        x = torch.randn(Bp, n, cfg.width, generator=g).to(dev)
        rope = ropes[si] if ropes[si].shape[1] == n else ropes[si][:, :n]
        fl = floors(cfg, blocks, n, P, Bp, args.text_len, itemsize, args.bandwidth, args.tflops)
        entry = {"scale": si, "hw": [h, w], "n": n, "past": P, **fl, "ms": {}}
        payload["scales"].append(entry)
        row = {"scale": si, "n": n, "past": P, "floor_w ms": fl["floor_w_ms"], "floor_bytes ms": fl["floor_bytes_ms"],
               "floor_flop ms": fl["floor_flop_ms"], **{f"{v} ms": "" for v in backends}, "x floor": "",
               **{f"{v} diff": "" for v in backends}}
        rows.append(row)
        for v, be in backends.items():
            if time.perf_counter() - t_start > args.time_budget:
                payload["skipped"].append(f"{si}:{v}")
                continue
            _, ada, ca_kv, ca_len, _ = cond[v]

            def run(be=be, ada=ada, ca_kv=ca_kv, ca_len=ca_len):
                y = x
                for layer in range(depth):
                    y, _ = be.block_in_cache(layer, y, ada, ca_kv, ca_len, rope, caches[layer][0].transpose(1, 2),
                                             caches[layer][1].transpose(1, 2), P, False)
                return y

            try:
                with torch.no_grad():
                    run()  # compilation (this shape's specialisation) outside any capture
                    if cuda:
                        replay, graph = graphed(run)
                        t = time_fn(replay, "cuda", warmup=3, runs=args.runs)
                        del graph
                    else:
                        t = time_fn(run, "cpu", warmup=1, runs=args.runs)
                    y = run().float()
            except Exception as exc:  # one variant failing (e.g. a compile error) must not lose the others
                msg = f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}"
                entry.setdefault("errors", {})[v] = msg
                row[f"{v} ms"] = "error"
                print(f"scale {si:2d} {v}: {msg}", flush=True)
                if cuda:
                    torch.cuda.synchronize()
                write()
                continue
            ref_y = ref.setdefault(si, y)  # the first variant's output on this scale's inputs
            entry.setdefault("max_abs_diff", {})[v] = (y - ref_y).abs().max().item()
            entry["ms"][v] = t
            row[f"{v} ms"] = t["median_ms"]
            print(f"scale {si:2d} n={n:5d} P={P:5d} {v:18s} {t['median_ms']:9.3f} ms  (floor_w "
                  f"{fl['floor_w_ms']:.3f}, bytes {fl['floor_bytes_ms']:.3f}, flop {fl['floor_flop_ms']:.3f})",
                  flush=True)
            row[f"{v} diff"] = entry["max_abs_diff"][v]
            row["x floor"] = min(e["median_ms"] for e in entry["ms"].values()) / max(fl["floor_bytes_ms"],
                                                                                     fl["floor_flop_ms"])
            write()
    totals = {v: sum(e["ms"][v]["median_ms"] for e in payload["scales"] if v in e["ms"]) for v in variants}
    payload["total_ms"] = totals
    payload["elapsed_s"] = time.perf_counter() - t_start
    write()
    print("total over measured scales: " + ", ".join(f"{v} {t:.3f} ms" for v, t in totals.items()), flush=True)
    return 0 if payload["scales"] else 1


if __name__ == "__main__":
    sys.exit(main())
