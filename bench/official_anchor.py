"""Peer anchor (issue 7): unpruned latency of the OFFICIAL Infinity code on this GPU.

    python bench/official_anchor.py --official-repo .carry/infinity --runs 5 --out official_anchor
    python bench/official_anchor.py --official-repo .carry/infinity --batch-sizes 1,2,4,8,16 --out-dir $OUT

What runs: the official ``infinity.models.infinity.Infinity`` class of a FoundationVision/Infinity checkout
(``--official-repo``, set up outside this repo), at the ``infinity-2b`` size (depth 32, width 2048, 16 heads,
8 block chunks, text 2048 x 512) with the constructor settings of the official
``tools/run_infinity.py::load_transformer`` / ``scripts/infer.sh`` (pn 1M, bit labels, shared AdaLN,
fused_norm, customized_flash_attn=False and use_flex_attn=False, i.e. its SDPA self-attention path), random
weights (``tests/oracle/test_infinity_oracle.py::build_official``), its codebook_dim 32 given by the stand-in
VAE of the oracle test. Dtypes mirror the official inference exactly: parameters built in float32, then
``load_infinity(bf16=1)`` casts only ``unregistered_blocks`` to bfloat16 (embeddings, text pool/projections,
AdaLN mapping and head stay float32), and generation runs under
``torch.autocast('cuda', dtype=torch.bfloat16)`` + ``no_grad``. Timed: one ``autoregressive_infer_cfg`` call
(batch B prompts, ``--batch-sizes``, default 1, with CFG 3 on logits = 2B rows, tau 0.5, top-k 900, top-p 0.97, seed 1, vae_type 32, the 13-scale
1M 1:1 schedule up to 64x64 = 1024x1024 px), random text features standing in for flan-t5-xl (1 prompt, 32
tokens each, float32, packed as the official ``(kv_compact, lens, cu_seqlens_k, max_seqlen_k)`` tuple). CUDA
events, 1 warm-up, median of ``--runs``; per batch size, images/s = B / median and the peak memory. ``ret_img=False``: the VAE decode is NOT timed (the stand-in VAE
has no decoder); the summed codes are computed, as in the official loop.

Where the official code's dependencies are replaced (tests/oracle/_shims.py):
* ``flash_attn.flash_attn_varlen_kvpacked_func`` (cross-attention to the text, and the attentive text pool)
  -> ``_shims.flash_attn_varlen_kvpacked_native``: PyTorch SDPA in the input dtype (bf16) over the padded
  text batch with a key mask built on the device (no host sync). flash-attn is not installed on the GPU
  machine, so this is the cost of the official code's cross-attention on an SDPA fallback; with 32 text
  tokens it is a small part of the total. ``flash_attn_func`` is not called on this path.
* ``infinity.models.fused_op``: the OFFICIAL module is used (its ``torch.compile``-d AdaLN norms); if it
  fails on the machine, the run retries with the eager shim norms (same math) and records why.
* ``timm`` / ``pytz`` imports: stubs (inference needs no timm code).
"""
from __future__ import annotations

import argparse
import contextlib
import hashlib
import io
import math
import subprocess
import sys
import time
import traceback
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))
from common import RESULTS, environment, time_cuda, write_results  # noqa: E402

from toprovar.config import get_config  # noqa: E402

N_TEXT = 32
CFG, TAU, TOP_K, TOP_P, SEED = 3.0, 0.5, 900, 0.97, 1


def oracle_helpers():
    """``tests/oracle``'s shims and official-model builders (this repo's copies, not another ``tests``)."""
    from tests.oracle import _shims, test_infinity_oracle as oracle
    for mod in (_shims, oracle):
        if not Path(mod.__file__).resolve().is_relative_to(ROOT):
            raise ImportError(f"{mod.__name__} imported from {mod.__file__}, not from {ROOT}")
    return _shims, oracle


