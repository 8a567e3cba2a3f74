"""The procedural shapes text-to-image dataset: coloured circles, squares and triangles on a light background.

Prompts follow a small grammar, one form per category:
    single      "a red circle"
    counting    "three blue squares"                 (2..4 objects of one colour and kind)
    two_object  "a red circle and a green triangle"  (the two differ in colour, kind or both)
    position    "a red circle left of a blue square" (relations: left of, right of, above, below)

Everything is deterministic from a seed: scene i of ``make_dataset(n, seed)`` depends only on (seed, i).
Coordinates are in pixels, x to the right, y down; pixel (row r, column c) covers [c, c+1) x [r, r+1).
"""
from __future__ import annotations

import functools
import math
import re
from dataclasses import dataclass

import numpy as np

PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220), "yellow": (235, 195, 35),
    "purple": (150, 60, 190),
}
BACKGROUND = (245, 245, 245)
COLORS = tuple(PALETTE)
KINDS = ("circle", "square", "triangle")
CATEGORIES = ("single", "counting", "two_object", "position")
RELATIONS = ("left of", "right of", "above", "below")
NUMBER_WORDS = {1: "a", 2: "two", 3: "three", 4: "four"}

SUPERSAMPLE = 4        # render at 4x per side, then box-downsample
SIZE_RANGE = (14, 20)  # object bounding-box side at 64 px, inclusive; scaled with size / 64
MARGIN = 2             # px from the canvas border, at 64 px
GAP = 4                # px between any two bounding boxes, at 64 px
REL_MIN = 12           # position scenes: px along the relation's axis, at 64 px
REL_LEAD = 2           # position scenes: px by which that axis beats the other, at 64 px
_PLACE_TRIES = 64      # candidate positions per object, drawn at once; if none fits, the whole placement is redrawn


@dataclass(frozen=True)
class Group:
    """``count`` objects of one colour and kind."""
    count: int
    color: str
    kind: str


@dataclass(frozen=True)
class Spec:
    """What a prompt asks for. For position prompts: groups[0] RELATION groups[1]."""
    category: str
    groups: tuple[Group, ...]
    relation: str | None = None

    def __post_init__(self):
        g = self.groups
        if self.category not in CATEGORIES:
            raise ValueError(f"unknown category {self.category!r}")
        for x in g:
            if x.color not in PALETTE or x.kind not in KINDS or x.count not in NUMBER_WORDS:
                raise ValueError(f"bad group {x}")
        one = self.category in ("single", "counting")
        if len(g) != (1 if one else 2):
            raise ValueError(f"{self.category} needs {1 if one else 2} group(s), got {len(g)}")
        if self.category == "single" and g[0].count != 1 or self.category == "counting" and g[0].count < 2:
            raise ValueError(f"{self.category} cannot have count {g[0].count}")
        if not one and (g[0].count != 1 or g[1].count != 1 or g[0] == g[1]):
            raise ValueError(f"{self.category} needs two single objects differing in colour or kind")
        if (self.relation is not None) != (self.category == "position") or \
                self.relation is not None and self.relation not in RELATIONS:
            raise ValueError(f"relation {self.relation!r} does not fit category {self.category}")


@dataclass(frozen=True)
class Placed:
    """One drawn object: bounding box centre (cx, cy) in px and side ``size`` in px."""
    kind: str
    color: str
    cx: float
    cy: float
    size: int


@dataclass(frozen=True)
class Scene:
    spec: Spec
    prompt: str
    objects: tuple[Placed, ...]


def _phrase(g: Group) -> str:
    return f"{NUMBER_WORDS[g.count]} {g.color} {g.kind}{'s' if g.count > 1 else ''}"


def prompt_of(spec: Spec) -> str:
    """The prompt text of ``spec`` (inverse of ``parse_prompt``)."""
    if len(spec.groups) == 1:
        return _phrase(spec.groups[0])
    link = "and" if spec.category == "two_object" else spec.relation
    return f"{_phrase(spec.groups[0])} {link} {_phrase(spec.groups[1])}"


_WORD_COUNTS = {w: n for n, w in NUMBER_WORDS.items()}
_OBJ = rf"({'|'.join(_WORD_COUNTS)}) ({'|'.join(COLORS)}) ({'|'.join(KINDS)})(s?)"
_GRAMMAR = re.compile(rf"{_OBJ}(?: (and|{'|'.join(RELATIONS)}) {_OBJ})?")


def parse_prompt(prompt: str) -> Spec:
    """The Spec of a prompt of the grammar; ValueError naming the prompt for any other text."""
    m = _GRAMMAR.fullmatch(prompt)
    try:
        if m is None:
            raise ValueError("no match")
        w1, c1, k1, s1, link, w2, c2, k2, s2 = m.groups()
        groups = [(w1, c1, k1, s1)] + ([(w2, c2, k2, s2)] if link else [])
        if any((w == "a") == (s == "s") for w, _, _, s in groups):
            raise ValueError("'a' takes the singular, number words the plural")
        groups = tuple(Group(_WORD_COUNTS[w], c, k) for w, c, k, _ in groups)
        if link is None:
            return Spec("single" if groups[0].count == 1 else "counting", groups)
        return Spec("two_object", groups) if link == "and" else Spec("position", groups, link)
    except ValueError as e:
        raise ValueError(f"prompt {prompt!r} is outside the shapes grammar ({e})") from None


def relation_offsets(relation: str, a: tuple[float, float], b: tuple[float, float]) -> tuple[float, float]:
    """(along, across) for "A RELATION B" with centres a = (x, y), b = (x, y): ``along`` is the signed
    displacement on the relation's axis (positive when the relation holds), ``across`` the other axis's."""
    dx, dy = b[0] - a[0], b[1] - a[1]
    return {"left of": (dx, dy), "right of": (-dx, dy), "above": (dy, dx), "below": (-dy, dx)}[relation]


