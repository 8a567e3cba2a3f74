"""Policy parameters: one frozen dataclass per policy, every field range-checked.

A bad value raises one ``ValueError`` naming the class and the field, e.g.
``ToProVARConfig.a_max: must be a number in [a_min=0.5, 1], got 0.2``. Values that depend on the model
(layer indices, the number of static layer scores, positions in the schedule) are checked again when a
generation starts (``Policy.start``), with the same kind of message.

Scale positions of the baselines are given relative to the schedule: an index ``i >= 0`` is the
0-based scale index, ``i < 0`` counts from the last scale (-1 = last). The 1024x1024 schedule has 13
scales (sides 1 2 4 6 8 12 16 20 24 32 40 48 64), so -4 is 32x32, -3 40x40, -2 48x48, -1 64x64 and -5
24x24; the tiny model's 7 scales (1 2 4 6 8 12 16) map -4 to 6x6, -1 to 16x16.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Mapping

STAGES = ("scale", "scale-layer", "scale-token", "full")
LAYER_SCORE_MODES = ("online", "static")


def _fail(owner: str, name: str, want: str, value: Any) -> None:
    raise ValueError(f"{owner}.{name}: must be {want}, got {value!r}")


def _is_num(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _num(owner: str, name: str, v: Any, lo: float, hi: float, lo_open: bool = False, hi_open: bool = False,
         lo_name: str | None = None) -> None:
    ok = _is_num(v) and (v > lo if lo_open else v >= lo) and (v < hi if hi_open else v <= hi)
    if not ok:
        left = ("(" if lo_open else "[") + (f"{lo_name}={lo:g}" if lo_name else f"{lo:g}")
        right = ("inf)" if hi == math.inf else (f"{hi:g})" if hi_open else f"{hi:g}]"))
        _fail(owner, name, f"a number in {left}, {right}", v)


def _bool(owner: str, name: str, v: Any) -> None:
    if not isinstance(v, bool):
        _fail(owner, name, "true or false", v)


def _int_tuple(owner: str, name: str, v: Any, allow_negative: bool = False) -> tuple[int, ...]:
    if isinstance(v, (str, bytes)) or not hasattr(v, "__iter__"):
        _fail(owner, name, "a list of integers", v)
    out = tuple(v)
    if not all(_is_int(i) and (allow_negative or i >= 0) for i in out):
        _fail(owner, name, "a list of " + ("integers" if allow_negative else "non-negative integers"), v)
    if len(set(out)) != len(out):
        _fail(owner, name, "a list without repeats", v)
    return out


class _ConfigBase:
    """from_dict / to_dict (JSON-ready) / replace shared by the policy configs."""

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]):
        """Build from a mapping; an unknown key is one ValueError naming it."""
        if not isinstance(data, Mapping):
            raise ValueError(f"{cls.__name__}: expected an object of parameters, got {type(data).__name__}")
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ValueError(f"{cls.__name__}.{unknown[0]}: unknown parameter; known: {sorted(names)}")
        return cls(**dict(data))

    def to_dict(self) -> dict[str, Any]:
        out = {}
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if isinstance(v, tuple):
                v = list(v)
            elif isinstance(v, Mapping):
                v = {str(k): val for k, val in v.items()}
            out[f.name] = v
        return out

    def replace(self, **kw):
        return dataclasses.replace(self, **kw)


@dataclass(frozen=True)
class ToProVARConfig(_ConfigBase):
    """Parameters of the ToProVAR policy (paper section 4; the issue's reading where it is ambiguous).

    stage: which dimensions are active (ablation, appendix A.1.5): "scale" (scale depth only: scales
      after D are skipped), "scale-layer" (from D on, Detail layers, R_l >= detail_threshold, are
      skipped and Global layers run in full), "scale-token" (from D on, token pruning on every
      prunable layer with R_l = 1, no layer analysis), "full" (token pruning weighted by R_l, layers
      whose kept count falls to the minimum are skipped when ``layer_skip``).
    tau: scale-depth threshold; D = first scale with rho_s >= tau (appendix A.2: about 0.4).
    beta: layer-score sharpness, R_l = exp(-beta (sigma1/sigma2 - 1)) (> 0; the paper gives no value).
    a_min, a_max: P_keep = 1 - clip(a_min + (a_max - a_min) q, 0, 1); 0 <= a_min <= a_max <= 1.
    k_min: kept tokens are at least ceil(k_min N) (0 < k_min <= 1).
    bucket: the kept count is rounded up to a multiple of ``bucket`` (>= 1), capped at N.
    rep_scale: 0-based index of the scale whose entropy maps give R_l; None = round(rep_fraction (S-1))
      (rep_fraction 0.5 gives index 6, the 7th of 13 scales, at 1024x1024; index 3 of the tiny model's 7).
    layer_score_mode: "online" (R_l from this prompt's map at the representative scale; layers are not
      pruned before it is known) or "static" (``layer_scores`` from calibration, known from scale 0).
    layer_scores: static R_l per layer, each in [0, 1] (length = model depth, checked at start).
    layer_skip: whether a layer whose kept count falls to the minimum is skipped entirely ("full").
    full_layers: layers that always run on all tokens (must include layer 0).
    rho_layers: layers whose head-mean entropy gives rho_s (a non-empty subset of ``full_layers``).
    detail_threshold: R_l at or above which a layer counts as a Detail layer ("scale-layer" stage).
    svd_center: subtract the map's mean before the SVD (default on). Off is the paper's literal
      sigma1/sigma2 of the raw map; but entropies are all positive with a large common offset (about
      ln of the keys seen), so the raw map's sigma1 is that offset and sigma1/sigma2 is in the hundreds
      to thousands for every layer (measured on the tiny model), R ~ 0 everywhere and online token
      pruning vanishes. Centred, sigma1/sigma2 measures the structure the paper describes (a dominant
      grid-like component = Global, ~1 = Detail). Static calibrated scores with ``--beta auto`` work
      with either setting.
    fixed_depth: pin D to this 0-based scale index instead of measuring rho_s against tau (a pinned
      operating point: benchmarks, deployments calibrated offline); None = measured (default).
    keep_fraction: pin the kept count of a prunable layer to n (1 - R_l (1 - keep_fraction)) (bucketed,
      at least the k_min floor) instead of round(sum P_keep); the kept tokens are still the top ones by
      P_keep. Known on the host, so no device read per layer; None = from P_keep (default).
    restore: a pruned token (or every token of a skipped layer) receives the layer's update from the previous
      scale, resized to this scale's grid (FastVAR-style restoration; costs one (B, n, C) float32 buffer per
      layer) instead of passing the layer unchanged (the paper's reading, default off).
    """
    stage: str = "full"
    tau: float = 0.4
    beta: float = 0.5
    a_min: float = 0.0
    a_max: float = 0.9
    k_min: float = 0.1
    bucket: int = 16
    rep_scale: int | None = None
    rep_fraction: float = 0.5
    layer_score_mode: str = "online"
    layer_scores: tuple[float, ...] | None = None
    layer_skip: bool = True
    full_layers: tuple[int, ...] = (0,)
    rho_layers: tuple[int, ...] = (0,)
    detail_threshold: float = 0.5
    svd_center: bool = True
    fixed_depth: int | None = None
    keep_fraction: float | None = None
    restore: bool = False

    def __post_init__(self):
        o = type(self).__name__
        if self.stage not in STAGES:
            _fail(o, "stage", f"one of {list(STAGES)}", self.stage)
        _num(o, "tau", self.tau, 0.0, 1.0)
        _num(o, "beta", self.beta, 0.0, math.inf, lo_open=True, hi_open=True)
        _num(o, "a_min", self.a_min, 0.0, 1.0)
        _num(o, "a_max", self.a_max, self.a_min if _is_num(self.a_min) else 0.0, 1.0, lo_name="a_min")
        _num(o, "k_min", self.k_min, 0.0, 1.0, lo_open=True)
        if not _is_int(self.bucket) or self.bucket < 1:
            _fail(o, "bucket", "an integer >= 1", self.bucket)
        if self.rep_scale is not None and (not _is_int(self.rep_scale) or self.rep_scale < 0):
            _fail(o, "rep_scale", "a non-negative scale index or null", self.rep_scale)
        _num(o, "rep_fraction", self.rep_fraction, 0.0, 1.0)
        if self.layer_score_mode not in LAYER_SCORE_MODES:
            _fail(o, "layer_score_mode", f"one of {list(LAYER_SCORE_MODES)}", self.layer_score_mode)
        if self.layer_scores is not None:
            if isinstance(self.layer_scores, (str, bytes)) or not hasattr(self.layer_scores, "__iter__"):
                _fail(o, "layer_scores", "a list of numbers in [0, 1] or null", self.layer_scores)
            scores = tuple(float(s) if _is_num(s) else s for s in self.layer_scores)
            if not scores or not all(_is_num(s) and 0.0 <= s <= 1.0 for s in scores):
                _fail(o, "layer_scores", "a non-empty list of numbers in [0, 1] or null", self.layer_scores)
            object.__setattr__(self, "layer_scores", scores)
        if self.layer_score_mode == "static" and self.layer_scores is None:
            _fail(o, "layer_scores", "given when layer_score_mode is 'static' (run `toprovar calibrate`)", None)
        _bool(o, "layer_skip", self.layer_skip)
        full = _int_tuple(o, "full_layers", self.full_layers)
        if 0 not in full:
            _fail(o, "full_layers", "a list that includes layer 0", self.full_layers)
        object.__setattr__(self, "full_layers", full)
        rho = _int_tuple(o, "rho_layers", self.rho_layers)
        if not rho or not set(rho) <= set(full):
            _fail(o, "rho_layers", f"a non-empty subset of full_layers={list(full)}", self.rho_layers)
        object.__setattr__(self, "rho_layers", rho)
        _num(o, "detail_threshold", self.detail_threshold, 0.0, 1.0)
        _bool(o, "svd_center", self.svd_center)
        if self.fixed_depth is not None and (not _is_int(self.fixed_depth) or self.fixed_depth < 0):
            _fail(o, "fixed_depth", "a non-negative scale index or null", self.fixed_depth)
        if self.keep_fraction is not None:
            _num(o, "keep_fraction", self.keep_fraction, 0.0, 1.0, lo_open=True)
        _bool(o, "restore", self.restore)

    def rep_index(self, num_scales: int) -> int:
        """The representative scale's 0-based index for a schedule of ``num_scales`` scales."""
        idx = self.rep_scale if self.rep_scale is not None else int(round(self.rep_fraction * (num_scales - 1)))
        if idx >= num_scales:
            _fail(type(self).__name__, "rep_scale", f"a scale index < {num_scales} (the schedule's length)", idx)
        return idx

    def check_model(self, depth: int, num_scales: int) -> None:
        """Raise ValueError for a field that does not fit a model of ``depth`` layers / ``num_scales``."""
        o = type(self).__name__
        for name in ("full_layers", "rho_layers"):
            bad = [i for i in getattr(self, name) if i >= depth]
            if bad:
                _fail(o, name, f"layer indices < depth {depth}", list(getattr(self, name)))
        if self.layer_scores is not None and len(self.layer_scores) != depth:
            _fail(o, "layer_scores", f"{depth} values (one per layer; this calibration is for another model)",
                  f"{len(self.layer_scores)} values")
        if self.fixed_depth is not None and self.fixed_depth >= num_scales:
            _fail(o, "fixed_depth", f"a scale index < {num_scales} (the schedule's length)", self.fixed_depth)
        self.rep_index(num_scales)


# FastVAR: pruning ratio per scale position (ratio 1.0 = the scale and every later one is not run).
# "issue" = the ToProVAR paper's Table 8 ({10:0.4, 11:0.6} for 2B, {10:0.4, 11:0.6, 12:1.0, 13:1.0} for
# 8B, 1-based indices of the 13-scale 1024 schedule: 10 = 32x32, 11 = 40x40, 12 = 48x48, 13 = 64x64),
# written from the end of the schedule. "public" = FastVAR's released Infinity code: 32x32 at 0.4,
# 40x40 at 0.5, 48x48 and 64x64 not run (it publishes no 8B setting; the same is used for 8B).
FASTVAR_PRESETS: dict[str, dict[str, dict[int, float]]] = {
    "issue": {"2b": {-4: 0.4, -3: 0.6}, "8b": {-4: 0.4, -3: 0.6, -2: 1.0, -1: 1.0}},
    "public": {"2b": {-4: 0.4, -3: 0.5, -2: 1.0, -1: 1.0}, "8b": {-4: 0.4, -3: 0.5, -2: 1.0, -1: 1.0}},
}
# FastVAR on HART (family "hart"): its released HART code (HART/hart/modules/networks/fastvar_utils.py and
# fastvar_basic.py) prunes 48x48 at 0.5 and 64x64 at 0.75 in every layer (attention and FFN; HART has no
# cross-attention), restoring from the branch outputs cached at 36x36, and skips no scale. The ToProVAR paper's
# Table 9 names no other HART setting, so both presets use this one on HART.
FASTVAR_HART_RATIOS: dict[int, float] = {-2: 0.5, -1: 0.75}
FASTVAR_CACHE_SCALE = {"infinity": -5, "hart": -3}


@dataclass(frozen=True)
class FastVARConfig(_ConfigBase):
    """FastVAR (Guo et al. 2025) as its public Infinity code runs it, scale rules relative to the schedule.

    preset: "issue" or "public" (see FASTVAR_PRESETS); ignored when ``ratios`` is given.
    model_size: "auto" (the 8B setting for a 40-layer model, else 2B), "2b" or "8b".
    ratios: {scale position: pruning ratio in [0, 1]}; positions as in the module docstring. At a
      pruned scale a layer runs each sub-layer on n - int(n * ratio) tokens; ratio 1.0 stops generation
      there (the summed codes so far are decoded).
    layers: [first, stop) layers pruned; None = [max(1, round(3 D / 32)), D - round(4 D / 32)) for depth
      D, which is FastVAR's 3..27 for the 32-layer 2B (1..3 for the tiny model, 4..34 for 8B); every
      layer on HART.
    cache_scale: position of the scale whose full branch outputs are cached for restoration; must come
      before every pruned scale. None = the public code's: 24x24 = -5 on Infinity, 36x36 = -3 on HART.
    On HART (``resolve(..., family="hart")``) the presets give FASTVAR_HART_RATIOS (its released HART code).
    """
    preset: str = "issue"
    model_size: str = "auto"
    ratios: Mapping[int, float] | None = None
    layers: tuple[int, int] | None = None
    cache_scale: int | None = None

    def __post_init__(self):
        o = type(self).__name__
        if self.preset not in FASTVAR_PRESETS:
            _fail(o, "preset", f"one of {sorted(FASTVAR_PRESETS)}", self.preset)
        if self.model_size not in ("auto", "2b", "8b"):
            _fail(o, "model_size", "'auto', '2b' or '8b'", self.model_size)
        if self.ratios is not None:
            if not isinstance(self.ratios, Mapping) or not self.ratios:
                _fail(o, "ratios", "a non-empty {scale position: ratio} object", self.ratios)
            clean = {}
            for k, v in self.ratios.items():
                try:
                    key = int(k)
                except (TypeError, ValueError):
                    _fail(o, "ratios", "integer scale positions as keys", k)
                if not _is_num(v) or not 0.0 <= v <= 1.0:
                    _fail(o, "ratios", "ratios in [0, 1]", v)
                clean[key] = float(v)
            object.__setattr__(self, "ratios", clean)
        if self.layers is not None:
            lay = _int_tuple(o, "layers", self.layers)
            if len(lay) != 2 or lay[0] >= lay[1]:
                _fail(o, "layers", "[first, stop) with first < stop", self.layers)
            object.__setattr__(self, "layers", lay)
        if self.cache_scale is not None and not _is_int(self.cache_scale):
            _fail(o, "cache_scale", "an integer scale position", self.cache_scale)

    def resolve(self, depth: int, num_scales: int, family: str = "infinity") -> tuple[list[float], range, int]:
        """Per-scale pruning ratios, the pruned layer range and the cache scale index for a model of
        ``family`` ("infinity" or "hart")."""
        o = type(self).__name__
        if family not in FASTVAR_CACHE_SCALE:
            _fail(o, "family", f"one of {sorted(FASTVAR_CACHE_SCALE)}", family)
        hart = family == "hart"
        size = self.model_size if self.model_size != "auto" else ("8b" if depth == 40 else "2b")
        table = self.ratios if self.ratios is not None else (
            FASTVAR_HART_RATIOS if hart else FASTVAR_PRESETS[self.preset][size])
        ratios = [0.0] * num_scales
        for pos, r in table.items():
            idx = pos if pos >= 0 else num_scales + pos
            if not 0 <= idx < num_scales:
                _fail(o, "ratios", f"scale positions within a {num_scales}-scale schedule", pos)
            ratios[idx] = r
        if ratios[0] >= 1.0:
            _fail(o, "ratios", "a schedule that runs at least scale 0", table)
        first, stop = self.layers if self.layers is not None else (0, depth) if hart else (
            max(1, round(3 * depth / 32)), depth - round(4 * depth / 32))
        if stop > depth:
            _fail(o, "layers", f"a range within depth {depth}", [first, stop])
        pos = self.cache_scale if self.cache_scale is not None else FASTVAR_CACHE_SCALE[family]
        cache = pos if pos >= 0 else num_scales + pos
        pruned = [i for i, r in enumerate(ratios) if 0.0 < r < 1.0]
        if pruned and not 0 <= cache < min(pruned):
            _fail(o, "cache_scale", f"a scale before the first pruned scale (index {min(pruned)})", pos)
        return ratios, range(first, stop), cache


@dataclass(frozen=True)
class SkipVARConfig(_ConfigBase):
    """SkipVAR-STYLE fixed rule (SkipVAR's per-sample decision model is not used: not public).

    uncond_drop_from: position of the first scale run without the unconditional CFG branch (that
      scale and all later ones are conditional only: CFG is not applied there); None = never.
    skip_from: position of the first scale not run (it and all later ones); None = never.
    Defaults: cond-only from 32x32 (-4) and the 64x64 scale (-1) skipped at 1024; 6x6 / 16x16 for tiny.
    """
    uncond_drop_from: int | None = -4
    skip_from: int | None = -1

    def __post_init__(self):
        o = type(self).__name__
        for name in ("uncond_drop_from", "skip_from"):
            v = getattr(self, name)
            if v is not None and not _is_int(v):
                _fail(o, name, "an integer scale position or null", v)

    def resolve(self, num_scales: int) -> tuple[int, int]:
        """(first cond-only scale, first skipped scale) as indices; num_scales means never."""
        o = type(self).__name__
        out = []
        for name in ("uncond_drop_from", "skip_from"):
            v = getattr(self, name)
            idx = num_scales if v is None else (v if v >= 0 else num_scales + v)
            if not 1 <= idx <= num_scales:
                _fail(o, name, f"a position within a {num_scales}-scale schedule, after scale 0", v)
            out.append(idx)
        return out[0], out[1]


@dataclass(frozen=True)
class ScaleExitConfig(_ConfigBase):
    """Fixed scale exit (appendix A.1.5): scales from position ``exit_from`` on are not run.

    Default -2: the last two scales (48x48 and 64x64 at 1024; 12x12 and 16x16 for the tiny model).
    """
    exit_from: int = -2

    def __post_init__(self):
        if not _is_int(self.exit_from):
            _fail(type(self).__name__, "exit_from", "an integer scale position", self.exit_from)

    def resolve(self, num_scales: int) -> int:
        idx = self.exit_from if self.exit_from >= 0 else num_scales + self.exit_from
        if not 1 <= idx <= num_scales:
            _fail(type(self).__name__, "exit_from", f"a position within a {num_scales}-scale schedule, after scale 0",
                  self.exit_from)
        return idx


__all__ = ["STAGES", "LAYER_SCORE_MODES", "FASTVAR_PRESETS", "ToProVARConfig", "FastVARConfig", "SkipVARConfig",
           "ScaleExitConfig"]
