"""Scale schedules of Infinity's dynamic resolution (per aspect ratio h/w and total-pixel preset).

Each schedule is a list of (h, w) token-grid sides, coarse to fine. The 1M preset has 13 scales; the
0.06M, 0.25M and 0.60M presets are its 7-, 10- and 12-scale prefixes. Pixel size = last side x the VAE
stride. RoPE positions of every preset refer to the last scale of the 1M schedule of that ratio.
"""
from __future__ import annotations

# Token-grid sides (h, w) of the 1M schedule for each h/w ratio >= 1 (the official table).
_RATIO_SIDES: dict[float, list[tuple[int, int]]] = {
    1.000: [(1, 1), (2, 2), (4, 4), (6, 6), (8, 8), (12, 12), (16, 16), (20, 20), (24, 24), (32, 32), (40, 40), (48, 48), (64, 64)],
    1.250: [(1, 1), (2, 2), (3, 3), (5, 4), (10, 8), (15, 12), (20, 16), (25, 20), (30, 24), (35, 28), (45, 36), (55, 44), (70, 56)],
    1.333: [(1, 1), (2, 2), (4, 3), (8, 6), (12, 9), (16, 12), (20, 15), (24, 18), (28, 21), (36, 27), (48, 36), (60, 45), (72, 54)],
    1.500: [(1, 1), (2, 2), (3, 2), (6, 4), (9, 6), (15, 10), (21, 14), (27, 18), (33, 22), (39, 26), (48, 32), (63, 42), (78, 52)],
    1.750: [(1, 1), (2, 2), (3, 3), (7, 4), (11, 6), (14, 8), (21, 12), (28, 16), (35, 20), (42, 24), (56, 32), (70, 40), (84, 48)],
    2.000: [(1, 1), (2, 2), (4, 2), (6, 3), (10, 5), (16, 8), (22, 11), (30, 15), (38, 19), (46, 23), (60, 30), (74, 37), (90, 45)],
    2.500: [(1, 1), (2, 2), (5, 2), (10, 4), (15, 6), (20, 8), (25, 10), (30, 12), (40, 16), (50, 20), (65, 26), (80, 32), (100, 40)],
    3.000: [(1, 1), (2, 2), (6, 2), (9, 3), (15, 5), (21, 7), (27, 9), (36, 12), (45, 15), (54, 18), (72, 24), (90, 30), (111, 37)],
}
PRESET_SCALES = {"0.06M": 7, "0.25M": 10, "0.60M": 12, "1M": 13}

RATIO_SIDES: dict[float, list[tuple[int, int]]] = {}
for _r, _sides in _RATIO_SIDES.items():
    RATIO_SIDES[_r] = _sides
    if _r != 1.0:
        RATIO_SIDES[int(1 / _r * 1000) / 1000] = [(w, h) for h, w in _sides]


class ScheduleError(ValueError):
    """An aspect ratio, preset or resolution that no schedule provides."""


def nearest_ratio(h_div_w: float) -> float:
    """The predefined h/w template nearest to ``h_div_w``."""
    return min(RATIO_SIDES, key=lambda r: abs(r - h_div_w))


def get_schedule(preset: str = "1M", h_div_w: float = 1.0) -> list[tuple[int, int]]:
    """Scale schedule [(h, w), ...] for a total-pixel preset and the nearest predefined ratio."""
    if preset not in PRESET_SCALES:
        raise ScheduleError(f"preset: {preset!r} is not one of {sorted(PRESET_SCALES)}")
    return list(RATIO_SIDES[nearest_ratio(h_div_w)][:PRESET_SCALES[preset]])


def rope_grid_side(h_div_w: float = 1.0) -> tuple[int, int]:
    """(H, W) of the 1M schedule's last scale: the grid that RoPE positions are expressed in."""
    return RATIO_SIDES[nearest_ratio(h_div_w)][-1]


def preset_for_resolution(resolution: int, vae_stride: int, h_div_w: float = 1.0) -> str:
    """The preset whose last scale, times ``vae_stride``, has ``resolution`` as its longer pixel side."""
    sides = RATIO_SIDES[nearest_ratio(h_div_w)]
    for name, n in PRESET_SCALES.items():
        h, w = sides[n - 1]
        if max(h, w) * vae_stride == resolution:
            return name
    valid = sorted(max(sides[n - 1]) * vae_stride for n in PRESET_SCALES.values())
    raise ScheduleError(f"--resolution: {resolution} is not in the schedule; valid for this model: {valid}")


def token_counts(schedule: list[tuple[int, int]]) -> list[int]:
    """Tokens per scale h*w."""
    return [h * w for h, w in schedule]


def cumulative_tokens(schedule: list[tuple[int, int]]) -> list[int]:
    """Keys visible at each scale (all earlier scales plus itself)."""
    out, total = [], 0
    for n in token_counts(schedule):
        total += n
        out.append(total)
    return out
