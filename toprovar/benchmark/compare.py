"""Before/after comparison of two end-to-end benchmark JSONs (``toprovar bench`` / ``toprovar.benchmark.e2e``).

Per policy present in both: each piece's milliseconds summed over the scales (``piece_total_ms``), the
``condition`` and ``decode`` stages, the scales' sum and the median latency, before and after. Each change
(``name:piece:predicted_ms``) names the piece it acts on and the milliseconds it was predicted to save; its row
gives the measured saving of that piece next to the prediction.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from .breakdown import piece_totals


@dataclass(frozen=True)
class Change:
    name: str
    piece: str
    predicted_ms: float

    @classmethod
    def parse(cls, text: str) -> "Change":
        """``name:piece:predicted_ms`` -> Change (ValueError naming --change otherwise)."""
        parts = text.rsplit(":", 2)
        try:
            if len(parts) != 3 or not parts[0] or not parts[1]:
                raise ValueError
            return cls(parts[0], parts[1], float(parts[2]))
        except ValueError:
            raise ValueError(f"--change {text!r}: expected NAME:PIECE:PREDICTED_MS (e.g. subpixel:decode:12)") from None


def load_run(path: str | Path) -> dict:
    """An e2e benchmark JSON (one clear error naming the file otherwise)."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError) as exc:
        raise ValueError(f"{path}: not a readable JSON file ({type(exc).__name__})") from None
    if not isinstance(data, dict) or not isinstance(data.get("runs"), dict) or not data["runs"]:
        raise ValueError(f"{path}: not an end-to-end benchmark JSON (no 'runs')")
    return data


def piece_ms(run: dict) -> dict[str, float]:
    """One policy's run record -> {piece: ms}: the scale pieces, condition, decode, scales, latency."""
    out = dict(run.get("piece_total_ms") or piece_totals(run.get("piece_ms", {})))
    out.update({k: float(v) for k, v in run.get("stage_ms", {}).items()})
    out["scales"] = float(sum(run.get("scale_ms", [])))
    out["latency"] = float(run["latency"]["median_ms"])
    return out


def compare(before: dict, after: dict, changes: list[Change] = ()) -> tuple[list[dict], list[dict]]:
    """(piece rows, change rows) over the policies in both JSONs; a change's piece must exist in them."""
    policies = [p for p in before["runs"] if p in after["runs"]]
    if not policies:
        raise ValueError("the two benchmark JSONs have no policy in common")
    rows, crow = [], []
    for pol in policies:
        b, a = piece_ms(before["runs"][pol]), piece_ms(after["runs"][pol])
        for piece in [k for k in b if k in a]:
            rows.append({"policy": pol, "piece": piece, "before ms": b[piece], "after ms": a[piece],
                         "saved ms": b[piece] - a[piece],
                         "saved %": 100 * (b[piece] - a[piece]) / b[piece] if b[piece] else float("nan")})
        for c in changes:
            if c.piece not in b or c.piece not in a:
                raise ValueError(f"--change {c.name}: piece {c.piece!r} is not in both JSONs "
                                 f"(pieces: {', '.join(k for k in b if k in a)})")
            crow.append({"change": c.name, "policy": pol, "piece": c.piece, "predicted ms": c.predicted_ms,
                         "measured ms": b[c.piece] - a[c.piece], "latency saved ms": b["latency"] - a["latency"]})
    return rows, crow
