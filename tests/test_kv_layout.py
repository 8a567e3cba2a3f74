"""The shared KV-cache layout (``runtime.orchestrator.kv_layout``): layer windows stacked in reverse with a
stride of the tokens before the last scale, so the last scale's keys/values of layer l land where layer l-1's
cache lay. Checked two ways: a simulation of every write and read of a generation (random depths and
schedules: each read sees only its own layer's writes), and generations (PyTorch backend, tiny Infinity and
tiny HART, the policies whose layers run through different paths) giving the same bits and images as with
disjoint per-layer caches; the buffer is depth * (total - last) + last tokens long."""
from __future__ import annotations

import numpy as np
import pytest
import torch

import toprovar.runtime.orchestrator as orch_mod
from toprovar.benchmark.e2e import operating_point
from toprovar.pipeline import Pipeline, resolve_schedule
from toprovar.policy import ToProVARConfig, ToProVARPolicy, make_policy
from toprovar.runtime.orchestrator import kv_layout


def test_every_read_sees_only_its_own_layers_writes():
    """Layers 0..D-1 run in order at every scale; layer l reads its window [0, fill + n) after writing
    [fill, fill + n). Tokens are tagged (layer, position): a read must find exactly its own tags."""
    rng = np.random.default_rng()
    for _ in range(200):
        depth = int(rng.integers(1, 9))
        sizes = [int(v) for v in rng.integers(1, 40, size=int(rng.integers(1, 7)))]
        total = sum(sizes)
        offsets, length = kv_layout(depth, total, sizes[-1])
        assert length == depth * (total - sizes[-1]) + sizes[-1]
        assert min(offsets) == 0 and max(o + total for o in offsets) == length
        buf = np.full((length, 2), -1)
        fill = [0] * depth
        for n in sizes:
            for layer in range(depth):
                o, f = offsets[layer], fill[layer]
                buf[o + f:o + f + n] = np.stack([np.full(n, layer), np.arange(f, f + n)], axis=1)
                seen = buf[o:o + f + n]
                assert (seen[:, 0] == layer).all() and (seen[:, 1] == np.arange(f + n)).all(), (depth, sizes, layer)
                fill[layer] = f + n


def test_layout_rejects_a_last_scale_larger_than_the_cache():
    with pytest.raises(ValueError, match="kv_layout"):
        kv_layout(4, 10, 11)


def _disjoint(depth: int, total: int, last: int) -> tuple[list[int], int]:
    return [layer * total for layer in range(depth)], depth * total


def _policies(pipe) -> dict:
    sched = resolve_schedule(pipe.cfg, None, 1.0)
    pinned = ToProVARPolicy(ToProVARConfig(stage="full", **operating_point(pipe.cfg.depth, len(sched))))
    return {"none": lambda: make_policy("none"), "toprovar": lambda: make_policy("toprovar"),
            "pinned": lambda: pinned, "fastvar": lambda: make_policy("fastvar"),
            "skipvar": lambda: make_policy("skipvar")}


@pytest.mark.parametrize("model", ["tiny", "hart-tiny"])
def test_generations_equal_disjoint_caches(model, monkeypatch):
    pipe = Pipeline.load(model, seed=0)
    prompts = ["a red fox", "two green cubes"]
    seeds = [int(s) for s in np.random.default_rng().integers(0, 2**31, size=2)]
    for name, policy in _policies(pipe).items():
        got = pipe.generate(prompts, seed=seeds, policy=policy(), progress=False)
        with monkeypatch.context() as m:
            m.setattr(orch_mod, "kv_layout", _disjoint)
            ref = pipe.generate(prompts, seed=seeds, policy=policy(), progress=False)
        assert all(torch.equal(a, b) for a, b in zip(got.bits, ref.bits)), f"{model} {name}: bits differ"
        assert torch.equal(got.images, ref.images), f"{model} {name}"


def test_cache_buffers_are_the_shared_layouts_size():
    """tiny at its default schedule, batch 2 + CFG (4 rows): each of the K and V buffers holds
    depth * (total - last) + last tokens, (total - last) * (depth - 1) fewer than disjoint caches."""
    pipe = Pipeline.load("tiny", seed=0)
    pipe.generate(["a", "b"], seed=[1, 2], policy=make_policy("none"), progress=False)
    orch = next(iter(pipe._orchestrators.values()))
    sched = resolve_schedule(pipe.cfg, None, 1.0)
    total, last = sum(h * w for h, w in sched), sched[-1][0] * sched[-1][1]
    cfg = pipe.cfg
    per_token = 4 * cfg.num_heads * cfg.head_dim
    sizes = {n: int(numel) for n, _, _, numel in orch.ws.addresses() if n in ("cache_k", "cache_v")}
    assert sizes == {"cache_k": per_token * (cfg.depth * (total - last) + last),
                     "cache_v": per_token * (cfg.depth * (total - last) + last)}
    assert not any(n.startswith("cache_k") and n != "cache_k" for n, *_ in orch.ws.addresses())