def official_id(repo: Path) -> dict:
    """Commit of the checkout (if it is a git one) and hashes of the two model files that run."""
    out = {"path": str(repo), "commit": None}
    if (repo / ".git").exists():  # else git would answer for an enclosing repository (.carry/ is inside ours)
        try:
            out["commit"] = subprocess.run(["git", "-C", str(repo), "rev-parse", "HEAD"], capture_output=True,
                                           text=True, timeout=20).stdout.strip() or None
        except (OSError, subprocess.SubprocessError):
            pass
    for f in ("infinity/models/infinity.py", "infinity/models/basic.py"):
        p = repo / f
        out[f"sha256:{f}"] = hashlib.sha256(p.read_bytes()).hexdigest()[:16] if p.is_file() else None
    return out


def build(repo: Path, cfg, pn: str, device: torch.device, official_fused_op: bool, bf16_blocks: bool = True):
    """Import the official code with the shims, build it at ``cfg`` (random weights) and prepare it as
    ``load_infinity`` does: to device, blocks -> bf16, eval, no grad, a generator on the device."""
    _shims, oracle = oracle_helpers()
    with contextlib.redirect_stdout(io.StringIO()):
        ns = _shims.import_official_infinity(repo, native_kernels=True, shim_fused_op=not official_fused_op)
    vae = oracle.StandInVAE(cfg.codebook_dim)
    model = oracle.build_official(ns, cfg, vae, seed=0, pn=pn)  # float32, CPU
    model.to(device=device)
    if bf16_blocks:
        for block in model.unregistered_blocks:  # load_infinity(bf16=1)
            block.bfloat16()
    model.eval().requires_grad_(False)
    model.rng = torch.Generator(device=device)
    sched = [(1, h, w) for (_, h, w) in ns.infinity.dynamic_resolution_h_w[1.0][pn]["scales"]]
    return ns, _shims, model, vae, sched


def text_tuple(cfg, device, batch: int = 1):
    """Random float32 text features of ``batch`` prompts x N_TEXT tokens, packed as ``encode_prompt`` packs them."""
    g = torch.Generator().manual_seed(SEED)
    feats = torch.randn(batch * N_TEXT, cfg.text_channels, generator=g).to(device)
    lens = [N_TEXT] * batch
    cu_seqlens_k = torch.arange(0, (batch + 1) * N_TEXT, N_TEXT, dtype=torch.int32, device=device)
    return feats, lens, cu_seqlens_k, N_TEXT


def make_generate(model, vae, sched, text, device, batch: int = 1):
    S = len(sched)

    def generate():
        with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16, cache_enabled=True):
            return model.autoregressive_infer_cfg(
                vae=vae, scale_schedule=sched, label_B_or_BLT=text, g_seed=SEED,
                B=batch, negative_label_B_or_BLT=None, force_gt_Bhw=None,
                cfg_sc=3, cfg_list=[CFG] * S, tau_list=[TAU] * S, top_k=TOP_K, top_p=TOP_P,
                returns_vemb=1, ratio_Bl1=None, gumbel=0, norm_cfg=False,
                cfg_exp_k=0.0, cfg_insertion_layer=[0],
                vae_type=32, softmax_merge_topk=-1,
                ret_img=False, trunk_scale=1000,
                gt_leak=0, gt_ls_Bl=None, inference_mode=True,
                sampling_per_bits=1,
            )
    return generate


def use_shim_norms(model, _shims) -> int:
    """Replace the official torch.compile-d AdaLN norm by the eager shim (same math); returns how many."""
    n = 0
    for m in model.modules():
        if getattr(m, "fused_norm_func", None) is not None:
            m.fused_norm_func = _shims.fused_ada_layer_norm
            n += 1
    return n


