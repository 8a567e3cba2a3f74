"""What one model instance does with a dynamic batch, without Triton: request validation (one line naming the
input), grouping by policy, and failure isolation (a failing batch is retried row by row, only the failing
row fails). Tiny model, CPU."""
from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from toprovar.serving.service import ImageModel, ImageService, RequestError, Row


class FailsOn(ImageModel):
    """The real model, except that a generation containing ``prompt`` runs out of device memory (injected)."""

    bad_prompt = "this prompt runs out of memory"
    calls: list

    def generate(self, rows, pad_to=None):
        self.calls.append([r.prompt for r in rows])
        if any(r.prompt == self.bad_prompt for r in rows):
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return super().generate(rows, pad_to)


@pytest.fixture(scope="module")
def model():
    m = FailsOn(model="tiny", device="cpu")
    m.calls = []
    return m


def test_validation_names_the_input(model):
    svc = ImageService(model, "none")
    assert svc.parse(b"a red fox", np.int64(5), np.float32(2.5), b"skipvar") == Row("a red fox", 5, 2.5, "skipvar")
    assert svc.parse("a red fox") == Row("a red fox", 0, model.cfg.default_cfg, "none")
    for args, message in [((b"",), "prompt: empty"), ((b"   ",), "prompt: empty"),
                          ((b"\xff\xfe",), "prompt: not valid UTF-8"),
                          (("x" * 100,), "prompt: 101 tokens exceed the tiny (random) text encoder's limit of 64"),
                          (("a", -1), "seed: -1 is out of range"),
                          (("a", None, float("nan")), "cfg: must be a finite number >= 0, got nan"),
                          (("a", None, float("inf")), "cfg: must be a finite number >= 0, got inf"),
                          (("a", None, -0.5), "cfg: must be a finite number >= 0, got -0.5"),
                          (("a", None, None, b"bogus"), "policy: unknown policy 'bogus'")]:
        with pytest.raises(RequestError) as err:
            svc.parse(*args)
        assert str(err.value).startswith(message) and "\n" not in str(err.value), (args, str(err.value))
    with pytest.raises(ValueError, match="--policy: unknown policy 'nope'"):
        ImageService(model, "nope")


def test_failing_row_fails_alone_and_policies_run_apart(model):
    svc = ImageService(model, "none", max_batch=8)
    seed = int.from_bytes(os.urandom(3), "little")
    rows = [Row("a red fox", seed, 3.0, "none"), Row(FailsOn.bad_prompt, seed + 1, 3.0, "none"),
            Row("a yellow circle", seed + 2, 3.0, "none"), Row("a blue square", seed + 3, 2.0, "skipvar")]
    model.calls.clear()
    out = svc.run(rows)
    assert isinstance(out[1], torch.OutOfMemoryError)
    # one batched generation per policy; the failed batch again row by row
    assert model.calls == [["a red fox", FailsOn.bad_prompt, "a yellow circle"], ["a red fox"],
                           [FailsOn.bad_prompt], ["a yellow circle"], ["a blue square"]]
    side = max(model.schedule[-1]) * 4  # the tiny VAE's stride
    for i in (0, 2, 3):  # rows 0 and 2: their images from the row-by-row retry
        assert isinstance(out[i], np.ndarray) and out[i].dtype == np.uint8 and out[i].shape == (side, side, 3), i


def test_buckets_split_and_pad_graphed_policies_and_keep_each_rows_image(model, monkeypatch):
    """With batch buckets, a batch of a static (graphable) policy runs as bucket-sized pieces (the fewest padded
    rows, then the fewest pieces), a piece padded to its bucket with copies of its last row and its text
    features padded to a length bucket, and each request still gets the image it gets alone (tiny model, CPU
    float32, bit for bit); a policy whose decisions read device values (adaptive ToProVAR: rows share D and kept
    counts) is never split or padded."""
    from toprovar.serving.service import default_buckets, parse_buckets
    assert default_buckets(16) == [1, 2, 4, 8, 16] and default_buckets(6) == [1, 2, 4, 6] and default_buckets(1) == [1]
    assert parse_buckets("auto", 8) == "auto" and parse_buckets("off", 8) is None
    assert parse_buckets("2, 4", 8) == [2, 4, 8]
    assert [model.text_bucket(n) for n in (1, 16, 17, 33, 64)] == [64] * 5  # tiny: text_maxlen 64
    import dataclasses
    with monkeypatch.context() as m:  # a model with 512 text tokens (Infinity's T5): 128, 256, 512
        m.setattr(model, "cfg", dataclasses.replace(model.cfg, text_maxlen=512))
        assert [model.text_bucket(n) for n in (1, 128, 129, 300, 512)] == [128, 128, 256, 512, 512]
    shapes = []
    real = model.rt.generate_from_features
    monkeypatch.setattr(model.rt, "generate_from_features",
                        lambda text, lengths, *a, **kw: shapes.append(tuple(text.shape[:2])) or real(text, lengths,
                                                                                                        *a, **kw))
    svc = ImageService(model, "none", max_batch=4, batch_buckets=[1, 2, 4])
    assert [svc.split(n, "none") for n in range(1, 5)] == [[1], [2], [2, 1], [4]]
    assert svc.split(3, "toprovar") is None
    alone = ImageService(model, "none")
    seed = int.from_bytes(os.urandom(3), "little")
    prompts = ["a red fox", "a yellow circle beside a tall tree", "a blue square"]  # 10, 35, 14 tokens
    split, padded = [(2, 64), (1, 64)], [(4, 64)]
    for policy, buckets, generated in [("none", [1, 2, 4], split), ("toprovar-pinned", [1, 2, 4], split),
                                       ("fastvar", [1, 2, 4], split), ("none", [2, 4], padded),
                                       ("toprovar", [1, 2, 4], [(3, 35)])]:
        rows = [Row(p, seed + i, 3.0 - i / 2, policy) for i, p in enumerate(prompts)]
        shapes.clear()
        out = ImageService(model, "none", max_batch=4, batch_buckets=buckets).run(rows)
        assert shapes == generated, (policy, buckets, shapes)
        # bucketed: each row as it is alone; not bucketed (its rows share decisions): as the unbucketed batch
        expect = ([alone.run([r])[0] for r in rows] if generated[0][1] == 64
                  else ImageService(model, "none", 4).run(rows))
        for r, img, ref in zip(rows, out, expect):
            assert np.array_equal(img, ref), (policy, r)


def test_warm_up_generates_each_bucket_twice_largest_first_for_graphed_policies(model, monkeypatch):
    """``warm_up``: every bucket twice (eager warm-up, then capture), the largest first, padded like a request
    batch; a policy that reads device values (adaptive ToProVAR) is not graphed and not warmed; no buckets,
    nothing."""
    calls = []
    real = ImageModel.generate
    monkeypatch.setattr(model, "generate", lambda rows, pad_to=None: calls.append((rows[0].policy, len(rows), pad_to))
                        or real(model, rows, pad_to))
    svc = ImageService(model, "none", max_batch=4, batch_buckets=[1, 2, 4])
    assert svc.warm_up(["none", "toprovar", "toprovar-pinned"]) == [
        ("none", 4), ("none", 2), ("none", 1), ("toprovar-pinned", 4), ("toprovar-pinned", 2), ("toprovar-pinned", 1)]
    assert calls == [(p, b, b) for p in ("none", "toprovar-pinned") for b in (4, 4, 2, 2, 1, 1)]
    calls.clear()
    assert ImageService(model, "none", max_batch=4).warm_up(["none"]) == [] and calls == []
