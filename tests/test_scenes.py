"""toprovar.eval.scenes and scene_checker: the 256 px scenes dataset (grammar round trip, geometry, rendering,
determinism) and its checker (ground truth near 1, deranged prompts near 0, blur and noise, sub-checks by
hand). Properties that must hold for any seed draw a fresh one and print it in the assertion message."""
from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from toprovar.eval import scene_checker as sc
from toprovar.eval.scenes import (CATEGORIES, DARK, MARGIN, PALETTE, POSITIONS, SIZE, SIZE_RANGE, Group, Spec,
                                  make_dataset, parse_prompt, prompt_of, relation_offsets, signed_distance)

N = 150  # scenes per checker test (~30 per category)


def fresh_seed() -> int:
    return int(np.random.SeedSequence().entropy % 2**32)


@pytest.fixture(scope="module")
def data():
    seed = fresh_seed()
    images, prompts, scenes = make_dataset(N, seed)
    return seed, images, prompts, scenes


@pytest.fixture(scope="module")
def gt_eval(data):
    seed, images, _, scenes = data
    return sc.evaluate(images, [s.spec for s in scenes])


def _mask(o, shape=(SIZE, SIZE)):
    y, x = np.mgrid[:shape[0], :shape[1]] + 0.5
    return signed_distance(o.kind, x - o.cx, y - o.cy, o.size / 2) > 0


def test_prompt_round_trip_and_geometry(data):
    seed, images, prompts, scenes = data
    assert images.shape == (N, SIZE, SIZE, 3) and images.dtype == np.uint8
    for p, s in zip(prompts, scenes):
        msg = f"seed {seed}: {p!r}"
        assert parse_prompt(p) == s.spec and prompt_of(s.spec) == p == s.prompt, msg
        assert sorted((o.color, o.kind, o.texture) for o in s.objects) == sorted(s.spec.items), msg
        for o in s.objects:
            assert SIZE_RANGE[0] <= o.size <= SIZE_RANGE[1], msg
            assert MARGIN <= o.cx - o.size / 2 and o.cx + o.size / 2 <= SIZE - MARGIN, msg
            assert MARGIN <= o.cy - o.size / 2 and o.cy + o.size / 2 <= SIZE - MARGIN, msg
        if s.spec.category == "occlusion":
            back, front = (_mask(o) for o in s.objects)  # drawing order: the front one last
            assert 0.12 <= (back & front).sum() / back.sum() <= 0.3, msg
            top = s.objects[1]
            g0 = s.spec.groups[0]
            assert ((top.color, top.kind) == (g0.color, g0.kind)) == (s.spec.relation == "in front of"), msg
        else:
            masks = [_mask(o) for o in s.objects]
            for i in range(len(masks)):
                for j in range(i):
                    assert not (masks[i] & masks[j]).any(), msg
        if s.spec.relation in POSITIONS:
            a, b = s.objects
            along, across = relation_offsets(s.spec.relation, (a.cx, a.cy), (b.cx, b.cy))
            assert along >= 40 and along > abs(across), msg
    assert {s.spec.category for s in scenes} == set(CATEGORIES)


@pytest.mark.parametrize("spec,prompt", [
    (Spec("single", (Group(1, "red", "circle", "striped"),)), "a striped red circle"),
    (Spec("counting", (Group(5, "cyan", "diamond"),)), "five cyan diamonds"),
    (Spec("multi", (Group(1, "red", "circle"), Group(2, "green", "triangle", "gradient"),
                    Group(1, "blue", "square", "checkered"))),
     "a red circle, two gradient green triangles and a checkered blue square"),
    (Spec("multi", (Group(1, "red", "circle"), Group(1, "red", "square"))), "a red circle and a red square"),
    (Spec("position", (Group(1, "red", "circle"), Group(1, "blue", "square", "striped")), "above"),
     "a red circle above a striped blue square"),
    (Spec("occlusion", (Group(1, "yellow", "diamond", "checkered"), Group(1, "purple", "square")), "behind"),
     "a checkered yellow diamond behind a purple square"),
])
def test_prompt_grammar_by_hand(spec, prompt):
    assert prompt_of(spec) == prompt and parse_prompt(prompt) == spec


@pytest.mark.parametrize("bad", ["a red circles", "two red circle", "six red circles", "a pink circle",
                                 "a dotted red circle", "a red circle and a red circle",
                                 "a red circle in front of a red square", "two red circles left of a blue square",
                                 "a red circle near a blue square", "a red circle, a blue square",
                                 "A red circle", "a red circle "])
def test_bad_prompt_raises_naming_it(bad):
    with pytest.raises(ValueError, match=f"prompt {bad!r}"):
        parse_prompt(bad)


def test_make_dataset_deterministic_prefix_and_workers():
    seed = fresh_seed()
    a, pa, sa = make_dataset(24, seed)
    b, pb, sb = make_dataset(24, seed, workers=2)  # rendered in 2 processes: the same scenes
    c, pc, _ = make_dataset(10, seed)
    assert np.array_equal(a, b) and pa == pb and sa == sb, f"seed {seed}"
    assert np.array_equal(a[:10], c) and pa[:10] == pc, f"seed {seed}"
    d, pd, _ = make_dataset(24, seed + 1)
    assert pd != pa and not np.array_equal(a, d), f"seed {seed}"


