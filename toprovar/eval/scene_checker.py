"""GenEval-style automatic checking of scenes images (``toprovar.eval.scenes``) against their prompts' specs.

``detect`` segments an image by chroma (the backgrounds are grey, the objects saturated; mixing a colour with
grey or darkening it keeps its chroma direction, so antialiased rims and dark texture shades keep their hue),
splits each colour into connected components, fits every kind's template to each (occluded parts are
don't-care), and reads the texture from the brightness pattern inside. ``score`` compares the objects with
a Spec; ``evaluate`` gives per-category accuracies, GenEval's overall score (their mean) and per-attribute
accuracies.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Sequence

import numpy as np
from scipy import ndimage

from .scenes import CATEGORIES, COLORS, DEPTHS, KINDS, PALETTE, Spec, relation_offsets, signed_distance

FG_CHROMA = 28.0   # chroma (RGB distance from the grey axis) above which a pixel belongs to an object
MIN_AREA = 150     # px: smaller components are noise
SOLID_STD = 0.05   # texture: brightness std below this is solid
TEXTURE_DEPTH = 4.5  # px: the texture is read this far inside an object (``_interior``)
DEEP_SHARE = 0.5     # ... unless that leaves less than this share of the pixels 2 px inside
RAMP_SPAN = 0.2      # a fitted shade ramp falling more than this over the object's side is a gradient (0.45 drawn)
CHECK_EXPLAINED = 0.5  # rows or columns explain less than this share of the brightness variance: checkered
RAMP_CORR = 0.9    # |correlation| of the dominant profile with position above this: gradient, else striped
MIN_OVERLAP = 20   # px: occlusion needs the two fitted templates to overlap by at least this

_PLANE = np.array([[2, -1, -1], [0, 1, -1]], np.float32) / np.array([[np.sqrt(6)], [np.sqrt(2)]], np.float32)
_PAL = np.array([PALETTE[c] for c in COLORS], np.float32) @ _PLANE.T          # (n_colours, 2)
_PAL_NORM = np.linalg.norm(_PAL, axis=1)
_PAL_DIR = _PAL / _PAL_NORM[:, None]
_SQ3, _SQ5 = np.ones((3, 3), bool), np.ones((5, 5), bool)


@dataclass(frozen=True)
class Detection:
    """One object: its colour, fitted kind (template IoU ``fit``), texture, amodal box centre (cx, cy) and side
    ``size`` in px, and visible area in px."""
    color: str
    kind: str
    texture: str
    cx: float
    cy: float
    size: float
    area: int
    fit: float

    @property
    def key(self) -> tuple[str, str, str]:
        return self.color, self.kind, self.texture


def segment(image: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(H, W, 3) uint8 -> (labels (H, W) int64: index into COLORS or -1 for background, shade (H, W) float32:
    the pixel's chroma over its colour's, ~1 for the full colour, DARK for the dark shade, less on rims)."""
    uv = image.astype(np.float32) @ _PLANE.T                            # (H, W, 2): chroma plane coordinates
    mag = np.linalg.norm(uv, axis=-1)
    k = (uv @ _PAL_DIR.T).argmax(-1)
    return np.where(mag >= FG_CHROMA, k, -1), (mag / _PAL_NORM[k]).astype(np.float32)


def _fit_kind(mask: np.ndarray, dont_care: np.ndarray) -> tuple[str, float, float, float, float]:
    """(kind, cx, cy, side, IoU) of the best template for a visible mask (h, w) bool, with ``dont_care`` pixels
    (other objects, which may hide part of it) left out of the IoU. The amodal box is a square of side
    max(visible width, height), aligned with either visible edge or centred on the axis where it is shorter."""
    ys, xs = np.nonzero(mask)
    x0, x1, y0, y1 = xs.min(), xs.max() + 1, ys.min(), ys.max() + 1
    side = float(max(x1 - x0, y1 - y0))
    opts = lambda a, b: sorted({a + side / 2, b - side / 2, (a + b) / 2})  # noqa: E731
    px = np.arange(mask.shape[1], dtype=np.float32) + 0.5
    py = np.arange(mask.shape[0], dtype=np.float32)[:, None] + 0.5
    care = ~dont_care
    m = mask & care
    best = ("circle", 0.0, 0.0, side, -1.0)
    for cx in opts(x0, x1):
        for cy in opts(y0, y1):
            for kind in KINDS:
                t = (signed_distance(kind, px - cx, py - cy, side / 2) > 0) & care
                iou = (t & m).sum() / max(1, (t | m).sum())
                if iou > best[4]:
                    best = (kind, float(cx), float(cy), side, float(iou))
    return best


