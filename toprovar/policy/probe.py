"""The entropy analysis behind ToProVAR's choices, on any model: every scale and layer, unpruned.

``EntropyProbe`` is a policy that prunes nothing and asks for the self-attention entropy of every layer at
every scale (conditional half, per prompt). Per prompt it records, for each (scale, layer): the mean
entropy, rho (fraction of tokens below the scale's mean entropy, the paper's Eq. 3), rho at a fixed
threshold (fraction below 0.75 of the uniform-attention entropy ln K, K = keys visible), and sigma1/sigma2 of
the h x w entropy map raw and centred. ``summarise_probe`` averages over prompts and derives the layer
classes at every scale.
"""
from __future__ import annotations

import math
import statistics

import torch

from .base import GenerationInfo, Policy
from .stats import low_entropy_ratio, principal_ratio

FIXED_FRACTION = 0.75  # rho_fixed: fraction of tokens with H < FIXED_FRACTION * ln K (shapes: mean H ~ 0.8 ln K)
MIN_CLASS_SIDE = 4     # layer classes only from maps of at least 4x4 (a 2x2 map's ratio is noise)
GLOBAL_RATIO = 2.0     # a layer whose centred sigma1/sigma2 reaches this has a dominant component ("Global")


class EntropyProbe(Policy):
    """No pruning; records every layer's entropy statistics at every scale (module docstring)."""

    name = "entropy-probe"

    def __init__(self):
        self.records: list[dict] = []

    def start(self, info: GenerationInfo) -> None:
        super().start(info)
        self.schedule = [tuple(s) for s in info.schedule]
        S, L = len(self.schedule), info.depth
        self.keys = [sum(h * w for h, w in self.schedule[:si + 1]) for si in range(S)]
        stat = lambda: [[None] * L for _ in range(S)]  # noqa: E731
        self._cur = [{k: stat() for k in ("mean", "rho", "rho_fixed", "ratio_raw", "ratio_centred")}
                     for _ in range(info.batch)]
        self.records.extend(self._cur)

    def wants_entropy(self, si: int, layer: int) -> bool:
        return True

    def observe(self, si: int, layer: int, entropy: torch.Tensor, kept: torch.Tensor | None) -> None:
        e = entropy.float()  # (B, n)
        h, w = self.schedule[si]
        rho = low_entropy_ratio(e).tolist()
        fixed = (e < FIXED_FRACTION * math.log(self.keys[si])).float().mean(-1).tolist()
        mean = e.mean(-1).tolist()
        maps = e.reshape(-1, h, w).cpu()
        for b, rec in enumerate(self._cur):
            rec["mean"][si][layer], rec["rho"][si][layer], rec["rho_fixed"][si][layer] = mean[b], rho[b], fixed[b]
            if min(h, w) >= 2:
                rec["ratio_raw"][si][layer] = principal_ratio(maps[b], center=False)
                rec["ratio_centred"][si][layer] = principal_ratio(maps[b], center=True)


def _mean(vals) -> float | None:
    v = [x for x in vals if x is not None and math.isfinite(x)]
    return statistics.fmean(v) if v else None


def _std(vals) -> float | None:
    v = [x for x in vals if x is not None and math.isfinite(x)]
    return statistics.pstdev(v) if len(v) > 1 else None


def summarise_probe(records: list[dict], schedule: list[tuple[int, int]], depth: int) -> dict:
    """Per-prompt probe records -> JSON-ready statistics (means over prompts; ``std`` across prompts):
    per_scale: tokens, keys, uniform_entropy (ln K), mean_entropy / rho / rho_fixed of layer 0 and averaged
    over layers; per_layer (lists [scale][layer]): mean_entropy, rho, ratio_raw, ratio_centred (None where the
    map has one row or column); classes[scale] (None below MIN_CLASS_SIDE per side): layers whose mean centred ratio >= GLOBAL_RATIO, and the
    beta-auto split (R_l = exp(-beta (ratio - 1)) with beta = ln 2 / (median ratio - 1): Global R < 0.5)."""
    if not records:
        raise ValueError("entropy probe: no prompts were run")
    S = len(schedule)
    keys = [sum(h * w for h, w in schedule[:si + 1]) for si in range(S)]
    grid = lambda k: [[_mean(r[k][s][l] for r in records) for l in range(depth)] for s in range(S)]  # noqa: E731
    per_layer = {k: grid(src) for k, src in (("mean_entropy", "mean"), ("rho", "rho"), ("rho_fixed", "rho_fixed"),
                                              ("ratio_raw", "ratio_raw"), ("ratio_centred", "ratio_centred"))}
    per_scale = {
        "tokens": [h * w for h, w in schedule], "keys": keys, "uniform_entropy": [math.log(k) for k in keys],
        "mean_entropy_layer0": [per_layer["mean_entropy"][s][0] for s in range(S)],
        "mean_entropy_all_layers": [_mean(per_layer["mean_entropy"][s]) for s in range(S)],
        "rho_layer0": [per_layer["rho"][s][0] for s in range(S)],
        "rho_layer0_std": [_std(r["rho"][s][0] for r in records) for s in range(S)],
        "rho_all_layers": [_mean(per_layer["rho"][s]) for s in range(S)],
        "rho_fixed_layer0": [per_layer["rho_fixed"][s][0] for s in range(S)],
        "rho_fixed_all_layers": [_mean(per_layer["rho_fixed"][s]) for s in range(S)],
    }
    classes = []
    for s in range(S):
        ratios = per_layer["ratio_centred"][s]
        if min(schedule[s]) < MIN_CLASS_SIDE or any(r is None for r in ratios):
            classes.append(None)
            continue
        med = statistics.median(ratios)
        beta = math.log(2) / (med - 1) if med > 1 + 1e-9 else None
        score = [math.exp(-beta * (r - 1)) for r in ratios] if beta else None
        classes.append({"dominant": [l for l, r in enumerate(ratios) if r >= GLOBAL_RATIO],
                        "beta_auto": beta, "score": score,
                        "global_beta_auto": [l for l, r in enumerate(score or []) if r < 0.5],
                        "ratio_range": [min(ratios), max(ratios)],
                        "raw_ratio_range": [min(per_layer["ratio_raw"][s]), max(per_layer["ratio_raw"][s])]})
    return {"prompts": len(records), "depth": depth, "schedule": [list(s) for s in schedule],
            "fixed_fraction": FIXED_FRACTION, "global_ratio": GLOBAL_RATIO, "min_class_side": MIN_CLASS_SIDE,
            "per_scale": per_scale, "per_layer": per_layer, "classes": classes}
