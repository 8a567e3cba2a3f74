"""The ToProVAR tri-dimensional policy (paper section 4) and its ablation stages (appendix A.1.5).

Causal sources of every statistic (nothing is used before the orchestrator has computed it):

* token entropy H_i: the head-mean self-attention entropy (FAE, ``wants_entropy``) that a block
  returned for the CONDITIONAL half of the CFG batch (the orchestrator passes rows [:B]), per prompt.
* batches: every prompt keeps ITS OWN tokens (its own entropy ranking), applied to both of its CFG rows;
  the kept COUNT is common to the batch (KV caches stay rectangular): the largest of the prompts' own
  counts. At a pinned operating point (``keep_fraction``, fixed D, static scores) the count does not depend
  on entropy, so a prompt's image is the one it gets alone; adaptively, a prompt may keep more tokens than
  alone (D: the latest prompt's; a layer is skipped only when every prompt would skip it).
* rho_s: fraction of tokens of scale s below the scale's mean entropy, from the entropy of the
  ``rho_layers`` (they always run on all tokens; averaged when several) at scale s, known as soon as
  the last of them has run at scale s.
* D: the first scale whose rho_s >= tau; set during scale D, so pruning starts with the first layer
  after the rho layers at scale D; never set (no pruning at all) when rho never reaches tau.
* R_l: exp(-beta (sigma1/sigma2 - 1)) of layer l's h x w entropy map at the representative scale.
  Online: this prompt's map, known once layer l has run (in full) at that scale, so layer l is not
  pruned at or before the representative scale. Static: calibrated values, known from the start.
* decision input of layer l at scale s: the most recent entropy of each token: what layer l-1 (or
  the last layer that ran and reported before it) returned at scale s for the tokens it ran; tokens it
  did not run keep their older value; at the start of a scale the previous scale's values are
  upsampled (bilinear) to the new grid. Pruned tokens pass through the layer unchanged.

Stages: "scale" (run scales up to and including D, skip the rest), "scale-layer" (from D on, skip
Detail layers R_l >= detail_threshold, run Global ones in full), "scale-token" (from D on, token
pruning on all prunable layers with R_l = 1), "full" (token pruning with R_l; a layer whose kept
count is at the minimum is skipped when ``layer_skip``).
"""
from __future__ import annotations

from pathlib import Path

import torch

from .base import GenerationInfo, Policy, read_calibration
from .config import ToProVARConfig
from .stats import layer_score, low_entropy_ratio, min_kept, principal_ratio, scale_factor, upsample_entropy
from .token import TokenKeepPiece, ascending_first, select_kept