def _texture(shade: np.ndarray, inner: np.ndarray, side: float) -> str:
    """solid / checkered / gradient / striped from the shade (h, w) over the interior mask ``inner`` of an
    object of fitted ``side`` (px)."""
    v = shade[inner]
    if v.size < 30:
        return "solid"
    if v.std() < SOLID_STD:
        # little variation, but a part of a gradient (an occluded object) still falls by 1 - DARK per side
        ys, xs = np.nonzero(inner)
        a = np.stack([xs, ys, np.ones_like(xs)], 1).astype(np.float64)
        gx, gy, _ = np.linalg.lstsq(a, v.astype(np.float64), rcond=None)[0]
        return "gradient" if np.hypot(gx, gy) * side > RAMP_SPAN else "solid"
    total = ((v - v.mean()) ** 2).sum()
    cnt_r, cnt_c = inner.sum(1), inner.sum(0)
    s = np.where(inner, shade, 0)
    rows = np.divide(s.sum(1), cnt_r, out=np.zeros(len(cnt_r)), where=cnt_r > 0)
    cols = np.divide(s.sum(0), cnt_c, out=np.zeros(len(cnt_c)), where=cnt_c > 0)
    ex_r = (cnt_r * (rows - v.mean()) ** 2).sum() / total
    ex_c = (cnt_c * (cols - v.mean()) ** 2).sum() / total
    if max(ex_r, ex_c) < CHECK_EXPLAINED:
        return "checkered"
    prof, cnt = (rows, cnt_r) if ex_r >= ex_c else (cols, cnt_c)
    pos = np.nonzero(cnt > 0)[0].astype(np.float64)
    p = prof[cnt > 0]
    corr = np.corrcoef(pos, p)[0, 1] if p.std() > 0 and len(p) > 2 else 0.0
    return "gradient" if abs(corr) > RAMP_CORR else "striped"


def _interior(mask: np.ndarray, others: np.ndarray) -> np.ndarray:
    """Where the texture is read: pixels of ``mask`` more than TEXTURE_DEPTH px inside it and TEXTURE_DEPTH + 2 px
    from pixels of other colours ``others`` (both (h, w) bool). A softened edge (a tokenizer's reconstruction,
    blur of sigma 2 px) dims the chroma a few px inside the object, and a 2 px interior read that rim as a
    texture (``bench/results/checker_sharpness.md``)."""
    return ((ndimage.distance_transform_edt(mask) > TEXTURE_DEPTH)
            & (ndimage.distance_transform_edt(~others) > TEXTURE_DEPTH + 2))


def detect(image: np.ndarray) -> list[Detection]:
    """Objects of an (H, W, 3) uint8 RGB image: per colour of ``segment`` the mask is opened with a 3x3
    square, split into 8-connected components of >= MIN_AREA px (scaled with the image area from 256x256);
    each gets the best template (``_fit_kind``; pixels of other colours, grown by 2 px, are don't-care) and
    the texture of its interior (``_interior``)."""
    labels, shade = segment(image)
    H, W = labels.shape
    min_area = MIN_AREA * H * W / 256 ** 2
    fg = labels >= 0
    found = []
    for ci in np.unique(labels[fg]):
        comp, _ = ndimage.label(ndimage.binary_opening(labels == ci, _SQ3), _SQ3)
        for j, sl in enumerate(ndimage.find_objects(comp), start=1):
            if sl is None:
                continue
            h, w = sl[0].stop - sl[0].start, sl[1].stop - sl[1].start
            g = max(h, w) - min(h, w) + 4  # room for the amodal box
            y0, y1 = max(0, sl[0].start - g), min(H, sl[0].stop + g)
            x0, x1 = max(0, sl[1].start - g), min(W, sl[1].stop + g)
            opened = comp[y0:y1, x0:x1] == j
            area = int(opened.sum())
            if area < min_area:
                continue
            # the opening cut thin tips (diamond and triangle corners): give back this colour's pixels next to it
            mask = opened | (ndimage.binary_dilation(opened, _SQ3) & (labels[y0:y1, x0:x1] == ci))
            other = ndimage.binary_dilation(fg[y0:y1, x0:x1] & (labels[y0:y1, x0:x1] != ci), _SQ5)
            kind, cx, cy, side, iou = _fit_kind(mask, other & ~mask)
            inner = ndimage.binary_erosion(mask, _SQ5) & ~other  # 2 px inside
            deep = _interior(mask, fg[y0:y1, x0:x1] & (labels[y0:y1, x0:x1] != ci))
            if deep.sum() >= max(30, DEEP_SHARE * inner.sum()):  # else a small or mostly hidden object
                inner = deep
            # 3x3 mean of the shade over the interior: pixel noise averages out, 8 px bands and 12 px cells stay
            w = ndimage.uniform_filter(inner.astype(np.float32), 3)
            sm = ndimage.uniform_filter(np.where(inner, shade[y0:y1, x0:x1], 0), 3) / np.maximum(w, 1e-6)
            found.append(Detection(COLORS[ci], kind, _texture(sm, inner, side), x0 + cx, y0 + cy, side, area, iou))
    return found


