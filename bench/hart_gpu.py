"""HART on one GPU, one command: toprovar's HART (PyTorch backend) unpruned, ToProVAR at the pinned operating point
and FastVAR, then the OFFICIAL mit-han-lab/hart code's unpruned latency on the same GPU as the anchor.

    python bench/hart_gpu.py --official-repo .carry/hart --out bench/results        # H200: hart-0.7b, 1024px bf16
    python bench/hart_gpu.py --model hart-tiny --device cpu --runs 1 --warmup 1 --official-repo /tmp/hart --out /tmp/hb

Setup (both sides): ``hart-0.7b`` size (depth 24, width 1536, 24 heads, 300 context tokens of width 1536, 14 scales
to 64x64 = 1024x1024 px, vocab 4096, diffusion MLP 1024 x 6, 8 iDDPM steps), random weights, random text features
(1 prompt, 300 context tokens, length 32), batch 1 + CFG 4.5 (the official linear ramp), top-p 0, the official
top-k, ``more_smooth`` off (the official code's "default case"; the sample.py flag adds Gumbel noise of
4096 values per token), bf16 matrices. Timed: one generation including the residual diffusion head and the
tokenizer decode; CUDA events.

Phases per item (ours: one per policy; then the official code): ``eager`` (first generation: warm-up, library
handles; ours: the scale-graph plan's eager run), ``capture`` (second: ours captures every scale into a CUDA graph
and replays it), ``--warmup`` more runs, then ``--runs`` timed runs: the reported latency is their median; the
eager/capture/warm-up times are reported apart, never in the median. Ours also records the scale-graph status
after the runs (``replaying`` = the median is of graph replays; ``failed: ...`` = the capture failed and the
runs were eager) and one profiled (eager) run's per-phase milliseconds (condition, transformer dense/pruned,
policy, gather/scatter, head, sampling incl. the diffusion head, next input, decode). ``--limit`` seconds per
item: no further run starts after it (at least one timed run when the phases before it fit). JSON and Markdown
are rewritten after every item.

Ours: ``Pipeline`` over ``TorchBackend`` (KV cache in place, whole-scale CUDA graphs for these static policies;
``--compile`` adds torch.compile, off by default to stay within a few minutes), decoder in bf16. ToProVAR runs the
pinned operating point of ``toprovar.benchmark.e2e.operating_point`` (pruning from the 4th-last scale (27x27),
the first 3 and last 2 layers Global, the others Detail keeping 30% of their tokens); every per-token computation
(FAE entropy, keep probabilities, ordering, gather/scatter) runs. FastVAR: ``FastVARConfig()``, which on HART
is its released HART code's setting (48x48 at 0.5, 64x64 at 0.75, every layer, cache at 36x36).

Official: ``HARTForT2I.autoregressive_infer_cfg`` of a checkout given by ``--official-repo`` (carried, not
installed), built by ``tests/oracle/_hart_shims.build_official`` with the released flags, under
``torch.autocast('cuda', bfloat16)`` (its sample.py uses float16 autocast), the blocks' weights in bf16 as ours
(embeddings, head, diffusion MLP float32 under autocast). Stand-ins (``_hart_shims``): its CUDA extension ``hart_backend.fused_kernels`` cannot be
installed here, so ``rms_norm`` is the PyTorch formula (an elementwise kernel chain instead of one fused kernel);
flash-attn and xformers are absent, so its attention takes its own SDPA fallback (``slow_attn``); scipy, if absent,
by a ``truncnorm`` stand-in (training only); its tokenizer is built from a config instead of ``from_pretrained``.

Writes OUT/hart_gpu_MODEL.json and .md.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from toprovar.benchmark.common import environment, write_results  # noqa: E402
from toprovar.benchmark.e2e import operating_point  # noqa: E402
from toprovar.config import get_config  # noqa: E402
from toprovar.model import families  # noqa: E402
from toprovar.pipeline import Pipeline  # noqa: E402
from toprovar.policy import FastVARPolicy, Policy, ToProVARConfig, ToProVARPolicy, policy_report  # noqa: E402

CFG_SCALE, TEXT_LEN, SEED = 4.5, 32, 1
PHASES = ("condition", "dense", "pruned", "policy", "gather_scatter", "head", "sampling", "next_input", "other",
          "decode")


def timed(fn, device: torch.device) -> float:
    """One call of fn in milliseconds (CUDA events on CUDA)."""
    if device.type == "cuda":
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize(device)
        a.record()
        fn()
        b.record()
        torch.cuda.synchronize(device)
        return a.elapsed_time(b)
    t = time.perf_counter()
    fn()
    return (time.perf_counter() - t) * 1e3


def phases(fn, device: torch.device, args) -> dict:
    """eager, capture, warm-up and timed runs of fn (module docstring), within ``args.limit`` seconds."""
    t0 = time.perf_counter()
    left = lambda: args.limit - (time.perf_counter() - t0)  # noqa: E731
    out = {"eager_ms": timed(fn, device), "capture_ms": None, "warmup_ms": [], "ms": []}
    if left() > 0:
        out["capture_ms"] = timed(fn, device)
    for _ in range(args.warmup):
        if left() <= 0:
            break
        out["warmup_ms"].append(timed(fn, device))
    for i in range(args.runs):
        if left() <= 0 and (i > 0 or out["capture_ms"] is None):
            break
        out["ms"].append(timed(fn, device))
    out["limited"] = len(out["ms"]) < args.runs
    out["median_ms"] = statistics.median(out["ms"]) if out["ms"] else None
    return out


def phase_ms(res) -> dict:
    """A profiled GenerationResult -> milliseconds per phase (``PHASES``), summed over the scales."""
    out = {k: 0.0 for k in PHASES}
    for d in res.piece_ms.values():
        for k, v in d.items():
            out[k] += v
    out["condition"], out["decode"] = res.stage_ms.get("condition", 0.0), res.stage_ms.get("decode", 0.0)
    return {k: round(v, 3) for k, v in out.items()}


def ours(cfg, device, dtype, args, text, lengths, report):
    model = families.build_model(cfg, seed=0)
    if dtype != torch.float32:
        model.to_inference_dtype(dtype)
    dec = families.build_decoder(cfg, seed=0).to(dtype)
    pipe = Pipeline(cfg, model.to(device), dec.to(device), None, True)
    pipe.compile = args.compile
    S = len(cfg.patch_nums)
    policies = {"none": Policy,
                "toprovar": lambda: ToProVARPolicy(ToProVARConfig(stage="full", **operating_point(cfg.depth, S))),
                "fastvar": FastVARPolicy}
    for name, make in policies.items():
        if args.policies and name not in args.policies:
            continue
        t0 = time.perf_counter()
        gen = lambda: pipe.generate_from_features(text, lengths, seed=SEED, policy=make(), progress=False)  # noqa
        try:
            d = phases(gen, device, args)
            pol = make()
            orch = pipe.orchestrator(families.schedule_for(cfg, None, 1.0))
            d["scale_graphs"] = orch.graphs.status(pol)
            res = pipe.generate_from_features(text, lengths, seed=SEED, policy=pol, progress=False, profile=True)
            d["profile_ms"] = {"phases": phase_ms(res), "scales": [round(v, 3) for v in res.scale_ms]}
            rep = policy_report(res.trace, cfg)
            d.update(relative_flops=rep["relative_flops"], kept=res.trace.kept,
                     image_std=float(res.images.float().std()))
        except Exception as exc:  # recorded, the next item runs
            d = {"error": (str(exc).strip().splitlines() or [type(exc).__name__])[0]}
        d["item_s"] = round(time.perf_counter() - t0, 1)
        report("toprovar", name, d)
    pipe.release_graphs()
    pipe._orchestrators.clear()  # free the workspaces
    if device.type == "cuda":
        torch.cuda.empty_cache()


def official(cfg, device, dtype, args, text, lengths, report):
    from tests.oracle import _hart_shims
    from toprovar.model.hart.tokenizer import HART_VAE_CONFIGS
    t0 = time.perf_counter()
    vc = HART_VAE_CONFIGS[cfg.vae]
    vae_kw = dict(vocab_size=cfg.vocab_size, z_channels=vc.z_channels, ch=vc.ch, ch_mult=vc.ch_mult,
                  v_patch_nums=tuple(cfg.patch_nums), quantizer_type="var_hybrid", share_quant_resi=4,
                  quant_resi=0.5, test_mode=True)
    L = cfg.text_maxlen
    mask = torch.arange(L, device=device)[None] < lengths[:, None]
    pos = mask.long().cumsum(1) - 1
    try:
        with _hart_shims.official_hart(args.official_repo, cpu=device.type != "cuda") as t2i:
            model = _hart_shims.build_official(t2i, cfg, vae_kw, seed=0).to(device)
            if dtype != torch.float32:  # the official inference runs under autocast; blocks' weights as ours
                for b in model.blocks:
                    b.to(dtype)
            ctx = torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32)

            def gen():
                with torch.inference_mode(), ctx:
                    return model.autoregressive_infer_cfg(B=1, label_B=text.clone(), g_seed=SEED, cfg=CFG_SCALE,
                                                          top_p=0.0, more_smooth=False,
                                                          context_position_ids=pos.clone(), context_mask=mask.clone())
            d = phases(gen, device, args)
            d["image_std"] = float(gen().float().std())
        del model
    except Exception as exc:  # recorded, not fatal
        d = {"error": (str(exc).strip().splitlines() or [type(exc).__name__])[0]}
    d["item_s"] = round(time.perf_counter() - t0, 1)
    report("official mit-han-lab/hart", "none", d)
    if device.type == "cuda":
        torch.cuda.empty_cache()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="hart-0.7b")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default=None, help="bfloat16 on CUDA (default), float32 on the CPU")
    p.add_argument("--official-repo", default=None, help="checkout of mit-han-lab/hart (skipped without)")
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--limit", type=float, default=120.0, help="seconds per item (no run starts after it)")
    p.add_argument("--policies", nargs="*", default=None, help="subset of: none toprovar fastvar")
    p.add_argument("--compile", action="store_true")
    p.add_argument("--out", default="bench/results")
    args = p.parse_args(argv)
    if args.runs < 1 or args.warmup < 0 or args.limit <= 0:
        p.error("--runs >= 1, --warmup >= 0, --limit > 0")
    if args.official_repo and not Path(args.official_repo, "hart").is_dir():
        p.error(f"--official-repo: {args.official_repo} is not a mit-han-lab/hart checkout (no hart/ inside)")
    device = torch.device(args.device)
    dtype = {"bfloat16": torch.bfloat16, "float32": torch.float32, "float16": torch.float16}[
        args.dtype or ("bfloat16" if device.type == "cuda" else "float32")]
    cfg = get_config(args.model).replace(more_smooth=False)
    g = torch.Generator().manual_seed(0)
    text = torch.randn(1, cfg.text_maxlen, cfg.text_channels, generator=g).to(device)
    lengths = torch.tensor([min(TEXT_LEN, cfg.text_maxlen)], dtype=torch.int32, device=device)
    payload = {"model": args.model, "device": str(device), "dtype": str(dtype), "cfg": CFG_SCALE,
               "more_smooth": False, "text_tokens": cfg.text_maxlen, "text_length": int(lengths[0]),
               "runs": args.runs, "warmup": args.warmup, "limit_s": args.limit, "compile": args.compile,
               "items": {}, "operating_point": operating_point(cfg.depth, len(cfg.patch_nums)),
               "environment": environment(device)}
    title = (f"HART {args.model}, {cfg.patch_nums[-1] * families.token_stride(cfg)}px {payload['dtype']}, batch 1 + "
             f"CFG {CFG_SCALE} (median of the timed runs; eager/capture/warm-up runs apart)")
    rows: list[dict] = []

    def report(impl: str, policy: str, d: dict) -> None:
        payload["items"][f"{impl} / {policy}"] = d
        rows.append({"implementation": impl, "policy": policy, "latency ms": d.get("median_ms"),
                     "runs": len(d.get("ms", [])), "eager ms": d.get("eager_ms"), "capture ms": d.get("capture_ms"),
                     "scale graphs": d.get("scale_graphs", "-"), "rel. FLOPs": d.get("relative_flops", 1.0),
                     "error": d.get("error", "")})
        base = next((r["latency ms"] for r in rows if r["implementation"] == "toprovar" and r["policy"] == "none"
                     and r["latency ms"]), None)
        for r in rows:
            r["speedup vs ours unpruned"] = base / r["latency ms"] if base and r["latency ms"] else None
        prof = [f"| {k.split(' / ')[1]} | " + " | ".join(f"{v['profile_ms']['phases'][ph]:.1f}" for ph in PHASES)
                + " |" for k, v in payload["items"].items() if "profile_ms" in v]
        sections = [OPERATING_POINT_NOTE.format(op=payload["operating_point"])]
        if prof:
            sections.append("Ours, one profiled eager run per policy: milliseconds per phase (summed over scales)\n\n"
                            "| policy | " + " | ".join(PHASES) + " |\n|" + "---|" * (len(PHASES) + 1) + "\n"
                            + "\n".join(prof))
        write_results(f"hart_gpu_{args.model}", payload, rows, title, args.out, sections)
        print(rows[-1], flush=True)

    if args.official_repo:  # the anchor first: a later item running out of time cannot cost it
        official(cfg, device, dtype, args, text, lengths, report)
    ours(cfg, device, dtype, args, text, lengths, report)
    print(Path(args.out, f"hart_gpu_{args.model}.md").read_text())
    return 0 if rows and not any(r["error"] for r in rows) else 1


OPERATING_POINT_NOTE = ("ToProVAR runs the pinned operating point of ``toprovar.benchmark.e2e.operating_point``: "
                        "{op}. FastVAR: ``FastVARConfig()``, on HART its released HART code's setting (48x48 at 0.5, "
                        "64x64 at 0.75, every layer, branch outputs cached at 36x36).")


if __name__ == "__main__":
    sys.exit(main())
