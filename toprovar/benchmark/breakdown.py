"""Where the time of a profiled generation goes: per scale x piece kind (``GenerationResult.piece_ms``).

The pieces of a scale tile its timed interval (``toprovar.runtime.orchestrator.PIECES``), so their sum is
the scale's time up to the cost of the marks themselves; ``check_pieces`` says where it is not.
"""
from __future__ import annotations

import math

from ..runtime.orchestrator import PIECES
from .common import markdown_table


def _piece_map(piece_ms: dict) -> dict[int, dict[str, float]]:
    """JSON round trips turn scale keys into strings; accept both."""
    return {int(si): dict(d) for si, d in piece_ms.items()}


def piece_totals(piece_ms: dict) -> dict[str, float]:
    """Milliseconds per piece kind summed over the scales (``PIECES`` order)."""
    tot: dict[str, float] = {}
    for d in _piece_map(piece_ms).values():
        for p, v in d.items():
            tot[p] = tot.get(p, 0.0) + v
    return {p: tot[p] for p in PIECES if p in tot}


def check_pieces(scale_ms: list[float], piece_ms: dict, rel: float = 0.10, abs_ms: float = 2.0) -> list[str]:
    """Scales whose pieces do not sum to the scale time within ``rel`` of it or ``abs_ms`` (one line each)."""
    pm = _piece_map(piece_ms)
    bad = []
    for si, total in enumerate(scale_ms):
        s = sum(pm.get(si, {}).values())
        if not (math.isfinite(total) and abs(s - total) <= max(rel * total, abs_ms)):
            bad.append(f"scale {si}: pieces sum to {s:.3f} ms, the scale took {total:.3f} ms")
    return bad


def breakdown_rows(run: dict, depth: int) -> list[dict]:
    """Table rows of one profiled run (the benchmark's run record: tokens, kept, scale_ms, stage_ms,
    piece_ms): one per scale, the sum over scales, text conditioning, VAE decode."""
    pm = _piece_map(run.get("piece_ms", {}))
    tokens = {int(k): v for k, v in run["tokens"].items()}
    kept = {int(k): v for k, v in run["kept"].items()}
    kinds = [p for p in PIECES if any(p in d for d in pm.values())]
    rows = []
    for si, ms in enumerate(run["scale_ms"]):
        n = tokens[si]
        row = {"scale": str(si), "tokens": str(n), "kept": sum(kept[si]) / max(1, n * depth), "scale ms": ms}
        d = pm.get(si, {})
        row.update({p: d[p] if p in d else "-" for p in kinds})
        row["pieces sum"] = sum(d.values())
        rows.append(row)
    tot = piece_totals(pm)
    blank = {p: "" for p in kinds}
    rows.append({"scale": "all scales", "tokens": str(sum(tokens.values())), "kept": "",
                 "scale ms": sum(run["scale_ms"]), **{p: tot.get(p, "-") for p in kinds},
                 "pieces sum": sum(tot.values())})
    for key, label in (("condition", "text conditioning"), ("decode", "VAE decode")):
        if key in run.get("stage_ms", {}):
            rows.append({"scale": label, "tokens": "", "kept": "", "scale ms": run["stage_ms"][key], **blank,
                         "pieces sum": ""})
    return rows


def breakdown_section(title: str, run: dict, depth: int) -> str:
    """A Markdown section: ``title`` and the per-scale x piece table of ``run`` (ms)."""
    lines = [f"## {title}", "",
             "Milliseconds per scale and piece kind of one profiled run (dense/pruned: transformer layers on "
             "all / on kept tokens; policy: keep/observe (entropy statistics, TokenKeepPiece, selection); "
             "gather_scatter: kept-token gather and scatter; head: logits; sampling: noise, bit sampling; "
             "next_input: summed codes and next scale's input; other: scale set-up). kept: tokens run / "
             "(tokens x layers). A profiled run times its pieces one by one (events between them), so it never "
             "replays whole-scale CUDA graphs: its scales are slower than in the timed runs.", ""]
    return "\n".join(lines + markdown_table(breakdown_rows(run, depth))) + "\n"