def _front(a: Detection, b: Detection, labels: np.ndarray) -> Detection | None:
    """Which of two overlapping detections is on top: the one whose colour holds most of the pixels where
    their fitted templates overlap; None when they overlap by less than MIN_OVERLAP px."""
    H, W = labels.shape
    x = np.arange(W, dtype=np.float32)[None] + 0.5
    y = np.arange(H, dtype=np.float32)[:, None] + 0.5
    ta = signed_distance(a.kind, x - a.cx, y - a.cy, a.size / 2) > 0
    tb = signed_distance(b.kind, x - b.cx, y - b.cy, b.size / 2) > 0
    ov = ta & tb
    if ov.sum() < MIN_OVERLAP:
        return None
    na, nb = (int((labels[ov] == COLORS.index(d.color)).sum()) for d in (a, b))
    return a if na >= nb else b


def score(image: np.ndarray, spec: Spec) -> dict:
    """Check an (H, W, 3) uint8 image against ``spec``: a dict of bools
    objects   the detected multiset of (colour, kind, texture) equals the prompt's exactly (no extra objects)
    count     as many objects as asked for
    color / kind / texture   the multiset of that attribute matches
    relation  position / occlusion only (None otherwise): exactly one object of each group's colour and
              kind; position: with d the displacement of group 1's centre from group 0's along the relation's
              axis, d > 0 and |d| >= |other|; occlusion: the templates overlap and the named one is on top
    correct   objects and (where asked) relation."""
    dets = detect(image)
    want = spec.items
    out = {
        "objects": Counter(d.key for d in dets) == Counter(want),
        "count": len(dets) == len(want),
        "color": Counter(d.color for d in dets) == Counter(c for c, _, _ in want),
        "kind": Counter(d.kind for d in dets) == Counter(k for _, k, _ in want),
        "texture": Counter(d.texture for d in dets) == Counter(t for _, _, t in want),
        "relation": None,
    }
    if spec.relation is not None:
        a, b = ([d for d in dets if (d.color, d.kind) == (g.color, g.kind)] for g in spec.groups)
        ok = False
        if len(a) == len(b) == 1:
            a, b = a[0], b[0]
            if spec.relation in DEPTHS:
                top = _front(a, b, segment(image)[0])
                ok = top is not None and (top is a) == (spec.relation == "in front of")
            else:
                along, across = relation_offsets(spec.relation, (a.cx, a.cy), (b.cx, b.cy))
                ok = along > 0 and along >= abs(across)
        out["relation"] = bool(ok)
    out["correct"] = out["objects"] and out["relation"] is not False
    return out


ATTRIBUTES = ("count", "color", "kind", "texture", "relation")


def evaluate(images: Sequence[np.ndarray], specs: Sequence[Spec]) -> dict:
    """Score images ((H, W, 3) uint8 each, or one (N, H, W, 3) array) against their specs:
    {"per_category": {cat: accuracy}, "overall": mean of the per-category accuracies, "n": {cat: count},
     "per_attribute": {attr: share of images whose attribute check passed (relation: where asked)},
     "correct": [bool per image]}; categories without images are left out."""
    if len(images) != len(specs):
        raise ValueError(f"{len(images)} images but {len(specs)} specs")
    scores = [score(im, sp) for im, sp in zip(images, specs)]
    correct = [s["correct"] for s in scores]
    counts = Counter(sp.category for sp in specs)
    n = {c: counts[c] for c in CATEGORIES if counts[c]}
    per = {c: sum(ok for ok, sp in zip(correct, specs) if sp.category == c) / k for c, k in n.items()}
    attr = {}
    for a in ATTRIBUTES:
        vals = [s[a] for s in scores if s[a] is not None]
        if vals:
            attr[a] = sum(vals) / len(vals)
    return {"per_category": per, "overall": float(np.mean(list(per.values()))) if per else float("nan"),
            "n": n, "per_attribute": attr, "correct": correct}


def chance_accuracy(images: Sequence[np.ndarray], specs: Sequence[Spec], seed: int = 0) -> dict:
    """``evaluate`` against a random derangement of the specs (``checker.chance_accuracy``)."""
    from .checker import chance_accuracy as deranged
    return deranged(images, specs, seed, evaluate)