def run_gpu(args, payload: dict) -> float:
    if not torch.cuda.is_available():
        raise RuntimeError("CUDA is not available")
    device = torch.device("cuda")
    repo = Path(args.official_repo).resolve()
    payload["official"] = official_id(repo)
    cfg = get_config("infinity-2b")
    want = dict(depth=32, width=2048, num_heads=16, block_chunks=8, text_channels=2048, text_maxlen=512,
                codebook_dim=32, spatial_patchify=False)
    got = {k: getattr(cfg, k) for k in want}
    assert got == want, f"infinity-2b config drifted: {got}"
    t0 = time.perf_counter()
    ns, _shims, model, vae, sched = build(repo, cfg, "1M", device, official_fused_op=not args.shim_norms)
    payload["build_s"] = round(time.perf_counter() - t0, 1)
    assert sched[-1] == (1, 64, 64) and len(sched) == 13, sched
    payload["schedule"] = [list(s) for s in sched]
    payload["params_b"] = round(sum(p.numel() for p in model.parameters()) / 1e9, 3)
    payload["param_dtypes"] = sorted({str(p.dtype) for p in model.parameters()})
    payload["fused_norm"] = "shim (eager, --shim-norms)" if args.shim_norms else "official fused_op (torch.compile)"
    payload["batches"] = {}
    for B in args.batch_sizes:
        generate = make_generate(model, vae, sched, text_tuple(cfg, device, B), device, B)
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        try:
            try:
                timing = time_cuda(generate, warmup=args.warmup, runs=args.runs)
            except Exception as e:  # noqa: BLE001
                if args.shim_norms or "fused_norm_error" in payload or isinstance(e, torch.OutOfMemoryError):
                    raise
                payload["fused_norm_error"] = one_line(e)
                payload["fused_norm"] = f"shim (eager): the official torch.compile-d fused_op failed ({one_line(e)})"
                use_shim_norms(model, _shims)
                torch.cuda.synchronize()
                timing = time_cuda(generate, warmup=args.warmup, runs=args.runs)
        except Exception as e:  # noqa: BLE001  (recorded per batch size; e.g. out of memory)
            payload["batches"][B] = {"error": one_line(e)}
            torch.cuda.empty_cache()
            write(args, payload)
            continue
        payload["batches"][B] = {"timing": timing, "images_per_s": B / (timing["median_ms"] * 1e-3),
                                 "peak_memory_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2)}
        write(args, payload)
    first = payload["batches"].get(args.batch_sizes[0], {})
    if "error" in first:
        raise RuntimeError(first["error"])
    payload["timing"], payload["peak_memory_gib"] = first["timing"], first["peak_memory_gib"]
    return first["timing"]["median_ms"]


def tiny_check(args, payload: dict) -> float:
    """CPU smoke test (hidden flag): the same code path at the tiny config and the 0.06M schedule, the
    shim norms, float32 blocks (CPU autocast bf16), one timed generation by wall clock; plus the native vs
    float32 varlen shim on ragged lengths."""
    device = torch.device("cpu")
    repo = Path(args.official_repo).resolve()
    payload["official"] = official_id(repo)
    cfg = get_config("tiny")
    # float32 blocks: on the CPU, autocast does not run LayerNorm(bf16 weight) on float32 input as CUDA's does
    ns, _shims, model, vae, sched = build(repo, cfg, "0.06M", device, official_fused_op=False, bf16_blocks=False)
    payload["schedule"] = [list(s) for s in sched]
    payload["param_dtypes"] = sorted({str(p.dtype) for p in model.parameters()})
    payload["batches"] = {}
    for B in args.batch_sizes:
        generate = make_generate(model, vae, sched, text_tuple(cfg, device, B), device, B)
        generate()
        t0 = time.perf_counter()
        out = generate()
        timing = {"median_ms": (time.perf_counter() - t0) * 1e3, "runs": 1, "clock": "wall, CPU"}
        payload["batches"][B] = {"timing": timing, "images_per_s": B / (timing["median_ms"] * 1e-3),
                                 "returned_batch": int(out[-1].shape[0]) if torch.is_tensor(out[-1]) else None}
        write(args, payload)
    payload["timing"] = payload["batches"][args.batch_sizes[0]]["timing"]
    payload["returned"] = [type(x).__name__ for x in out]
    g = torch.Generator().manual_seed(0)
    lens = [5, 11, 3]
    q = torch.randn(4 * len(lens), 2, 64, generator=g)
    kv = torch.randn(sum(lens), 2, 2, 64, generator=g)
    cq = torch.arange(0, 4 * (len(lens) + 1), 4, dtype=torch.int32)
    ck = torch.nn.functional.pad(torch.tensor(lens).cumsum(0), (1, 0)).to(torch.int32)
    a = _shims.flash_attn_varlen_kvpacked_native(q, kv, cq, ck, 4, max(lens), softmax_scale=0.1)
    b = _shims.flash_attn_varlen_kvpacked_func(q, kv, cq, ck, 4, max(lens), softmax_scale=0.1)
    payload["native_vs_f32_varlen_maxdiff"] = (a - b).abs().max().item()
    assert payload["native_vs_f32_varlen_maxdiff"] < 1e-5
    return payload["timing"]["median_ms"]


def write(args, payload: dict, err: str | None = None) -> None:
    """The JSON and Markdown of what is measured so far (after every batch size: a stopped run keeps them)."""
    if "environment" not in payload:
        try:
            payload["environment"] = environment()
        except Exception as e:  # noqa: BLE001
            payload["environment"] = {"error": one_line(e)}
    rows = []
    for B in args.batch_sizes:
        res = payload.get("batches", {}).get(B, {"timing": payload.get("timing", {})} if B == 1 else {})
        t = res.get("timing", {})
        row = {"implementation": "official Infinity (FoundationVision), SDPA path", "config": payload["config"],
               "batch": B, "median_ms": t.get("median_ms", float("nan")),
               "images/s": res.get("images_per_s", float("nan")), "min_ms": t.get("min_ms", "-"),
               "max_ms": t.get("max_ms", "-"), "runs": t.get("runs", 0),
               "peak GiB": res.get("peak_memory_gib", "-"), "fused_norm": payload.get("fused_norm", "-")}
        if err or "error" in res:
            row["error"] = res.get("error", err)
        rows.append(row)
    out_dir = Path(args.out_dir) if args.out_dir else (
        RESULTS if not args.tiny_check else Path("/tmp/toprovar_official_anchor_tiny"))
    write_results(args.out, payload, rows, "Peer anchor: official Infinity, unpruned, random weights", out_dir)


def one_line(e: BaseException) -> str:
    msg = str(e).strip().splitlines()
    return f"{type(e).__name__}: {msg[0] if msg else ''}"[:300]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--official-repo", required=True, help="a FoundationVision/Infinity checkout")
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=1, help="untimed generations first (compiles the norms)")
    ap.add_argument("--out", default="official_anchor", help="bench/results/<out>.json and .md")
    ap.add_argument("--out-dir", default=None, help="folder of <out>.json/.md (default: bench/results)")
    ap.add_argument("--batch-sizes", type=lambda t: [int(v) for v in t.split(",")], default=[1],
                    help="prompts per generation, comma-separated (default 1)")
    ap.add_argument("--shim-norms", action="store_true",
                    help="use the eager shim AdaLN norms instead of the official torch.compile-d fused_op")
    ap.add_argument("--tiny-check", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)

    payload = {
        "benchmark": "official Infinity unpruned latency (peer anchor, issue 7)",
        "config": "infinity-2b" if not args.tiny_check else "tiny (CPU smoke test)",
        "weights": "random (build_official, seed 0)",
        "resolution": "1024x1024 (pn 1M, h/w 1.0, 13 scales)" if not args.tiny_check else "pn 0.06M",
        "settings": dict(batch=args.batch_sizes, cfg=CFG, cfg_insertion_layer=[0], tau=TAU, top_k=TOP_K, top_p=TOP_P,
                         g_seed=SEED, vae_type=32, text_tokens=N_TEXT, ret_img=False),
        "dtypes": "float32 params, unregistered_blocks cast to bf16 (load_infinity bf16=1); "
                  "autoregressive_infer_cfg under torch.autocast('cuda', bf16) + no_grad",
        "attention": "self-attention: official SDPA path (customized_flash_attn=False, use_flex_attn=False); "
                     "cross-attention/text pool: flash_attn_varlen_kvpacked_func shim = masked SDPA in bf16",
        "not_timed": "VAE decode (ret_img=False; stand-in VAE), text encoder",
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
    }
    ms, err = float("nan"), None
    try:
        ms = tiny_check(args, payload) if args.tiny_check else run_gpu(args, payload)
        payload["median_ms"] = ms
    except Exception as e:  # noqa: BLE001  (the JSON is written whatever fails)
        err = one_line(e)
        payload["error"] = err
        payload["traceback"] = traceback.format_exc()[-4000:]
    write(args, payload, err)
    if err:
        print(f"error: {err}", file=sys.stderr)
    print(f"official_anchor_ms={ms:.3f}" if not math.isnan(ms) else "official_anchor_ms=nan")
    return 1 if err else 0


if __name__ == "__main__":
    sys.exit(main())