def test_render_grey_background_and_object_colours(data):
    seed, images, _, scenes = data
    for im, s in zip(images[:30], scenes[:30]):
        covered = np.zeros((SIZE, SIZE), bool)
        for o in s.objects:
            covered |= ndimage.binary_dilation(_mask(o), np.ones((3, 3), bool), iterations=2)
        bg = im[~covered].astype(int)
        assert (bg.max(1) - bg.min(1) <= 1).all(), f"seed {seed}: {s.prompt}: background not grey"
        top = s.objects[-1]
        px = im[int(top.cy), int(top.cx)].astype(float)
        rgb = np.array(PALETTE[top.color], float)
        shade = px @ rgb / (rgb @ rgb)  # the pixel is the colour times its texture's shade
        assert DARK - 0.02 <= shade <= 1.01 and np.abs(px - shade * rgb).max() <= 2, f"seed {seed}: {s.prompt}"


def test_ground_truth_scores_correct(data, gt_eval):
    seed = data[0]
    assert set(gt_eval["per_category"]) == set(CATEGORIES), f"seed {seed}"
    for cat, acc in gt_eval["per_category"].items():
        assert acc >= 0.95, f"seed {seed}: {cat} {acc:.3f} {gt_eval['per_category']}"
    assert gt_eval["overall"] >= 0.98, f"seed {seed}: {gt_eval['per_category']}"
    for attr, acc in gt_eval["per_attribute"].items():
        assert acc >= 0.97, f"seed {seed}: {attr} {acc:.3f}"


def test_deranged_prompts_score_near_chance(data):
    seed, images, _, scenes = data
    r = sc.chance_accuracy(images, [s.spec for s in scenes], seed=seed)
    assert r["overall"] <= 0.05 and len(r["correct"]) == N, f"seed {seed}: {r['per_category']}"


def test_checker_robust_to_blur_and_noise(data):
    seed, images, _, scenes = data
    rng = np.random.default_rng(seed)
    sub = slice(0, 60)
    noisy = ndimage.gaussian_filter(images[sub].astype(np.float64), (0, 0.7, 0.7, 0)) + \
        rng.normal(0, 5, images[sub].shape)
    noisy = np.clip(np.rint(noisy), 0, 255).astype(np.uint8)
    r = sc.evaluate(noisy, [s.spec for s in scenes[sub]])
    assert r["overall"] >= 0.85, f"seed {seed}: {r['per_category']} {r['per_attribute']}"
    # a tokenizer's soft edges: blur of sigma 2 px (~32 dB) must not turn solid objects into textured ones
    blurred = np.clip(np.rint(ndimage.gaussian_filter(images[sub].astype(np.float64), (0, 2, 2, 0))), 0, 255)
    r = sc.evaluate(blurred.astype(np.uint8), [s.spec for s in scenes[sub]])
    assert r["per_attribute"]["texture"] >= 0.9, f"seed {seed}: {r['per_category']} {r['per_attribute']}"


def test_score_sub_checks_by_hand(data):
    seed, images, _, scenes = data
    flip = {"left of": "right of", "right of": "left of", "above": "below", "below": "above",
            "in front of": "behind", "behind": "in front of"}
    for cat in ("position", "occlusion"):
        i = next(k for k, s in enumerate(scenes) if s.spec.category == cat)
        spec = scenes[i].spec
        assert sc.score(images[i], spec)["correct"], f"seed {seed}: {scenes[i].prompt}"
        r = sc.score(images[i], Spec(cat, spec.groups, flip[spec.relation]))
        assert r["objects"] and r["relation"] is False and not r["correct"], f"seed {seed}: {scenes[i].prompt}"
    i = next(k for k, s in enumerate(scenes) if s.spec.category == "single")
    g = scenes[i].spec.groups[0]
    other = "striped" if g.texture != "striped" else "checkered"
    r = sc.score(images[i], Spec("single", (Group(1, g.color, g.kind, other),)))
    assert r["count"] and r["color"] and r["kind"] and not r["texture"] and not r["correct"], f"seed {seed}"
    j = next(k for k, s in enumerate(scenes) if s.spec.category == "counting")
    g = scenes[j].spec.groups[0]
    r = sc.score(images[j], Spec("counting", (Group(g.count + 1 if g.count < 5 else 2, g.color, g.kind, g.texture),)))
    assert not r["correct"] and not r["count"] and r["relation"] is None, f"seed {seed}"


def test_detect_by_hand_and_empty_background():
    images, _, scenes = make_dataset(1, 3)
    dets = sc.detect(images[0])
    assert sorted(d.key for d in dets) == sorted(scenes[0].spec.items)
    for o in scenes[0].objects:
        d = min(dets, key=lambda d: abs(d.cx - o.cx) + abs(d.cy - o.cy))
        assert abs(d.cx - o.cx) < 1.5 and abs(d.cy - o.cy) < 1.5 and abs(d.size - o.size) < 2.5
    assert sc.detect(np.full((SIZE, SIZE, 3), 230, np.uint8)) == []


def test_scenes_model_without_weights_says_how_to_train_them(tmp_path):
    from toprovar.cli import main
    from toprovar.config import get_config
    from toprovar.pipeline import Pipeline, resolve_schedule
    cfg = get_config("scenes")
    assert resolve_schedule(cfg, None, 1.0)[-1] == (32, 32) and len(resolve_schedule(cfg, None, 1.0)) == 10
    assert cfg.depth >= 16 and 512 <= cfg.width <= 1024
    if cfg.weights_dir.is_dir():
        pytest.skip("trained scenes weights are packaged")
    with pytest.raises(FileNotFoundError, match="train_small.py --model scenes"):
        Pipeline.load("scenes")
    assert main(["generate", "--model", "scenes", "--prompt", "a red circle", "-o", str(tmp_path / "x.png")]) == 2
    assert not (tmp_path / "x.png").exists()
