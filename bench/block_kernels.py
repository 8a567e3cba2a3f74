"""One transformer block at a scale's shapes: latency of its forms and compile settings, and its kernels.

Builds one block of a model config (random weights, bf16 matrices as ``Infinity.to_inference_dtype``) and
times it replayed from a CUDA graph (launch overhead excluded, as inside whole-scale graphs) at the last
scale of the 1024x1024 schedule (n new tokens, P cached) and at scale 0 (1 token), for:

- ``cat``: the exported ``BlockPiece`` (concatenates the cache prefix with the new keys/values), compiled;
- ``in-cache``: ``CachedBlockPiece`` (new keys/values written into the cache, attention on the prefix view),
  compiled halves, with the Inductor settings in ``SETTINGS``.

Per form it lists the block's kernels (torch.profiler, one replay) with their time, so a kernel that runs
far from its memory or compute bound shows up. Caches are token-major, as the orchestrator keeps them. The
SDPA call is also timed alone on contiguous (B, H, N, hd) tensors and on the runtime's layout (token-major q,
prefix view of a token-major cache), with the kernels that run it.

    python bench/block_kernels.py --model infinity-2b   # bench/results/block_kernels_infinity-2b.{json,md}
"""
from __future__ import annotations

import argparse

import torch
import torch._inductor.config as inductor_config
from common import environment, graphed, time_cuda, write_results

from toprovar.config import get_config
from toprovar.model.layers import CrossAttnBlock
from toprovar.model.pieces import BlockPiece, CachedBlockPiece
from toprovar.model.rope import rope_tables
from toprovar.ops import attention
from toprovar.pipeline import resolve_schedule
from toprovar.runtime.torch_backend import _compiled

# Inductor settings tried for the in-cache form (dynamic token counts, as the backend compiles)
SETTINGS = {
    "default": {},
    "coordinate-descent": {"coordinate_descent_tuning": True},
}


def make_block(cfg, dev):
    blk = CrossAttnBlock(cfg.width, cfg.num_heads, cfg.mlp_hidden, cfg.norm_eps).to(dev)
    for p in blk.parameters():  # the init is zeros for some biases: give every parameter a scale
        torch.nn.init.normal_(p, std=0.02)
    blk.to(torch.bfloat16)
    blk.ada_gss.data, blk.sa.scale_mul_1H11.data = blk.ada_gss.data.float(), blk.sa.scale_mul_1H11.data.float()
    blk.ca_norm.float()
    return blk.eval()


def inputs(cfg, dev, n, P, total, L=32, Bp=2):
    H, hd, C = cfg.num_heads, cfg.head_dim, cfg.width
    g = torch.Generator(device=dev).manual_seed(0)
    rnd = lambda *s, dt=torch.float32: torch.randn(*s, generator=g, device=dev, dtype=dt)  # noqa: E731
    rope = rope_tables(hd, [(1, n)], (1, n))[0].to(dev)
    # token-major caches (B', total, H, hd) seen as (B', H, total, hd), as the orchestrator keeps them
    cache_k, cache_v = (rnd(Bp, total, H, hd, dt=torch.bfloat16).transpose(1, 2) for _ in range(2))
    return dict(x=rnd(Bp, n, C), ada=0.1 * rnd(Bp, 1, 6, C), ca_kv=rnd(Bp, L, C, dt=torch.bfloat16),
                ca_len=torch.full((Bp,), L, dtype=torch.int32, device=dev), rope=rope, cache_k=cache_k,
                cache_v=cache_v, past=P)


def kernels(fn, top: int) -> list[list]:
    """[name, launches, us] of the kernels of one fn() call, longest first."""
    fn()
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    agg: dict = {}
    for ev in prof.events():
        if ev.device_type == torch.autograd.DeviceType.CUDA:
            a = agg.setdefault(ev.name, [0, 0.0])
            a[0] += 1
            a[1] += ev.device_time_total
    return sorted(([k[:120], c, t] for k, (c, t) in agg.items()), key=lambda r: -r[2])[:top]