class ToProVARPolicy(Policy):
    """ToProVAR (stage from ``config.stage``; the registry's subclasses fix it)."""

    name = "toprovar"
    stage = "full"

    def __init__(self, config: ToProVARConfig | None = None, calibration: dict | None = None):
        self.config = config if config is not None else ToProVARConfig(stage=self.stage)
        self.calibration = calibration or {}
        c = self.config
        self.piece = TokenKeepPiece(c.a_min, c.a_max, c.k_min, c.bucket)

    @classmethod
    def from_calibration(cls, path: str | Path) -> "ToProVARPolicy":
        """Parameters from a calibration JSON's ``policy`` object (stage from the class)."""
        data = read_calibration(path)
        params = dict(data["policy"])
        params["stage"] = cls.stage
        try:
            cfg = ToProVARConfig.from_dict(params)
        except ValueError as exc:
            raise ValueError(f"--calibration: {path}: {exc}") from None
        meta = {k: data.get(k) for k in ("model", "depth", "schedule")}
        meta["path"] = str(path)
        return cls(cfg, meta)

    def params(self) -> dict:
        return {"name": self.name, **self.config.to_dict(),
                **({"calibration": self.calibration} if self.calibration else {})}

    def plan_key(self) -> str | None:
        """Static (graphable) when nothing is read back: D fixed, kept counts from ``keep_fraction`` (token
        stages), layer scores static (layer stages)."""
        c = self.config
        reads = (c.fixed_depth is None
                 or (c.stage in ("scale-token", "full") and c.keep_fraction is None)
                 or (c.stage in ("scale-layer", "full") and c.layer_score_mode == "online"))
        return None if reads else self.params_key()

    # ------------------------------------------------------------------ lifecycle
    def start(self, info: GenerationInfo) -> None:
        super().start(info)
        c = self.config
        S = len(info.schedule)
        cal_depth = self.calibration.get("depth")
        if cal_depth is not None and cal_depth != info.depth:
            raise ValueError(f"--calibration: {self.calibration.get('path')}: made for a {cal_depth}-layer model "
                             f"({self.calibration.get('model')}), this model has {info.depth} layers")
        c.check_model(info.depth, S)
        self.S, self.depth, self.schedule = S, info.depth, [tuple(s) for s in info.schedule]
        self.rep = c.rep_index(S)
        self.piece = self.piece.to(info.device)
        self._select = _compiled(select_kept) if info.compile else select_kept
        self._merge = _compiled(merge_kept_entropy) if info.compile else merge_kept_entropy
        self.full = frozenset(c.full_layers)
        self.rho_set, self.last_rho = frozenset(c.rho_layers), max(c.rho_layers)
        self.needs_R = c.stage in ("scale-layer", "full")
        self.online = c.layer_score_mode == "online"
        self.D: int | None = c.fixed_depth
        self.B = info.batch
        # rho, mean entropy, R, ratio: one float per scale / layer (a list of one per prompt for B > 1)
        self.rho: dict[int, float | list[float]] = {}
        self.mean_entropy: dict[int, float | list[float]] = {}
        self.R: list = list(c.layer_scores) if not self.online else [None] * info.depth
        self.ratio: list = [None] * info.depth
        self._reached = [False] * info.batch  # per prompt: rho >= tau at some scale so far
        self.ent: torch.Tensor | None = None  # (B, n) most recent entropy per prompt and token of the current scale
        self._si = -1
        self._rho_buf: list[torch.Tensor] = []

    def _scale(self, si: int) -> None:
        """Enter scale ``si``: carry the previous scale's entropy over, upsampled to this grid."""
        if si == self._si:
            return
        prev = self.schedule[self._si] if self._si >= 0 else None
        # (HART's scale 0 runs its context tokens, not a grid: nothing to carry over)
        if self.ent is not None and si == self._si + 1 and prev and self.ent.numel() == prev[0] * prev[1]:
            self.ent = upsample_entropy(self.ent, self.schedule[self._si], self.schedule[si])
        else:
            self.ent = None
        self._si, self._rho_buf = si, []

    # ------------------------------------------------------------------ decisions
    def _token_active(self, si: int) -> bool:
        if self.config.stage not in ("scale-token", "full") or self.D is None or si < self.D:
            return False
        return self.config.stage == "scale-token" or any(r is not None for r in self.R)

    def _prunable(self, si: int, layer: int) -> bool:
        if layer in self.full or self.D is None or si < self.D or self.config.stage == "scale":
            return False
        return not (self.needs_R and self.R[layer] is None)

    @property
    def restore_pruned(self) -> bool:
        return self.config.restore

    def run_scale(self, si: int) -> bool:
        return not (self.config.stage == "scale" and self.D is not None and si > self.D)

    def wants_entropy(self, si: int, layer: int) -> bool:
        self._scale(si)
        if self.D is None and layer in self.rho_set:
            return True
        if self.needs_R and self.online and si == self.rep:
            return True
        return self._token_active(si) and layer < self.depth - 1

    def keep(self, si: int, layer: int, n: int) -> torch.Tensor | None:
        self._scale(si)
        if not self._prunable(si, layer):
            return None
        c = self.config
        if c.stage == "scale-layer":  # skipped when every prompt would skip it
            return self._empty() if min(self._scores(layer)) >= c.detail_threshold else None
        if self.ent is None or self.ent.shape[-1] != n:
            return None
        rs = [1.0] * self.B if c.stage == "scale-token" else self._scores(layer)
        # a fill kernel, not torch.tensor(..., device=): a pageable host-to-device copy would sync the stream
        phi_r = [torch.full((1,), scale_factor(si, self.S) * r, dtype=torch.float32, device=self.ent.device)
                 for r in rs]
        floor = min_kept(n, c.k_min, c.bucket)
        orders = None
        if c.keep_fraction is None:
            outs = [self.piece(e, p) for e, p in zip(self.ent, phi_r)]
            orders = [o[2] for o in outs]
            ks = outs[0][1] if self.B == 1 else torch.stack([o[1] for o in outs]).max()
            k = int(ks.item())  # the one device read of a pruned layer: the batch's largest count
        else:  # pinned operating point: the count is known on the host
            k = max(min(n, max(floor, -(-round(n * (1.0 - r * (1.0 - c.keep_fraction))) // c.bucket) * c.bucket))
                    for r in rs)
        if c.stage == "full" and c.layer_skip and k <= floor < n:
            return self._empty()
        if k >= n:
            return None
        if orders is None:
            rows = [self._select(self.piece, e, p, k) for e, p in zip(self.ent, phi_r)]
        else:
            rows = [ascending_first(o, k) for o in orders]
        return rows[0] if self.B == 1 else torch.stack(rows)  # (k,) or per prompt (B, k)

    def _scores(self, layer: int) -> list[float]:
        """R_l per prompt (static scores: the same for every prompt)."""
        r = self.R[layer]
        return list(r) if isinstance(r, list) else [r] * self.B

    def _empty(self) -> torch.Tensor:
        return torch.empty(0, dtype=torch.int64, device=self.info.device)

    def observe(self, si: int, layer: int, entropy: torch.Tensor, kept: torch.Tensor | None) -> None:
        self._scale(si)
        if kept is not None:
            if self.ent is not None:
                self.ent = self._merge(self.ent, kept.to(self.ent.device), entropy)
            return
        e = entropy.float()  # (B, n): the conditional rows, one per prompt
        self.ent = e
        one = (lambda v: v[0]) if self.B == 1 else (lambda v: v)  # noqa: E731  (report: a float for one prompt)
        if self.D is None and layer in self.rho_set:
            self._rho_buf.append(e)
            if layer == self.last_rho:
                h = torch.stack(self._rho_buf).mean(dim=0)
                rho = low_entropy_ratio(h).tolist()
                self.rho[si], self.mean_entropy[si] = one(rho), one(h.mean(dim=-1).tolist())
                self._reached = [r or v >= self.config.tau for r, v in zip(self._reached, rho)]
                if all(self._reached):  # the batch prunes from the scale its latest prompt reaches D at
                    self.D = si
        if self.needs_R and self.online and si == self.rep and self.R[layer] is None:
            hh, ww = self.schedule[si]
            ratio = [principal_ratio(row.reshape(hh, ww), self.config.svd_center) for row in e]
            self.ratio[layer], self.R[layer] = one(ratio), one([layer_score(v, self.config.beta) for v in ratio])

    def report(self) -> dict:
        """What this generation decided: D, rho/mean entropy per scale, R per layer."""
        return {"stage": self.config.stage, "D": self.D, "rep_scale": self.rep,
                "rho": dict(self.rho), "mean_entropy": dict(self.mean_entropy),
                "layer_scores": list(self.R), "layer_ratio": list(self.ratio)}


def merge_kept_entropy(ent: torch.Tensor, kept: torch.Tensor, entropy: torch.Tensor) -> torch.Tensor:
    """ent (B, n) float32 per-prompt, per-token entropy, kept (k,) or per prompt (B, k) int64, entropy (B, k)
    of the kept tokens -> ent with the kept tokens' entries replaced by their entropy (a new tensor)."""
    return ent.scatter(1, kept.expand(ent.shape[0], -1), entropy.float())


_COMPILED: dict = {}


def _compiled(fn):
    """A per-layer policy function through torch.compile (one compilation each, dynamic token counts):
    ``select_kept`` (the keep rule's ~25 elementwise and reduction kernels fuse into a few) or
    ``merge_kept_entropy`` (mean, copy and index_copy in one kernel)."""
    if fn not in _COMPILED:
        _COMPILED[fn] = torch.compile(fn, dynamic=True, fullgraph=True)
    return _COMPILED[fn]


class ToProVARScale(ToProVARPolicy):
    """Ablation: scale depth only (scales after D are not run)."""
    name, stage = "toprovar-scale", "scale"


class ToProVARScaleLayer(ToProVARPolicy):
    """Ablation: scale depth + layer skipping of Detail layers."""
    name, stage = "toprovar-scale-layer", "scale-layer"


class ToProVARScaleToken(ToProVARPolicy):
    """Ablation: scale depth + token pruning on every prunable layer (no layer scores)."""
    name, stage = "toprovar-scale-token", "scale-token"


__all__ = ["ToProVARPolicy", "ToProVARScale", "ToProVARScaleLayer", "ToProVARScaleToken"]