def sample_spec(rng: np.random.Generator) -> Spec:
    """A uniformly random category, colours, kinds, count (2..4) and relation."""
    cat = CATEGORIES[rng.integers(len(CATEGORIES))]
    if cat in ("single", "counting"):
        n = 1 if cat == "single" else int(rng.integers(2, 5))
        return Spec(cat, (Group(n, COLORS[rng.integers(len(COLORS))], KINDS[rng.integers(len(KINDS))]),))
    pair = rng.choice(len(COLORS) * len(KINDS), 2, replace=False)
    groups = tuple(Group(1, COLORS[i // len(KINDS)], KINDS[i % len(KINDS)]) for i in pair)
    return Spec(cat, groups, RELATIONS[rng.integers(len(RELATIONS))] if cat == "position" else None)


def _place(rng: np.random.Generator, spec: Spec, size: int) -> tuple[Placed, ...]:
    k = size / 64
    lo, hi = round(SIZE_RANGE[0] * k), round(SIZE_RANGE[1] * k)
    items = [(g.kind, g.color) for g in spec.groups for _ in range(g.count)]
    while True:  # redraw sizes and positions until every object found a place
        sides = rng.integers(lo, hi + 1, len(items))
        placed: list[Placed] = []
        for (kind, color), s in zip(items, sides):
            cx, cy = rng.uniform(MARGIN * k + s / 2, size - MARGIN * k - s / 2, (2, _PLACE_TRIES))
            ok = np.ones(_PLACE_TRIES, bool)
            for p in placed:
                ok &= np.maximum(abs(cx - p.cx), abs(cy - p.cy)) - (s + p.size) / 2 >= GAP * k
            if placed and spec.relation:
                along, across = relation_offsets(spec.relation, (placed[0].cx, placed[0].cy), (cx, cy))
                ok &= (along >= REL_MIN * k) & (along >= abs(across) + REL_LEAD * k)
            if not ok.any():
                break
            j = ok.argmax()  # the first candidate that fits
            placed.append(Placed(kind, color, float(cx[j]), float(cy[j]), int(s)))
        if len(placed) == len(items):
            return tuple(placed)


def sample_scene(rng: np.random.Generator, size: int = 64) -> Scene:
    """A random spec and a placement of its objects on a size x size canvas: sides uniform in [14, 20] px
    (at 64), boxes >= 2 px inside the canvas and >= 4 px apart; for position scenes the second object lies
    >= 12 px along the relation's axis from the first, and that offset beats the other axis's by >= 2 px."""
    spec = sample_spec(rng)
    return Scene(spec, prompt_of(spec), _place(rng, spec, size))


@functools.lru_cache(maxsize=8)
def _grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    """Sub-pixel centres along one axis, (size * SUPERSAMPLE,) float32 in px, and the box-downsampling
    matrix (size, size * SUPERSAMPLE) float32 (row i averages the sub-pixels of pixel i)."""
    centres = ((np.arange(size * SUPERSAMPLE) + 0.5) / SUPERSAMPLE).astype(np.float32)
    pool = np.kron(np.eye(size, dtype=np.float32), np.full((1, SUPERSAMPLE), 1 / SUPERSAMPLE, np.float32))
    return centres, pool


_COLOR_ARRAYS = {c: np.array(v, np.float32) for c, v in PALETTE.items()}


def render(scene: Scene, size: int = 64) -> np.ndarray:
    """(size, size, 3) uint8 RGB image of ``scene``: each object is drawn at 4x4 sub-pixels over its
    bounding box only, box-averaged per pixel (antialiased edges) and blended over the background."""
    img = np.empty((size, size, 3), np.float32)
    img[:] = BACKGROUND
    sub, pool = _grid(size)
    for o in scene.objects:
        h = o.size / 2
        x0, x1 = max(0, math.floor(o.cx - h)), min(size, math.ceil(o.cx + h))
        y0, y1 = max(0, math.floor(o.cy - h)), min(size, math.ceil(o.cy + h))
        xs, ys = slice(x0 * SUPERSAMPLE, x1 * SUPERSAMPLE), slice(y0 * SUPERSAMPLE, y1 * SUPERSAMPLE)
        dx, dy = sub[None, xs] - o.cx, sub[ys, None] - o.cy
        if o.kind == "circle":
            inside = dx * dx + dy * dy <= h * h
        elif o.kind == "square":
            inside = (np.abs(dx) <= h) & (np.abs(dy) <= h)
        else:  # apex (cx, cy - h), base y = cy + h from cx - h to cx + h
            inside = (dy <= h) & (np.abs(dx) <= (dy + h) / 2)
        cover = pool[y0:y1, ys] @ inside.astype(np.float32) @ pool[x0:x1, xs].T  # (y1 - y0, x1 - x0)
        region = img[y0:y1, x0:x1]
        region += cover[..., None] * (_COLOR_ARRAYS[o.color] - region)
    return np.rint(img).astype(np.uint8)


def make_dataset(n: int, seed: int, size: int = 64) -> tuple[np.ndarray, list[str], list[Scene]]:
    """(images (n, size, size, 3) uint8, prompts, scenes); scene i is drawn from
    ``np.random.default_rng([seed, i])``, so a dataset is a prefix of any larger one with the same seed."""
    images = np.empty((n, size, size, 3), np.uint8)
    scenes = []
    for i in range(n):
        scenes.append(sample_scene(np.random.default_rng([seed, i]), size))
        images[i] = render(scenes[i], size)
    return images, [s.prompt for s in scenes], scenes
