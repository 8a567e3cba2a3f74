"""toprovar.eval: the shapes dataset (grammar round trip, geometry, determinism), the GenEval-style checker
(ground truth, deranged prompts, degraded images) and the PSNR / SSIM metrics against direct formulas.

Properties that must hold for any seed draw a fresh one and print it in the assertion message."""
from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import ndimage

from toprovar.eval import (CATEGORIES, Group, Spec, chance_accuracy, detect, evaluate, make_dataset, parse_prompt,
                           prompt_of, psnr, relation_offsets, score, ssim)

N = 480  # scenes per checker test (~120 per category)


def fresh_seed() -> int:
    return int(np.random.SeedSequence().entropy % 2**32)


@pytest.fixture(scope="module")
def data():
    seed = fresh_seed()
    images, prompts, scenes = make_dataset(N, seed)
    return seed, images, prompts, scenes


def _check_accuracy(result: dict, floor: float, msg: str):
    assert set(result["per_category"]) == set(CATEGORIES), msg
    assert result["overall"] >= floor, f"{msg}: {result['per_category']}"
    for cat, acc in result["per_category"].items():
        assert acc >= floor, f"{msg}: {cat} {acc:.3f} (n={result['n'][cat]})"


def test_prompt_round_trip_and_scene_geometry(data):
    seed, images, prompts, scenes = data
    assert images.shape == (N, 64, 64, 3) and images.dtype == np.uint8
    for p, s in zip(prompts, scenes):
        msg = f"seed {seed}: {p!r}"
        assert parse_prompt(p) == s.spec and prompt_of(s.spec) == p == s.prompt, msg
        want = [(g.color, g.kind) for g in s.spec.groups for _ in range(g.count)]
        assert [(o.color, o.kind) for o in s.objects] == want, msg
        for i, o in enumerate(s.objects):
            assert 14 <= o.size <= 20 and 2 <= o.cx - o.size / 2 and o.cx + o.size / 2 <= 62, msg
            assert 2 <= o.cy - o.size / 2 and o.cy + o.size / 2 <= 62, msg
            for q in s.objects[:i]:
                gap = max(abs(o.cx - q.cx), abs(o.cy - q.cy)) - (o.size + q.size) / 2
                assert gap >= 4, msg
        if s.spec.relation:
            a, b = s.objects
            along, across = relation_offsets(s.spec.relation, (a.cx, a.cy), (b.cx, b.cy))
            assert along >= 12 and along > abs(across), msg
    assert {s.spec.category for s in scenes} == set(CATEGORIES)


@pytest.mark.parametrize("spec,prompt", [
    (Spec("single", (Group(1, "red", "circle"),)), "a red circle"),
    (Spec("counting", (Group(3, "blue", "square"),)), "three blue squares"),
    (Spec("two_object", (Group(1, "red", "circle"), Group(1, "green", "triangle"))),
     "a red circle and a green triangle"),
    (Spec("position", (Group(1, "red", "circle"), Group(1, "blue", "square")), "left of"),
     "a red circle left of a blue square"),
])
def test_prompt_grammar_by_hand(spec, prompt):
    assert prompt_of(spec) == prompt and parse_prompt(prompt) == spec


@pytest.mark.parametrize("bad", ["a red circles", "two red circle", "five red circles", "a pink circle",
                                 "a red circle and a red circle", "two red circles left of a blue square",
                                 "a red circle near a blue square", "A red circle", "a red circle "])
def test_bad_prompt_raises_naming_it(bad):
    with pytest.raises(ValueError, match=f"prompt {bad!r}"):
        parse_prompt(bad)


def test_make_dataset_deterministic_and_prefix():
    seed = fresh_seed()
    a, pa, sa = make_dataset(40, seed)
    b, pb, sb = make_dataset(40, seed)
    c, pc, sc = make_dataset(25, seed)
    assert np.array_equal(a, b) and pa == pb and sa == sb, f"seed {seed}"
    assert np.array_equal(a[:25], c) and pa[:25] == pc and sa[:25] == sc, f"seed {seed}"
    d, pd, _ = make_dataset(40, seed + 1)
    assert pd != pa and not np.array_equal(a, d), f"seed {seed}"


def test_render_antialiased_on_background(data):
    seed, images, _, scenes = data
    assert (images[:, 0, 0] == (245, 245, 245)).all(), f"seed {seed}"
    i = next(k for k, s in enumerate(scenes) if s.spec.category == "single")
    o = scenes[i].objects[0]
    assert tuple(images[i, round(o.cy), round(o.cx)]) in {(220, 40, 40), (40, 170, 60), (40, 80, 220),
                                                          (235, 195, 35), (150, 60, 190)}, f"seed {seed}"
    # curved and slanted edges are antialiased (an axis-aligned square can land on whole pixels: two colours)
    j = next(k for k, s in enumerate(scenes) if s.spec.category == "single" and s.objects[0].kind != "square")
    n_colours = len(np.unique(images[j].reshape(-1, 3), axis=0))
    assert n_colours > 2, f"seed {seed}: no antialiased edge pixels"


