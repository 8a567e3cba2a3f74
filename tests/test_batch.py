"""Batched generation: per-row seeds and CFG scales, a row's image independent of its batch-mates (the
unpruned model, fixed rules, ToProVAR at a pinned operating point), ToProVAR's per-prompt kept sets with a
common count (adaptive), and the cost of per-prompt kept sets. PyTorch pipeline, tiny model, CPU; the
export-directory backends are tested in tests/test_runtime.py (they share its export)."""
from __future__ import annotations

import os

import pytest
import torch

from toprovar.benchmark.e2e import operating_point
from toprovar.pipeline import Pipeline, resolve_schedule
from toprovar.policy import GenerationInfo, ToProVARConfig, ToProVARPolicy, make_policy
from toprovar.runtime.orchestrator import cfg_groups, row_seeds, uniform_noise

PROMPTS = ["a red fox", "two green triangles on a long grey road at night", "cat", "a yellow circle", "x",
           "blue sky over the sea", "a", "an orange square"]


def fresh_seeds(n: int) -> list[int]:
    return [int.from_bytes(os.urandom(3), "little") for _ in range(n)]


@pytest.fixture(scope="module")
def pipe():
    return Pipeline.load("tiny", seed=0)


def pinned(depth: int, scales: int) -> ToProVARPolicy:
    return ToProVARPolicy(ToProVARConfig(stage="full", **operating_point(depth, scales)))


def policy_of(name: str, pipe) -> object:
    return pinned(pipe.cfg.depth, len(resolve_schedule(pipe.cfg, None, 1.0))) if name == "pinned" else make_policy(name)


@pytest.mark.parametrize("name", ["none", "pinned"])
def test_row_alone_or_in_a_batch_of_8_same_bits_and_image(pipe, name):
    seeds = fresh_seeds(8)
    cfgs = [3.0, 3.0, 1.5, 3.0, 4.0, 3.0, 1.0, 3.0]
    batch = pipe.generate(PROMPTS, seed=seeds, policy=policy_of(name, pipe), progress=False, row_cfg=cfgs)
    if name == "pinned":
        assert any(k < n for si, n in batch.trace.tokens.items()
                   for k in batch.trace.kept[si]), "the pinned point must prune something"
    for b in (2, 7):  # a CFG scale of its own, the last row
        alone = pipe.generate([PROMPTS[b]], seed=seeds[b], policy=policy_of(name, pipe), progress=False,
                              row_cfg=[cfgs[b]])
        for si, (x, y) in enumerate(zip(batch.bits, alone.bits)):
            assert torch.equal(x[b:b + 1], y), f"{name}: row {b} bits differ at scale {si}"
        assert torch.equal(batch.images[b:b + 1], alone.images), f"{name}: row {b} image differs"


def test_int_seed_is_row_seeds_and_scalar_cfg_is_one_group(pipe):
    s = fresh_seeds(1)[0]
    assert row_seeds(s, 3) == [s, s + 1, s + 2] and row_seeds([5, 5], 2) == [5, 5]
    with pytest.raises(ValueError, match="2 seeds given for 3 prompts"):
        row_seeds([1, 2], 3)
    assert cfg_groups(3.0, None, 3, 2) == ([[3.0, 3.0]], [[0, 1, 2]])
    assert cfg_groups(3.0, [2.0, 4.0, 2.0], 3, 2) == ([[2.0, 2.0], [4.0, 4.0]], [[0, 2], [1]])
    a = pipe.generate(PROMPTS[:2], seed=s, progress=False)
    b = pipe.generate(PROMPTS[:2], seed=[s, s + 1], progress=False, row_cfg=[pipe.cfg.default_cfg] * 2)
    assert all(torch.equal(x, y) for x, y in zip(a.bits, b.bits)) and torch.equal(a.images, b.images)


def test_row_noise_depends_on_its_own_generator_only():
    counts, bits = [1, 4, 9], 5
    gens = lambda seeds: [torch.Generator().manual_seed(s) for s in seeds]  # noqa: E731
    seeds = fresh_seeds(3)
    batch = uniform_noise(gens(seeds), 3, counts, bits, torch.device("cpu"))
    for b, s in enumerate(seeds):
        alone = uniform_noise(torch.Generator().manual_seed(s), 1, counts, bits, torch.device("cpu"))
        assert all(torch.equal(x[b:b + 1], y) for x, y in zip(batch, alone))


def test_adaptive_toprovar_per_prompt_sets_common_count():
    """keep(): each prompt's own top tokens by its own entropy; the count is the largest of the prompts' own."""
    sched = [(1, 1), (2, 2), (8, 8)]
    cfg = ToProVARConfig(stage="scale-token", fixed_depth=2, a_min=0.0, a_max=0.9, k_min=0.05, bucket=1)
    pol = ToProVARPolicy(cfg)
    pol.start(GenerationInfo(sched, 4, 2, torch.device("cpu")))
    n = 64
    g = torch.Generator().manual_seed(fresh_seeds(1)[0])
    low = torch.rand(n, generator=g) + 0.1  # row 0: even entropy -> keeps many tokens
    spiky = torch.full((n,), 0.01)
    spiky[torch.randperm(n, generator=g)[:6]] = 50.0  # row 1: a few high-entropy tokens -> keeps few
    assert pol.keep(2, 0, n) is None and pol.wants_entropy(2, 0)
    pol.observe(2, 0, torch.stack([low, spiky]), None)
    idx = pol.keep(2, 1, n)
    own = [pol.piece(e, torch.tensor([1.0])) for e in (low, spiky)]
    ks = [int(o[1]) for o in own]
    assert ks[0] != ks[1] and idx.shape == (2, max(ks))
    for b, (_, _, order) in enumerate(own):
        assert torch.equal(idx[b], order[:max(ks)].sort().values)  # its own ranking, the common count


def test_adaptive_toprovar_identical_rows_equal_alone(pipe):
    """A batch of one request repeated: the rows' counts agree, so each row is the request alone."""
    s = fresh_seeds(1)[0]
    alone = pipe.generate([PROMPTS[1]], seed=s, policy=make_policy("toprovar"), progress=False)
    batch = pipe.generate([PROMPTS[1]] * 2, seed=[s] * 2, policy=make_policy("toprovar"), progress=False)
    assert batch.trace.kept == alone.trace.kept
    assert any(k < n for si, n in alone.trace.tokens.items() for k in alone.trace.kept[si]), "must prune"
    for b in range(2):
        assert all(torch.equal(x[b:b + 1], y) for x, y in zip(batch.bits, alone.bits))
        assert torch.equal(batch.images[b:b + 1], alone.images)
