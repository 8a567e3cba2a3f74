"""The procedural scenes text-to-image dataset (256x256): several textured objects on textured or gradient
grey backgrounds, with occlusion; the richer sibling of ``shapes``.

An object is a kind (circle, square, triangle, diamond) of a palette colour drawn with a texture: ``solid``,
``striped`` (8 px bands of the colour and its dark shade), ``checkered`` (12 px cells) or ``gradient`` (the
colour fading to its dark shade across the object). The background is grey (no chroma, so every saturated
pixel belongs to an object): plain, a linear gradient, stripes or checks of two greys.

Prompts follow a small grammar; a group is ``COUNT [TEXTURE] COLOUR KIND[s]`` (no texture word = solid):
    single     "a striped red circle"
    counting   "three blue squares"                        (2..5 objects of one colour, kind and texture)
    multi      "a red circle, two green diamonds and a checkered blue square"   (2 or 3 groups)
    position   "a red circle left of a gradient blue square"  (left of, right of, above, below)
    occlusion  "a red circle in front of a blue square"     (in front of, behind: the two overlap)

Every object of the image is named by its prompt. Scene i of ``make_dataset(n, seed)`` depends only on
(seed, i). Coordinates are in pixels, x right, y down; pixel (row r, column c) has its centre at (c + .5, r + .5).
"""
from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

SIZE = 256
PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40), "yellow": (235, 195, 35), "green": (40, 170, 60), "cyan": (40, 190, 200),
    "blue": (40, 80, 220), "purple": (150, 60, 190),
}
COLORS = tuple(PALETTE)
KINDS = ("circle", "square", "triangle", "diamond")
TEXTURES = ("solid", "striped", "checkered", "gradient")
CATEGORIES = ("single", "counting", "multi", "position", "occlusion")
POSITIONS = ("left of", "right of", "above", "below")
DEPTHS = ("in front of", "behind")
RELATIONS = POSITIONS + DEPTHS
NUMBER_WORDS = {1: "a", 2: "two", 3: "three", 4: "four", 5: "five"}

DARK = 0.55            # the dark shade of a textured object: this fraction of its colour
STRIPE = 8             # px per stripe band
CHECK = 12             # px per check cell
SIZE_RANGE = (40, 64)  # object box side, px
MARGIN = 6             # px from the canvas border
GAP = 10               # px between the boxes of objects that must not touch
REL_MIN = 40           # position scenes: px along the relation's axis
TEXTURE_P = 0.5        # probability that a group is textured (striped, checkered or gradient)
_TRIES = 96            # candidate positions per object, drawn at once


@dataclass(frozen=True)
class Group:
    """``count`` objects of one colour, kind and texture."""
    count: int
    color: str
    kind: str
    texture: str = "solid"

    @property
    def key(self) -> tuple[str, str, str]:
        return self.color, self.kind, self.texture


@dataclass(frozen=True)
class Spec:
    """What a prompt asks for. For position and occlusion prompts: groups[0] RELATION groups[1]."""
    category: str
    groups: tuple[Group, ...]
    relation: str | None = None

    def __post_init__(self):
        g = self.groups
        if self.category not in CATEGORIES:
            raise ValueError(f"unknown category {self.category!r}")
        for x in g:
            if x.color not in PALETTE or x.kind not in KINDS or x.texture not in TEXTURES or \
                    x.count not in NUMBER_WORDS:
                raise ValueError(f"bad group {x}")
        n = {"single": (1,), "counting": (1,), "multi": (2, 3)}.get(self.category, (2,))
        if len(g) not in n:
            raise ValueError(f"{self.category} needs {' or '.join(map(str, n))} group(s), got {len(g)}")
        if len({(x.color, x.kind) for x in g}) != len(g):
            raise ValueError(f"{self.category}: groups must differ in colour or kind")
        if self.category == "single" and g[0].count != 1 or self.category == "counting" and g[0].count < 2:
            raise ValueError(f"{self.category} cannot have count {g[0].count}")
        if self.category == "multi" and sum(x.count for x in g) > 5:
            raise ValueError("multi: at most 5 objects")
        if self.category in ("position", "occlusion") and any(x.count != 1 for x in g):
            raise ValueError(f"{self.category} needs two single objects")
        if self.category == "occlusion" and g[0].color == g[1].color:
            raise ValueError("occlusion needs two colours")
        allowed = {"position": POSITIONS, "occlusion": DEPTHS}.get(self.category, (None,))
        if self.relation not in allowed:
            raise ValueError(f"relation {self.relation!r} does not fit category {self.category}")

    @property
    def items(self) -> list[tuple[str, str, str]]:
        """(colour, kind, texture) of every object, group by group."""
        return [x.key for x in self.groups for _ in range(x.count)]


