"""PyTorch pipeline: per-scale shapes, determinism, CLI output, clear errors."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from toprovar.cli import main
from toprovar.config import CONFIGS
from toprovar.model.text import PromptTooLongError
from toprovar.images import to_uint8
from toprovar.pipeline import Pipeline
from toprovar.schedule import ScheduleError, get_schedule


@pytest.fixture(scope="module")
def pipe():
    return Pipeline.load("tiny", seed=7)


def test_shapes_per_scale(pipe):
    res = pipe.generate(["a red square", "two blue circles"], seed=3, progress=False)
    sched = get_schedule("0.06M")
    assert len(res.bits) == len(sched)
    for (h, w), bits in zip(sched, res.bits):
        assert bits.shape == (2, h * w, pipe.cfg.token_bits)
        assert set(bits.unique().tolist()) <= {0.0, 1.0}
    side = sched[-1][0] * 4
    assert res.images.shape == (2, 3, side, side)
    assert res.images.min() >= -1 and res.images.max() <= 1
    assert all(res.trace.cfg_batch.values())


def test_deterministic_for_a_seed(pipe):
    a = pipe.generate(["a green triangle"], seed=11, progress=False)
    b = pipe.generate(["a green triangle"], seed=11, progress=False)
    c = pipe.generate(["a green triangle"], seed=12, progress=False)
    assert all(torch.equal(x, y) for x, y in zip(a.bits, b.bits))
    assert torch.equal(a.images, b.images)
    assert not all(torch.equal(x, y) for x, y in zip(a.bits, c.bits))


def test_cfg_one_runs_without_uncond_batch(pipe):
    res = pipe.generate(["a red square"], seed=3, cfg=1.0, progress=False)
    assert not any(res.trace.cfg_batch.values())


def test_cli_writes_png(tmp_path, capsys):
    out = tmp_path / "img.png"
    assert main(["generate", "--model", "tiny", "--prompt", "a yellow circle", "-o", str(out), "--seed", "5",
                 "--profile"]) == 0
    assert str(out) in capsys.readouterr().out
    img = np.asarray(Image.open(out))
    assert img.shape == (64, 64, 3) and img.dtype == np.uint8 and img.std() > 0


def test_errors_are_single_lines(pipe, capsys):
    with pytest.raises(PromptTooLongError, match="exceed"):
        pipe.generate(["x" * 200], progress=False)
    with pytest.raises(ScheduleError, match="resolution: 100 is not in the schedule"):
        pipe.generate(["x"], resolution=100, progress=False)
    assert main(["generate", "--model", "nope", "--prompt", "x"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"toprovar: error: --model: unknown model 'nope'; choose from {sorted(CONFIGS)}"]
    assert {"infinity-2b", "infinity-8b", "shapes", "tiny", "hart-0.7b", "hart-tiny"} <= set(CONFIGS)


def test_to_uint8_range():
    x = torch.tensor([-1.0, 0.0, 1.0]).view(1, 3, 1, 1)
    assert to_uint8(x).ravel().tolist() == [0, 128, 255]


def test_out_of_memory_retries_once_after_freeing_graphs(pipe, monkeypatch):
    """An OutOfMemoryAtScale while graphs hold memory frees them and runs again; without graphs it is raised."""
    from toprovar.runtime.buffers import OutOfMemoryAtScale
    ref = pipe.generate(["a red square"], seed=1, progress=False)
    orch = next(iter(pipe._orchestrators.values()))
    real, calls = orch._generate, []

    def flaky(*a, **kw):
        calls.append(1)
        if len(calls) == 1:
            raise OutOfMemoryAtScale("out of memory at scale 3", "scale 3", 1 << 30)
        return real(*a, **kw)
    monkeypatch.setattr(orch, "_generate", flaky)
    monkeypatch.setattr(orch, "release_graphs", lambda: True)
    res = pipe.generate(["a red square"], seed=1, progress=False)
    assert len(calls) == 2 and all(torch.equal(a, b) for a, b in zip(ref.bits, res.bits))
    calls.clear()
    monkeypatch.setattr(orch, "release_graphs", lambda: False)
    with pytest.raises(OutOfMemoryAtScale):
        pipe.generate(["a red square"], seed=1, progress=False)
    assert len(calls) == 1
