"""Small-M matrix products of the first scales: cuBLAS (``F.linear``) against a Triton weight-streaming kernel,
both against the weight-read floor (issue 17's small-M path; no product code uses the kernel yet: this decides
whether it should).

At scales 0-8 of a generation a block's products have M = rows x tokens (batch 1 + CFG: 2 .. 1152 rows at
1024 px) and read every weight once per scale. The H100 kernel profile put cuBLAS at ~42% of the memory bandwidth
at the 256-px scales. One "scale" here is every block's self-attention qkv and proj, cross-attention q and proj,
fc1 and fc2, in block order, each block with its own random bf16 weights (the whole set is several times the L2;
the text K/V projection runs once per generation and is left out). Shapes come from the model config
(``CrossAttnBlock`` built on the meta device). For each M of --rows and each implementation the scale is captured
in one CUDA graph and replayed (median of --runs, CUDA events):

- ``torch``: ``F.linear`` (cuBLAS, what the compiled block halves call);
- ``triton``: ``_stream_kernel``, one program per BLOCK_N output columns for all M rows (M <= 128: one M tile of
  16-128 rows), streaming its weight rows in BLOCK_K steps through ``tl.dot`` with float32 accumulation; the
  block shape and pipeline depth autotuned per (M tile, N, K).

Every product of the first block is checked against a float64 reference (relative Frobenius error, bf16 operands:
< 1e-2), outputs poisoned with NaN before each check. The copy bandwidth (a 2 GiB device-to-device copy, bytes read
plus written) is measured first: ``x ceiling`` = time / (bytes moved / that bandwidth), bytes = weights + inputs +
outputs.

    python bench/small_mm.py --model infinity-2b --out bench/results          # H200: ~1-2 minutes
    TRITON_INTERPRET=1 python bench/small_mm.py --check-only --device cpu      # the kernel on the CPU interpreter
"""
from __future__ import annotations

import argparse
import os
import sys

import torch
import torch.nn.functional as F
from common import RESULTS, environment, graphed, time_fn, write_results

from toprovar.config import get_config
from toprovar.model.layers import CrossAttnBlock

try:
    import triton
    import triton.language as tl
except ImportError:  # the CPU machine without Triton: --check-only needs it, the torch rows do not
    triton = None

MAX_M = 128  # one M tile
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


def block_shapes(model: str) -> list[tuple[str, int, int]]:
    """(name, N, K) of a block's per-scale products in forward order, from the model's block on the meta device."""
    cfg = get_config(model)
    with torch.device("meta"):
        blk = CrossAttnBlock(cfg.width, cfg.num_heads, cfg.mlp_hidden, cfg.norm_eps)
    names = ["sa.mat_qkv", "sa.proj", "ca.mat_q", "ca.proj", "ffn.fc1", "ffn.fc2"]
    mods = dict(blk.named_modules())
    return [(n, *mods[n].weight.shape) for n in names]