@dataclass(frozen=True)
class Placed:
    """One drawn object: box centre (cx, cy) and side ``size`` in px; texture orientation ``axis`` (0: bands
    / ramp along x, 1: along y) and ``flip`` (the gradient's dark end first)."""
    kind: str
    color: str
    texture: str
    cx: float
    cy: float
    size: float
    axis: int = 0
    flip: bool = False


@dataclass(frozen=True)
class Background:
    """Grey background: ``kind`` plain / gradient / striped / checkered, levels g0 and g1 (0..255), the
    gradient's direction ``angle`` (rad) or the pattern's ``period`` (px) and ``axis``."""
    kind: str
    g0: float
    g1: float
    angle: float = 0.0
    period: int = 32
    axis: int = 0


@dataclass(frozen=True)
class Scene:
    spec: Spec
    prompt: str
    objects: tuple[Placed, ...]   # in drawing order (later ones on top)
    background: Background


# ------------------------------------------------------------------------------------------------ grammar

def _phrase(g: Group) -> str:
    tex = "" if g.texture == "solid" else g.texture + " "
    return f"{NUMBER_WORDS[g.count]} {tex}{g.color} {g.kind}{'s' if g.count > 1 else ''}"


def prompt_of(spec: Spec) -> str:
    """The prompt text of ``spec`` (inverse of ``parse_prompt``)."""
    p = [_phrase(g) for g in spec.groups]
    if spec.relation is not None:
        return f"{p[0]} {spec.relation} {p[1]}"
    return p[0] if len(p) == 1 else f"{', '.join(p[:-1])} and {p[-1]}"


_WORDS = {w: n for n, w in NUMBER_WORDS.items()}
_TEX = "|".join(t for t in TEXTURES if t != "solid")
_GROUP = rf"({'|'.join(_WORDS)}) (?:({_TEX}) )?({'|'.join(COLORS)}) ({'|'.join(KINDS)})(s?)"
_GROUP_RE = re.compile(_GROUP)
_REL_RE = re.compile(rf"({_GROUP}) ({'|'.join(RELATIONS)}) ({_GROUP})")


def _group(text: str) -> Group:
    m = _GROUP_RE.fullmatch(text)
    if m is None:
        raise ValueError(f"{text!r} is not a group")
    w, tex, color, kind, plural = m.groups()
    if (w == "a") == (plural == "s"):
        raise ValueError("'a' takes the singular, number words the plural")
    return Group(_WORDS[w], color, kind, tex or "solid")


def parse_prompt(prompt: str) -> Spec:
    """The Spec of a prompt of the grammar; ValueError naming the prompt for any other text."""
    try:
        m = _REL_RE.fullmatch(prompt)
        if m is not None:
            a, rel, b = m.group(1), m.group(7), m.group(8)
            return Spec("occlusion" if rel in DEPTHS else "position", (_group(a), _group(b)), rel)
        head, sep, last = prompt.rpartition(" and ")
        parts = (head.split(", ") + [last]) if sep else [prompt]
        groups = tuple(_group(p) for p in parts)
        if len(groups) > 1:
            return Spec("multi", groups)
        return Spec("single" if groups[0].count == 1 else "counting", groups)
    except ValueError as e:
        raise ValueError(f"prompt {prompt!r} is outside the scenes grammar ({e})") from None