def test_detect_by_hand():
    images, _, scenes = make_dataset(1, 0)
    dets = detect(images[0])
    assert sorted((d.color, d.kind) for d in dets) == sorted((o.color, o.kind) for o in scenes[0].objects)
    for o in scenes[0].objects:
        d = min(dets, key=lambda d: math.hypot(d.cx - o.cx, d.cy - o.cy))
        assert abs(d.cx - o.cx) < 1 and abs(d.cy - o.cy) < 1
    assert detect(np.full((64, 64, 3), 245, np.uint8)) == []


def test_ground_truth_scores_correct(data):
    seed, images, _, scenes = data
    _check_accuracy(evaluate(images, [s.spec for s in scenes]), 0.99, f"seed {seed}")


def test_deranged_prompts_score_low(data):
    seed, images, _, scenes = data
    r = chance_accuracy(images, [s.spec for s in scenes], seed=seed)
    assert r["overall"] <= 0.25, f"seed {seed}: {r['per_category']}"
    assert len(r["correct"]) == N


def test_checker_robust_to_blur_and_noise(data):
    seed, images, _, scenes = data
    rng = np.random.default_rng(seed)
    noisy = ndimage.gaussian_filter(images.astype(np.float64), (0, 0.6, 0.6, 0)) + rng.normal(0, 6, images.shape)
    noisy = np.clip(np.rint(noisy), 0, 255).astype(np.uint8)
    _check_accuracy(evaluate(noisy, [s.spec for s in scenes]), 0.95, f"seed {seed}")


def test_score_sub_checks_by_hand():
    images, _, scenes = make_dataset(200, 1)
    i = next(k for k, s in enumerate(scenes) if s.spec.category == "position")
    spec = scenes[i].spec
    assert score(images[i], spec)["correct"] and score(images[i], spec)["relation"]
    flipped = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}[spec.relation]
    r = score(images[i], Spec("position", spec.groups, flipped))
    assert r["objects"] and r["relation"] is False and not r["correct"]
    j = next(k for k, s in enumerate(scenes) if s.spec.category == "counting")
    g = scenes[j].spec.groups[0]
    r = score(images[j], Spec("counting", (Group(g.count + 1 if g.count < 4 else 2, g.color, g.kind),)))
    assert not r["correct"] and not r["count"] and r["relation"] is None


def test_psnr_and_ssim():
    seed = fresh_seed()
    rng = np.random.default_rng(seed)
    a = rng.integers(0, 256, (32, 40, 3), dtype=np.uint8)
    b = np.clip(a.astype(int) + rng.integers(-20, 21, a.shape), 0, 255).astype(np.uint8)
    assert psnr(a, a) == math.inf and ssim(a, a) == pytest.approx(1.0, abs=1e-12)
    mse = ((a.astype(np.float64) - b) ** 2).mean()
    assert psnr(a, b) == pytest.approx(10 * math.log10(255 ** 2 / mse), rel=1e-12), f"seed {seed}"
    assert ssim(a, b) == pytest.approx(ssim(b, a), abs=1e-12) and ssim(a, b) < 1, f"seed {seed}"


def test_ssim_constant_offset_direct_formula():
    """13x12 images (3x2 valid 11x11 windows), b = a + 17: the variances and covariance are equal, so each
    window's SSIM is its luminance term (2 mu_a mu_b + C1) / (mu_a^2 + mu_b^2 + C1)."""
    seed = fresh_seed()
    a = np.random.default_rng(seed).integers(0, 200, (13, 12, 3)).astype(np.uint8)
    b = a + np.uint8(17)
    x = np.arange(11) - 5.0
    w = np.exp(-(x[:, None] ** 2 + x[None, :] ** 2) / (2 * 1.5 ** 2))
    w /= w.sum()
    c1 = (0.01 * 255) ** 2
    vals = []
    for ch in range(3):
        for i in range(3):
            for j in range(2):
                mu_a = (w * a[i:i + 11, j:j + 11, ch]).sum()
                mu_b = mu_a + 17
                vals.append((2 * mu_a * mu_b + c1) / (mu_a ** 2 + mu_b ** 2 + c1))
    assert ssim(a, b) == pytest.approx(np.mean(vals), rel=1e-10), f"seed {seed}"
