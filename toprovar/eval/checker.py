"""GenEval-style automatic checking of shapes images against their prompts' specs.

``detect`` finds the objects of an image by colour segmentation and connected components; ``score``
compares them with a Spec (objects, count, colours, kinds, relation); ``evaluate`` gives per-category
accuracies and GenEval's overall score (the mean of the per-category accuracies).
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Sequence

import numpy as np
from scipy import ndimage

from .shapes import BACKGROUND, CATEGORIES, COLORS, PALETTE, Spec, relation_offsets

LINE_THRESHOLD = 60.0  # RGB distance: pixels farther than this from every colour's mixing line are background
MIN_AREA = 20          # px at 64x64 (scaled with the image area): smaller components are noise and dropped
TAPER_SPLIT = 0.75     # taper below this: triangle (ideal 1/3; circles and squares 1); see _describe
FILL_SPLIT = 0.875     # otherwise fill above this: square (ideal 1), else circle (ideal pi/4)

_SQUARE3, _SQUARE5 = np.ones((3, 3), bool), np.ones((5, 5), bool)
_BG = np.array(BACKGROUND, np.float32)
_DIRS = np.array([PALETTE[c] for c in COLORS], np.float32) - _BG  # (5, 3): background -> colour


@dataclass(frozen=True)
class Detection:
    """One detected object (see ``detect``): (cx, cy) the centre of its soft bounding box in px (pixel
    column c covers [c, c + 1)), area in px and bbox = (x0, y0, x1, y1) (exclusive ends) of its pixel mask."""
    kind: str
    color: str
    cx: float
    cy: float
    area: int
    bbox: tuple[int, int, int, int]


def segment(image: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(H, W, 3) uint8 -> (labels (H, W) int64: index into COLORS or -1 for background,
    mix (H, W, len(COLORS)) float32: each pixel's mix fraction a in [0, 1] along each colour's line).

    A pixel is read as a mix ``bg + a (colour - bg)`` of the background and one palette colour (what
    antialiasing and blur produce): it takes the colour whose mixing line (a in [0, 1]) is nearest, when it
    is nearer that colour than the background (a >= 1/2) and within LINE_THRESHOLD of the line; otherwise it
    is background. Plain nearest-colour assignment would label the antialiased rims of red shapes yellow and
    of blue shapes purple."""
    p = image.astype(np.float32) - _BG                                  # (H, W, 3)
    t = p @ _DIRS.T                                                     # (H, W, 5)
    norm2 = (_DIRS * _DIRS).sum(1)
    mix = np.clip(t / norm2, 0, 1)
    dist2 = (p * p).sum(-1, keepdims=True) - 2 * mix * t + mix * mix * norm2
    k = dist2.argmin(-1)
    a, d2 = (np.take_along_axis(x, k[..., None], -1)[..., 0] for x in (mix, dist2))
    return np.where((a >= 0.5) & (d2 <= LINE_THRESHOLD ** 2), k, -1), mix


def _describe(cover: np.ndarray) -> tuple[float, float, float, float]:
    """(fill, taper, cx, cy) of one object from its (h, w) coverage in [0, 1] over its bounding box grown by
    2 px (0 outside the grown component). (cx, cy) = centre of the soft box: of the column- and row-maximum
    profiles, in px from the array's corner. For the shape the coverage is 3x3 median-filtered first (pixel
    noise would inflate the maxima); with the soft extents W = sum over columns of the column maximum and H
    likewise over rows: fill = sum(cover) / (W H) (square 1, circle pi/4, triangle 1/2; a partly covered rim
    pixel counts by its coverage, so it neither inflates the box nor drops out); taper = coverage above the
    row y = cy / that below it (triangle 1/3, square and circle 1)."""
    cols, rows = cover.max(0), cover.max(1)
    x, y = np.arange(len(cols)) + 0.5, np.arange(len(rows)) + 0.5
    cx, cy = (x * cols).sum() / cols.sum(), (y * rows).sum() / rows.sum()
    cover = ndimage.median_filter(cover, 3, mode="constant")
    cols, rows = cover.max(0), cover.max(1)
    above = np.interp(cy, np.arange(len(rows) + 1), np.r_[0, cover.sum(1).cumsum()])  # rows cut at cy
    taper = above / max(cover.sum() - above, 1e-6)
    area = cols.sum() * rows.sum()  # 0 when the median filter erased a thin component: fill 0, not 0/0
    return float(cover.sum() / area) if area > 0 else 0.0, float(taper), float(cx), float(cy)


def _kind(fill: float, taper: float) -> str:
    """Triangles narrow upwards (taper ~1/3); of the untapered shapes squares fill their box, circles pi/4."""
    if taper < TAPER_SPLIT:
        return "triangle"
    return "square" if fill > FILL_SPLIT else "circle"