def relation_offsets(relation: str, a: tuple[float, float], b: tuple[float, float]) -> tuple[float, float]:
    """(along, across) for "A RELATION B" (a position relation), centres a, b = (x, y): ``along`` is the
    signed displacement on the relation's axis (positive when it holds), ``across`` the other axis's."""
    dx, dy = b[0] - a[0], b[1] - a[1]
    return {"left of": (dx, dy), "right of": (-dx, dy), "above": (dy, dx), "below": (-dy, dx)}[relation]


# ------------------------------------------------------------------------------------------------ sampling

def _pick(rng: np.random.Generator, seq):
    return seq[int(rng.integers(len(seq)))]


def _texture(rng: np.random.Generator) -> str:
    return _pick(rng, TEXTURES[1:]) if rng.random() < TEXTURE_P else "solid"


def sample_spec(rng: np.random.Generator) -> Spec:
    """A uniformly random category; colours, kinds, textures, counts and relation at random."""
    cat = _pick(rng, CATEGORIES)
    pairs = rng.permutation(len(COLORS) * len(KINDS))
    ck = [(COLORS[i // len(KINDS)], KINDS[i % len(KINDS)]) for i in pairs]
    if cat in ("single", "counting"):
        n = 1 if cat == "single" else int(rng.integers(2, 6))
        return Spec(cat, (Group(n, *ck[0], _texture(rng)),))
    if cat == "multi":
        counts = [1, 1] if rng.random() < 0.5 else [1, 1, 1]
        counts[int(rng.integers(len(counts)))] += int(rng.random() < 0.5)
        return Spec(cat, tuple(Group(c, *ck[i], _texture(rng)) for i, c in enumerate(counts)))
    if cat == "occlusion":
        ck = [ck[0]] + [x for x in ck if x[0] != ck[0][0]][:1]
    groups = tuple(Group(1, *ck[i], _texture(rng)) for i in range(2))
    return Spec(cat, groups, _pick(rng, POSITIONS if cat == "position" else DEPTHS))


def _box_gap(ax, ay, asz, bx, by, bsz):
    """Chebyshev gap between square boxes (negative: they overlap)."""
    return np.maximum(abs(ax - bx), abs(ay - by)) - (asz + bsz) / 2


def _shapes_overlap(spec: Spec, items, placed) -> bool:
    """Occlusion scenes: the two shapes (not only their boxes) overlap by 12-30% of the back shape's area,
    and what stays visible of the back one is in one piece."""
    (ax, ay, asz), (bx, by, bsz) = placed
    x = np.arange(int(min(ax - asz, bx - bsz)), int(max(ax + asz, bx + bsz)) + 1, dtype=np.float32)[None] + 0.5
    y = np.arange(int(min(ay - asz, by - bsz)), int(max(ay + asz, by + bsz)) + 1, dtype=np.float32)[:, None] + 0.5
    a = signed_distance(items[0][1], x - ax, y - ay, asz / 2) > 0
    b = signed_distance(items[1][1], x - bx, y - by, bsz / 2) > 0
    back, front = (b, a) if spec.relation == "in front of" else (a, b)
    frac = (a & b).sum() / max(1, back.sum())
    return 0.12 <= frac <= 0.3 and ndimage.label(ndimage.binary_opening(back & ~front, np.ones((5, 5), bool)))[1] == 1


def _place(rng: np.random.Generator, spec: Spec) -> tuple[Placed, ...]:
    """Boxes for every object: in the canvas with MARGIN; non-overlapping objects >= GAP apart; position
    pairs >= REL_MIN apart on the relation's axis, beating the other axis; occlusion pairs overlapping (the
    front shape covers 12-30% of the back shape, whose visible part, opened by 5x5, stays in one piece; sizes within 1.25x) and >= GAP from the rest."""
    items = spec.items
    lo, hi = SIZE_RANGE
    while True:
        sides = rng.uniform(lo, hi, len(items))
        if spec.category == "occlusion":
            sides[1] = np.clip(sides[0] * rng.uniform(0.8, 1.25), lo, hi)
        placed: list[tuple[float, float, float]] = []
        for j, s in enumerate(sides):
            cx, cy = rng.uniform(MARGIN + s / 2, SIZE - MARGIN - s / 2, (2, _TRIES))
            ok = np.ones(_TRIES, bool)
            for k, (px, py, ps) in enumerate(placed):
                gap = _box_gap(cx, cy, s, px, py, ps)
                if spec.category == "occlusion" and j == 1 and k == 0:
                    ov = np.clip(np.minimum(cx + s / 2, px + ps / 2) - np.maximum(cx - s / 2, px - ps / 2), 0, None) * \
                        np.clip(np.minimum(cy + s / 2, py + ps / 2) - np.maximum(cy - s / 2, py - ps / 2), 0, None)
                    frac = ov / (ps * ps)
                    # mostly along one axis, so the back object keeps its extent along the other one
                    off = np.minimum(abs(cx - px), abs(cy - py)) <= 0.12 * ps
                    ok &= (frac >= 0.15) & (frac <= 0.45) & off
                else:
                    ok &= gap >= GAP
            if placed and spec.category == "position":
                along, across = relation_offsets(spec.relation, placed[0][:2], (cx, cy))
                ok &= (along >= REL_MIN) & (along >= abs(across) + 8)
            if not ok.any():
                break
            i = int(ok.argmax())
            placed.append((float(cx[i]), float(cy[i]), float(s)))
        if len(placed) == len(items) and (spec.category != "occlusion" or _shapes_overlap(spec, items, placed)):
            break
    order = list(range(len(items)))
    if spec.category == "occlusion" and spec.relation == "in front of":
        order = [1, 0]  # groups[0] is drawn last, on top
    return tuple(Placed(items[j][1], items[j][0], items[j][2], *placed[j], axis=int(rng.integers(2)),
                        flip=bool(rng.integers(2))) for j in order)


def sample_background(rng: np.random.Generator) -> Background:
    kind = _pick(rng, ("plain", "gradient", "striped", "checkered"))
    g0 = float(rng.uniform(200, 245))
    delta = float(rng.uniform(25, 50) if kind == "gradient" else rng.uniform(12, 22))
    return Background(kind, g0, g0 - delta, angle=float(rng.uniform(0, 2 * np.pi)),
                      period=int(rng.integers(24, 48)), axis=int(rng.integers(2)))


def sample_scene(rng: np.random.Generator) -> Scene:
    """A random spec, background and placement (module docstring)."""
    spec = sample_spec(rng)
    return Scene(spec, prompt_of(spec), _place(rng, spec), sample_background(rng))


# ------------------------------------------------------------------------------------------------ rendering

_AXIS = (np.arange(SIZE, dtype=np.float32) + 0.5)


def signed_distance(kind: str, dx: np.ndarray, dy: np.ndarray, h: float) -> np.ndarray:
    """Signed distance (px, positive inside) of points at offsets (dx, dy) from a box centre to the shape
    ``kind`` of half side h: circle radius h; square; diamond (vertices at +-h); triangle apex (0, -h),
    base y = +h from -h to +h."""
    if kind == "circle":
        return h - np.sqrt(dx * dx + dy * dy)
    if kind == "square":
        return h - np.maximum(abs(dx), abs(dy))
    if kind == "diamond":
        return (h - abs(dx) - abs(dy)) / np.sqrt(2)
    if kind == "triangle":
        return np.minimum(h - dy, ((dy + h) - 2 * abs(dx)) / np.sqrt(5))
    raise ValueError(f"unknown kind {kind!r}")


def coverage(kind: str, dx: np.ndarray, dy: np.ndarray, h: float) -> np.ndarray:
    """Antialiased coverage in [0, 1] (the signed distance clipped over one pixel)."""
    return np.clip(signed_distance(kind, dx, dy, h) + 0.5, 0.0, 1.0)


def _shade(o: Placed, xs: np.ndarray, ys: np.ndarray) -> np.ndarray:
    """Brightness factor (DARK..1) of the texture at pixel centres xs (1, w), ys (h, 1)."""
    t = (xs - (o.cx - o.size / 2)) if o.axis == 0 else (ys - (o.cy - o.size / 2))
    if o.texture == "solid":
        return np.ones(np.broadcast_shapes(xs.shape, ys.shape), np.float32)
    if o.texture == "striped":
        band = np.floor(t / STRIPE) % 2
        return np.broadcast_to(1 - (1 - DARK) * band, np.broadcast_shapes(xs.shape, ys.shape))
    if o.texture == "checkered":
        x0, y0 = o.cx - o.size / 2, o.cy - o.size / 2
        return 1 - (1 - DARK) * ((np.floor((xs - x0) / CHECK) + np.floor((ys - y0) / CHECK)) % 2)
    r = np.clip(t / o.size, 0, 1)
    r = 1 - r if o.flip else r
    return np.broadcast_to(1 - (1 - DARK) * r, np.broadcast_shapes(xs.shape, ys.shape))


def render_background(bg: Background) -> np.ndarray:
    """(SIZE, SIZE) float32 grey levels."""
    x, y = _AXIS[None, :], _AXIS[:, None]
    if bg.kind == "plain":
        return np.full((SIZE, SIZE), bg.g0, np.float32)
    if bg.kind == "gradient":
        u = ((x - SIZE / 2) * np.cos(bg.angle) + (y - SIZE / 2) * np.sin(bg.angle)) / (SIZE / np.sqrt(2)) + 0.5
        return (bg.g0 + (bg.g1 - bg.g0) * np.clip(u, 0, 1)).astype(np.float32)
    if bg.kind == "striped":
        t = x if bg.axis == 0 else y
        m = np.broadcast_to(np.floor(t / (bg.period / 2)) % 2, (SIZE, SIZE))
    else:
        m = (np.floor(x / (bg.period / 2)) + np.floor(y / (bg.period / 2))) % 2
    return (bg.g0 + (bg.g1 - bg.g0) * m).astype(np.float32)


_RGB = {c: np.array(v, np.float32) for c, v in PALETTE.items()}


def render(scene: Scene) -> np.ndarray:
    """(SIZE, SIZE, 3) uint8 RGB image: the background, then each object over its box only (antialiased
    edges by signed distance, the texture's shade times the colour), later objects on top."""
    img = np.repeat(render_background(scene.background)[..., None], 3, axis=2)
    for o in scene.objects:
        h = o.size / 2
        x0, x1 = max(0, int(o.cx - h) - 1), min(SIZE, int(o.cx + h) + 2)
        y0, y1 = max(0, int(o.cy - h) - 1), min(SIZE, int(o.cy + h) + 2)
        xs, ys = _AXIS[None, x0:x1], _AXIS[y0:y1, None]
        cov = coverage(o.kind, xs - o.cx, ys - o.cy, h)[..., None]
        col = _shade(o, xs, ys)[..., None] * _RGB[o.color]
        region = img[y0:y1, x0:x1]
        region += cov * (col - region)
    return np.rint(img).clip(0, 255).astype(np.uint8)


def _make(args: tuple[int, int, int]) -> tuple[np.ndarray, list[Scene]]:
    seed, start, stop = args
    scenes = [sample_scene(np.random.default_rng([seed, i])) for i in range(start, stop)]
    return np.stack([render(s) for s in scenes]) if scenes else np.empty((0, SIZE, SIZE, 3), np.uint8), scenes


def make_dataset(n: int, seed: int, workers: int = 1) -> tuple[np.ndarray, list[str], list[Scene]]:
    """(images (n, 256, 256, 3) uint8, prompts, scenes); scene i is drawn from ``np.random.default_rng([seed,
    i])`` (a dataset is a prefix of any larger one with the same seed). ``workers`` > 1 renders in processes."""
    if workers <= 1 or n < 8 * workers:
        images, scenes = _make((seed, 0, n))
    else:
        import multiprocessing as mp
        step = -(-n // (4 * workers))
        chunks = [(seed, a, min(n, a + step)) for a in range(0, n, step)]
        with mp.get_context("spawn").Pool(workers) as pool:
            parts = pool.map(_make, chunks)
        images = np.concatenate([p[0] for p in parts])
        scenes = [s for p in parts for s in p[1]]
    return images, [s.prompt for s in scenes], scenes