def forms(blk, setting: str):
    """{form name: callable(inp) running one block call} for the cat form and the in-cache form."""
    torch._dynamo.reset()
    piece = CachedBlockPiece(blk, _compiled(blk.attention_inputs, True), _compiled(blk.attention_outputs, True))
    out = {f"in-cache/{setting}": lambda i: piece(i["x"], i["ada"], i["ca_kv"], i["ca_len"], i["rope"],
                                                i["cache_k"], i["cache_v"], i["past"], False)}
    if setting == "default":
        cat = _compiled(BlockPiece(blk, False), True)
        out["cat/default"] = lambda i: cat(i["x"], i["ada"], i["ca_kv"], i["ca_len"], i["rope"],
                                            i["cache_k"][:, :, :i["past"]], i["cache_v"][:, :, :i["past"]])
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="infinity-2b")
    ap.add_argument("--runs", type=int, default=20)
    ap.add_argument("--top", type=int, default=14)
    args = ap.parse_args()
    dev = torch.device("cuda")
    cfg = get_config(args.model)
    sched = resolve_schedule(cfg, 1024, 1.0)
    total = sum(h * w for h, w in sched)
    n_last = sched[-1][0] * sched[-1][1]
    shapes = {"last scale": (n_last, total - n_last), "scale 0": (1, 0)}
    blk = make_block(cfg, dev)
    rows, payload = [], {"model": args.model, "environment": environment(dev), "total_tokens": total, "forms": {}}
    for setting in SETTINGS:
        fns = forms(blk, setting)  # compiled lazily, at the first call: inside the settings' patch
        with inductor_config.patch(SETTINGS[setting]):
            for form, fn in fns.items():
                for where, (n, P) in shapes.items():
                    inp = inputs(cfg, dev, n, P, total)
                    with torch.no_grad():
                        replay, _ = graphed(lambda: fn(inp))
                        t = time_cuda(replay, warmup=3, runs=args.runs)
                        top = kernels(replay, args.top)
                    payload["forms"][f"{form} @ {where}"] = {"n": n, "past": P, "timing": t, "kernels": top}
                    rows.append({"form": form, "shape": where, "n": n, "past": P, "median ms": t["median_ms"]})
                    print(f"{form:28s} {where:10s} n={n:5d} P={P:5d} {t['median_ms']:.3f} ms", flush=True)
                    for name, c, us in top:
                        print(f"    {us:9.1f} us {c:3d}x {name}", flush=True)
    # SDPA alone on the last-scale shapes: contiguous (B, H, N, hd) q/k/v vs token-major q and the prefix
    # view of a token-major cache with room for more tokens (the runtime's layout)
    H, hd = cfg.num_heads, cfg.head_dim
    big = [torch.randn(2, total + 512, H, hd, device=dev, dtype=torch.bfloat16) for _ in range(2)]
    q_tm = torch.randn(2, n_last, H, hd, device=dev, dtype=torch.bfloat16).transpose(1, 2)
    views = [b[:, :total].transpose(1, 2) for b in big]
    for name, q, k, v in (("contiguous", q_tm.contiguous(), *(t.contiguous() for t in views)),
                          ("token-major prefix view", q_tm, *views)):
        fn = lambda: attention(q, k, v, 1.0)  # noqa: E731
        with torch.no_grad():
            t = time_cuda(fn, warmup=3, runs=args.runs)
            top = kernels(fn, 3)
        payload["forms"][f"sdpa {name}"] = {"timing": t, "kernels": top}
        rows.append({"form": f"sdpa {name}", "shape": "last scale", "n": n_last, "past": total - n_last,
                     "median ms": t["median_ms"]})
        print(f"sdpa {name}: {t['median_ms']:.3f} ms  {[r[0][:60] for r in top]}", flush=True)
    write_results(f"block_kernels_{args.model}", payload, rows,
                  f"One {args.model} block (bf16, batch 2 = 1 + CFG), CUDA-graph replay, median of {args.runs}")


if __name__ == "__main__":
    main()