def detect(image: np.ndarray) -> list[Detection]:
    """Objects of an (H, W, 3) uint8 RGB image. Per colour of ``segment``: the pixel mask is opened with a
    3x3 square (drops 1-px noise spurs and specks), split into 8-connected components, and components of at
    least MIN_AREA * H * W / 64^2 px are kept. A component's coverage is its mix fraction rescaled so that
    the image's background (median over background pixels) reads 0 and the component's interior (median over
    its pixels) reads 1, which cancels global colour and contrast shifts; ``_describe`` turns it into the
    descriptors of the kind and the centre."""
    labels, mix = segment(image)
    min_area = MIN_AREA * labels.size / 64 ** 2
    floor = np.median(mix[labels < 0], axis=0) if (labels < 0).any() else np.zeros(len(COLORS), np.float32)
    found = []
    for ci in np.unique(labels[labels >= 0]):
        comp, _ = ndimage.label(ndimage.binary_opening(labels == ci, _SQUARE3), _SQUARE3)
        for j, sl in enumerate(ndimage.find_objects(comp), start=1):
            mask = comp[sl] == j
            area = int(mask.sum())
            if area < min_area:
                continue
            level = np.median(mix[sl][mask, ci])
            y0, x0 = max(sl[0].start - 2, 0), max(sl[1].start - 2, 0)
            grown = ndimage.binary_dilation(comp[y0:sl[0].stop + 2, x0:sl[1].stop + 2] == j, _SQUARE5)
            cover = np.where(grown, (mix[y0:y0 + grown.shape[0], x0:x0 + grown.shape[1], ci] - floor[ci])
                             / max(level - floor[ci], 1e-3), 0).clip(0, 1)
            fill, taper, cx, cy = _describe(cover)
            bbox = (sl[1].start, sl[0].start, sl[1].stop, sl[0].stop)
            found.append(Detection(_kind(fill, taper), COLORS[ci], x0 + cx, y0 + cy, area, bbox))
    return found


def score(image: np.ndarray, spec: Spec) -> dict:
    """Check an (H, W, 3) uint8 image against ``spec``: a dict of bools
    objects   the detected multiset of (colour, kind) equals the prompt's exactly (no extra objects)
    count     as many objects as asked for
    color     the multiset of colours matches
    kind      the multiset of kinds matches
    relation  position only (None otherwise): exactly one object of each group, and with d the displacement
              of the group-1 centre from the group-0 one along the relation's axis, d > 0 and |d| >= |other|
    correct   objects and (for position) relation."""
    dets = detect(image)
    want = Counter({(g.color, g.kind): g.count for g in spec.groups})
    out = {
        "objects": Counter((d.color, d.kind) for d in dets) == want,
        "count": len(dets) == sum(want.values()),
        "color": Counter(d.color for d in dets) == Counter(c for c, _ in want.elements()),
        "kind": Counter(d.kind for d in dets) == Counter(k for _, k in want.elements()),
        "relation": None,
    }
    if spec.relation is not None:
        a, b = ([d for d in dets if (d.color, d.kind) == (g.color, g.kind)] for g in spec.groups)
        if len(a) == len(b) == 1:
            along, across = relation_offsets(spec.relation, (a[0].cx, a[0].cy), (b[0].cx, b[0].cy))
            out["relation"] = along > 0 and along >= abs(across)
        else:
            out["relation"] = False
    out["correct"] = out["objects"] and out["relation"] is not False
    return out


def evaluate(images: Sequence[np.ndarray], specs: Sequence[Spec]) -> dict:
    """Score images ((H, W, 3) uint8 each, or one (N, H, W, 3) array) against their specs:
    {"per_category": {cat: accuracy}, "overall": mean of the per-category accuracies,
     "n": {cat: count}, "correct": [bool per image]}; categories without images are left out."""
    if len(images) != len(specs):
        raise ValueError(f"{len(images)} images but {len(specs)} specs")
    correct = [score(im, sp)["correct"] for im, sp in zip(images, specs)]
    counts = Counter(sp.category for sp in specs)
    n = {c: counts[c] for c in CATEGORIES if counts[c]}
    per = {c: sum(ok for ok, sp in zip(correct, specs) if sp.category == c) / k for c, k in n.items()}
    return {"per_category": per, "overall": float(np.mean(list(per.values()))) if per else float("nan"),
            "n": n, "correct": correct}


def chance_accuracy(images: Sequence[np.ndarray], specs: Sequence, seed: int = 0, evaluate_fn=None) -> dict:
    """``evaluate_fn`` (default: this module's ``evaluate``) of image i against spec perm[i], perm a random
    derangement (no fixed point) drawn from ``seed``: the score of a model that ignores its prompt. Needs at
    least 2 images."""
    if len(specs) < 2:
        raise ValueError("a derangement needs at least 2 specs")
    rng = np.random.default_rng(seed)
    perm = rng.permutation(len(specs))
    while (perm == np.arange(len(specs))).any():
        perm = rng.permutation(len(specs))
    return (evaluate_fn or evaluate)(images, [specs[j] for j in perm])
