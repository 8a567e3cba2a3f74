"""FLOPs of a generation computed from shapes (not timed), and the per-policy report.

Counted (a multiply-add = 2 FLOPs), per block and per batch row, for n tokens run, P keys already in
the layer's KV cache, L (padded) text tokens, width C and FFN hidden F:
    self-attention  qkv 2nC(3C), scores QK^T 2n(P+n)C, AV 2n(P+n)C, proj 2nC^2
    cross-attention q 2nC^2, kv of the text 2L C(2C) (recomputed per block and scale, as the model
                    does), scores 2nLC, AV 2nLC, proj 2nC^2
    FFN             fc1 + fc2 4nCF
and per scale the head (AdaLN linear 2C(2C) per row + logits 2nC(2 bits)). Normalisations, RoPE, the
entropy statistics, sampling, the text encoder/conditioning and the VAE decoder are not counted (the
same for every policy or negligible). The unpruned reference runs every scale of the schedule, every
layer on all tokens, with the CFG batch when the generation started with it.
"""
from __future__ import annotations

from typing import Any

from .base import PolicyTrace


def block_flops(n: int, past: int, width: int, mlp_hidden: int, text_len: int, rows: int = 1,
                family: str = "infinity") -> dict[str, int]:
    """FLOPs of one block on n tokens with a cache of ``past`` keys, by part (times ``rows``). HART: no
    cross-attention, a gated (3-matrix) MLP."""
    C, F, L = width, mlp_hidden, text_len
    if family == "hart":
        parts = {"sa_qkv": 2 * n * C * 3 * C, "sa_attn": 4 * n * (past + n) * C, "sa_proj": 2 * n * C * C,
                 "ffn": 6 * n * C * F}
        return {k: v * rows for k, v in parts.items()}
    parts = {
        "sa_qkv": 2 * n * C * 3 * C,
        "sa_attn": 4 * n * (past + n) * C,
        "sa_proj": 2 * n * C * C,
        "ca_q": 2 * n * C * C,
        "ca_kv": 2 * L * C * 2 * C if n > 0 else 0,
        "ca_attn": 4 * n * L * C,
        "ca_proj": 2 * n * C * C,
        "ffn": 4 * n * C * F,
    }
    return {k: v * rows for k, v in parts.items()}


def head_flops(n: int, width: int, token_bits: int, rows: int = 1) -> int:
    """FLOPs of the head on n tokens (AdaLN linear + logits), times ``rows``."""
    return rows * (2 * width * 2 * width + 2 * n * width * 2 * token_bits)


def _dims(model: Any) -> tuple[int, int, int, int]:
    return model.depth, model.width, model.mlp_hidden, model.token_bits


def hart_residual_flops(n: int, model: Any, rows: int = 1) -> int:
    """FLOPs of HART's diffusion head at the last scale: ``diff_steps`` MLP passes on n tokens per row."""
    W, C, Cv = model.diff_width, model.width, model.codebook_dim
    per = 2 * Cv * W + 2 * C * W + 2 * (256 * W + W * W) + model.diff_depth * (6 * W * W + 4 * W * W) \
        + 4 * W * W + 4 * W * Cv
    return rows * n * model.diff_steps * per


def trace_flops(trace: PolicyTrace, model: Any) -> dict[int, int]:
    """FLOPs per scale that ran, from the kept counts of a trace. ``model``: a ModelConfig (or any object
    with depth, width, mlp_hidden, token_bits; HART configs also count their head over the codebook and, at the
    last scale, the diffusion head)."""
    depth, C, F, bits = _dims(model)
    family = getattr(model, "family", "infinity")
    past = [0] * depth
    out = {}
    for si in sorted(trace.kept):
        rows = trace.batch * (2 if trace.cfg_batch.get(si, False) else 1)
        total = 0
        for layer, m in enumerate(trace.kept[si]):
            if m:
                total += sum(block_flops(m, past[layer], C, F, trace.text_len, rows, family).values())
            past[layer] += m
        h, w = trace.schedule[si] if trace.schedule else (1, 1)
        if family == "hart":  # the head draws from the codebook (V logits) for the h*w sampled tokens
            total += rows * (2 * C * 2 * C + 2 * h * w * C * model.vocab_size)
            if si == len(trace.schedule) - 1:
                total += hart_residual_flops(h * w, model, rows)
        else:
            total += head_flops(trace.tokens[si], C, bits, rows)
        out[si] = total
    return out


def unpruned_flops(schedule: list[tuple[int, int]], model: Any, batch: int, cfg: bool, text_len: int) -> dict[int, int]:
    """FLOPs per scale of the unpruned generation (all scales, layers and tokens)."""
    depth, *_ = _dims(model)
    full = PolicyTrace(schedule=list(schedule), batch=batch, cfg=cfg, text_len=text_len)
    for si, (h, w) in enumerate(schedule):
        n = text_len if si == 0 and getattr(model, "family", "") == "hart" else h * w  # HART: the context tokens
        full.kept[si], full.tokens[si], full.cfg_batch[si] = [n] * depth, n, cfg
    return trace_flops(full, model)


def policy_report(trace: PolicyTrace, model: Any, schedule: list[tuple[int, int]] | None = None) -> dict:
    """Kept-token fraction per scale and layer, and FLOPs relative to the unpruned generation.

    Returns {"kept_fraction": {si: [per layer]}, "scale_kept_fraction": {si: mean over layers},
    "skipped_scales": [...], "cfg_batch": {si: bool}, "flops_per_scale": {si}, "flops", "flops_unpruned",
    "relative_flops"}; scales that did not run have kept fraction 0 and no FLOPs.
    """
    schedule = list(schedule or trace.schedule)
    if not schedule:
        raise ValueError("policy_report: the trace has no schedule; pass schedule=")
    depth = model.depth
    kept_fraction, scale_fraction = {}, {}
    for si, (h, w) in enumerate(schedule):
        n = trace.tokens.get(si, h * w)
        ks = trace.kept.get(si, [0] * depth)
        kept_fraction[si] = [k / n for k in ks]
        scale_fraction[si] = sum(ks) / (n * depth)
    per_scale = trace_flops(trace, model)
    total = sum(per_scale.values())
    ref = sum(unpruned_flops(schedule, model, trace.batch, trace.cfg, trace.text_len).values())
    return {"kept_fraction": kept_fraction, "scale_kept_fraction": scale_fraction,
            "skipped_scales": [si for si in range(len(schedule)) if si not in trace.kept],
            "cfg_batch": dict(trace.cfg_batch), "flops_per_scale": per_scale, "flops": total,
            "flops_unpruned": ref, "relative_flops": total / ref if ref else 1.0}


def format_report(report: dict) -> str:
    """Plain-text table: per scale kept % per layer, then relative FLOPs."""
    lines = [f"{'scale':>5} {'kept%':>7}  per layer kept%"]
    for si, fr in report["kept_fraction"].items():
        per = " ".join(f"{100 * f:.0f}" for f in fr)
        mark = " (not run)" if si in report["skipped_scales"] else ""
        lines.append(f"{si:>5} {100 * report['scale_kept_fraction'][si]:>6.1f}%  {per}{mark}")
    lines.append(f"FLOPs {report['flops'] / 1e9:.3f} G of {report['flops_unpruned'] / 1e9:.3f} G unpruned: "
                 f"relative {report['relative_flops']:.3f}")
    return "\n".join(lines)


__all__ = ["block_flops", "head_flops", "trace_flops", "unpruned_flops", "policy_report", "format_report"]