if triton is not None:
    @triton.autotune(configs=[triton.Config({"BLOCK_N": bn, "BLOCK_K": bk}, num_warps=w, num_stages=s)
                              for bn, bk, w, s in [(16, 256, 4, 4), (32, 128, 4, 4), (32, 256, 4, 3),
                                                   (64, 128, 4, 3), (16, 512, 4, 3), (32, 128, 2, 5),
                                                   (64, 64, 4, 5), (16, 128, 2, 6)]],
                     key=["M_TILE", "N", "K"])
    @triton.jit
    def _stream_kernel(x_ptr, w_ptr, y_ptr, M, N, K, M_TILE: tl.constexpr, BLOCK_N: tl.constexpr,
                       BLOCK_K: tl.constexpr):
        """y (M, N) = x (M, K) @ w (N, K)^T, all row-major contiguous; program i: columns [i BLOCK_N, +BLOCK_N)."""
        pid = tl.program_id(0)
        rm = tl.arange(0, M_TILE)
        rn = pid * BLOCK_N + tl.arange(0, BLOCK_N)
        rk = tl.arange(0, BLOCK_K)
        x_ptrs = x_ptr + rm[:, None] * K + rk[None, :]
        w_ptrs = w_ptr + rn[:, None] * K + rk[None, :]
        acc = tl.zeros((M_TILE, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            a = tl.load(x_ptrs, mask=(rm[:, None] < M) & (rk[None, :] + k0 < K), other=0.0)
            b = tl.load(w_ptrs, mask=(rn[:, None] < N) & (rk[None, :] + k0 < K), other=0.0)
            acc = tl.dot(a, tl.trans(b), acc)
            x_ptrs += BLOCK_K
            w_ptrs += BLOCK_K
        y_ptrs = y_ptr + rm[:, None] * N + rn[None, :]
        tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=(rm[:, None] < M) & (rn[None, :] < N))


def stream_linear(x: torch.Tensor, w: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """out (M, N) = x (M, K) @ w (N, K)^T through ``_stream_kernel``; M <= MAX_M, all contiguous."""
    M, K = x.shape
    N = w.shape[0]
    if M > MAX_M or not (x.is_contiguous() and w.is_contiguous() and out.is_contiguous()):
        raise ValueError(f"stream_linear: M {M} > {MAX_M} or a non-contiguous operand")
    m_tile = max(16, triton.next_power_of_2(M))
    if INTERPRET:  # the CPU interpreter has no timer to autotune with: one fixed configuration
        _stream_kernel.fn[(triton.cdiv(N, 16),)](x, w, out, M, N, K, M_TILE=m_tile, BLOCK_N=16, BLOCK_K=64)
    else:
        _stream_kernel[lambda meta: (triton.cdiv(N, meta["BLOCK_N"]),)](x, w, out, M, N, K, M_TILE=m_tile)
    return out


IMPLS = {"torch": lambda x, w, out: torch.mm(x, w.t(), out=out), "triton": stream_linear}


def check(impl: str, shapes, M: int, device: torch.device, dtype: torch.dtype) -> float:
    """Largest relative Frobenius error of ``impl`` over the block's products against float64, fresh inputs."""
    worst = 0.0
    for _, N, K in shapes:
        x = torch.randn(M, K, device=device, dtype=dtype)
        w = torch.randn(N, K, device=device, dtype=dtype) / K ** 0.5
        out = torch.full((M, N), float("nan"), device=device, dtype=dtype)
        got = IMPLS[impl](x, w, out).double()
        ref = x.double() @ w.double().t()
        worst = max(worst, ((got - ref).norm() / ref.norm()).item())
    return worst


def copy_bandwidth(device: torch.device) -> float:
    """Bytes per second of a 2 GiB device-to-device copy (read + written)."""
    a = torch.empty(2**30, dtype=torch.int16, device=device)
    b = torch.empty_like(a)
    t = time_fn(lambda: b.copy_(a), device, warmup=3, runs=10)
    return 2 * a.numel() * a.element_size() / (t["median_ms"] / 1e3)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="infinity-2b")
    ap.add_argument("--rows", default="2,8,32,72,128,288,512,1152",
                    help="M values (batch 1 + CFG: 2 x the tokens of scales 0..8 at 1024 px)")
    ap.add_argument("--runs", type=int, default=20)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--check-only", action="store_true", help="only the float64 checks (small M, two blocks' shapes)")
    ap.add_argument("--out", default=str(RESULTS))
    args = ap.parse_args(argv)
    device, dtype = torch.device(args.device), torch.bfloat16
    shapes = block_shapes(args.model)
    rows_m = [int(v) for v in args.rows.split(",")]
    impls = ["torch"] + (["triton"] if triton is not None else [])
    if args.check_only:
        if triton is None:
            sys.exit("bench/small_mm.py --check-only: Triton is not installed")
        small = [(n, min(N, 90), min(K, 150)) for n, N, K in shapes]  # interpreter-sized, odd tails included
        for M in (1, 2, 17, 72):
            err = check("triton", small, M, device, torch.float32 if device.type == "cpu" else dtype)
            print(f"M {M}: relative error {err:.2e}")
            if not err < 1e-2:
                sys.exit(f"bench/small_mm.py: triton relative error {err:.2e} at M {M}")
        return 0
    if device.type != "cuda" or not torch.cuda.is_available():
        sys.exit("bench/small_mm.py: needs a CUDA device (--check-only runs the kernel on the CPU interpreter)")
    cfg = get_config(args.model)
    bw = copy_bandwidth(device)
    w_bytes = sum(N * K for _, N, K in shapes) * 2 * cfg.depth
    weights = [[torch.randn(N, K, device=device, dtype=dtype) / K ** 0.5 for _, N, K in shapes]
               for _ in range(cfg.depth)]
    rows = []
    for M in rows_m:
        xs = {K: torch.randn(M, K, device=device, dtype=dtype) for K in {K for _, _, K in shapes}}
        outs = [torch.empty(M, N, device=device, dtype=dtype) for _, N, _ in shapes]
        moved = w_bytes + cfg.depth * sum((M * K + M * N) * 2 for _, N, K in shapes)
        floor_ms = moved / bw * 1e3
        for impl in impls:
            row = {"M": M, "impl": impl, "floor ms": floor_ms}
            if impl == "triton" and M > MAX_M:
                rows.append({**row, "status": f"M > {MAX_M}: not this kernel's range"})
                continue
            err = check(impl, shapes, M, device, dtype)
            fn = IMPLS[impl]

            def scale():
                for layer in weights:
                    for (_, _, K), w, out in zip(shapes, layer, outs):
                        fn(xs[K], w, out)
            replay, _g = graphed(scale)
            t = time_fn(replay, device, warmup=3, runs=args.runs)
            rows.append({**row, "ms": t["median_ms"], "x ceiling": t["median_ms"] / floor_ms,
                         "GB/s": moved / (t["median_ms"] / 1e3) / 1e9, "rel err": err,
                         "status": "ok" if err < 1e-2 else "WRONG"})
            print(rows[-1], flush=True)
            del _g
            write_results("small_mm", {"model": args.model, "copy_bandwidth_GBps": bw / 1e9, "weight_bytes": w_bytes,
                                       "shapes": shapes, "rows": rows, "environment": environment(device)}, rows,
                          f"One scale's block products ({args.model}, {cfg.depth} blocks, bf16): cuBLAS vs a Triton "
                          f"weight-streaming kernel; copy ceiling {bw / 1e9:.0f} GB/s", args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
