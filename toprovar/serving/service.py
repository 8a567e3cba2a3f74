"""What one model instance serves, independent of Triton: request validation, batched generation, failure
isolation.

``ImageModel`` opens a pipeline model (``--model NAME``, as ``toprovar generate``) or an export directory
(``--engine-dir DIR --backend ...``) on one device and generates uint8 images for a batch of prompts, each
with its own seed and CFG scale, under one policy. ``ImageService.run`` takes the rows of a dynamic batch:
rows are grouped by policy (one batched generation per policy, at most ``max_batch`` rows each); when a
batched generation fails (out of memory, ...) its rows are retried one by one so that only the failing row
fails.

Batch buckets (``batch_buckets``): whole-scale CUDA graphs are captured per batch size, so a server that
generated every size its dynamic batcher forms (1 .. max batch) would warm up, capture and hold a graph plan
for each (and for each text length). With buckets, a batch of a graphed (static) policy is padded up to the
next bucket with copies of its last row, whose images are dropped, and its text features up to a length bucket
(masked positions): a row's image does not depend on its batch-mates for those policies (docs/runtime.md
"Batches"), so the answers are unchanged. A batch is first split into bucket-sized pieces that pad the fewest
rows (``split``: 11 rows with buckets 1, 2, 4, 8, 16 run as 8 + 2 + 1, not as 16), generated one after another:
on the H200 an image costs at most 16% more at batch 1 than at batch 16, while padding costs up to 2x. Policies
whose decisions read device values are not graphed and never padded or split.

Warm-up (``ImageService.warm_up``, ``toprovar serve --warmup``): before the instance reports ready, each named
graphed policy generates every bucket twice (the eager warm-up, then the capture), the largest bucket first so
that the buffers reach their final size before any plan is bound to them. Requests then replay graphs from the
first one, for prompts of the shortest text-length bucket (``TEXT_BUCKET_MIN`` tokens; longer prompts still
capture on first use).
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
import torch

from toprovar.images import to_uint8
from toprovar.model.text import tokenize_batch
from toprovar.policy import POLICIES, Policy, ToProVARConfig, ToProVARPolicy, make_policy

#: ToProVAR at the pinned operating point of the benchmarks (``toprovar.benchmark.e2e.operating_point``)
PINNED = "toprovar-pinned"
POLICY_NAMES = tuple(sorted(POLICIES)) + (PINNED,)
MAX_SEED = 2**63 - 1
WARMUP_PROMPT = "warm-up"  # the warm-up generations' prompt: the shortest text-length bucket
# Shortest text-length bucket. The H200 server run with buckets from 16 up warmed its plans at 16 tokens while the
# benchmark's prompts (29 byte tokens) ran at 32: every plan was warmed up and captured again under load. The
# padded positions are masked; at 128 text tokens cross-attention is ~0.1% of the 2B model's FLOPs.
TEXT_BUCKET_MIN = 128


def default_buckets(max_batch: int) -> list[int]:
    """Powers of two below ``max_batch``, then ``max_batch``: 16 -> [1, 2, 4, 8, 16], 12 -> [1, 2, 4, 8, 12]."""
    out = [1 << i for i in range(max_batch.bit_length()) if 1 << i < max_batch]
    return out + [max_batch]


def parse_buckets(text: str, max_batch: int) -> list[int] | str | None:
    """``--batch-buckets``: "auto" (``default_buckets`` where scale graphs run), "off" (None), or sizes
    "1,2,4,8" (sorted, each in 1..max_batch; max_batch is added). ValueError naming the flag otherwise."""
    text = text.strip()
    if text in ("auto", "off"):
        return None if text == "off" else "auto"
    try:
        sizes = sorted({int(v) for v in text.split(",") if v.strip()})
    except ValueError:
        raise ValueError(f"--batch-buckets: {text!r} is not auto, off or a list of batch sizes like 1,2,4,8") from None
    if not sizes or sizes[0] < 1 or sizes[-1] > max_batch:
        raise ValueError(f"--batch-buckets: sizes must be in 1..{max_batch} (--max-batch), got {text!r}")
    return sizes + ([max_batch] if sizes[-1] < max_batch else [])


class RequestError(ValueError):
    """A request the server rejects (one line naming the input and the problem)."""


@dataclass(frozen=True)
class Row:
    """One prompt to generate: the prompt, its seed, CFG scale and policy name (validated)."""
    prompt: str
    seed: int
    cfg: float
    policy: str


def serving_policy(name: str, depth: int, num_scales: int, calibration: str | None = None) -> Policy:
    """A fresh policy object for one generation (``POLICY_NAMES``; ``toprovar-pinned``: the pinned point)."""
    if name == PINNED:
        from toprovar.benchmark.e2e import operating_point
        return ToProVARPolicy(ToProVARConfig(stage="full", **operating_point(depth, num_scales)))
    return make_policy(name, calibration)


class ImageModel:
    """A pipeline model or an export directory on one device: ``generate(rows, policy) -> (B, H, W, 3) uint8``."""

    def __init__(self, *, model: str | None = None, engine_dir: str | None = None, backend: str = "torch",
                 device: str = "cpu", dtype: str = "float32", resolution: int | None = None,
                 weights_seed: int = 0, checkpoint: str | None = None, vae: str | None = None,
                 t5: str | None = None, calibration: str | None = None, compile: bool = False,
                 random_text_encoder: bool = False):
        self.device, self.resolution, self.calibration = device, resolution, calibration
        if engine_dir:
            from toprovar.runtime.engine_dir import EngineRuntime
            self.rt = EngineRuntime.open(engine_dir, backend, device, checkpoint=checkpoint, vae=vae, t5=t5)
            self.rt.check_request(resolution, None)
            self.cfg, self.schedule, self.max_batch = self.rt.cfg, self.rt.schedule, self.rt.max_batch
            self.text_encoder = self.rt.text_encoder
            self.label = f"{engine_dir} on {backend}"
        else:
            from toprovar.cli_args import DTYPES
            from toprovar.config import get_config
            from toprovar.pipeline import Pipeline, resolve_schedule
            # a model whose text encoder is a real download (flan-t5-xl) and no --t5: the random stand-in below
            own_te = bool(t5) or get_config(model or "shapes").text_encoder in ("tiny", "tiny-qwen2")
            self.rt = Pipeline.load(model or "shapes", checkpoint=checkpoint, vae=vae, t5=t5, device=device,
                                    dtype=DTYPES[dtype], seed=weights_seed,
                                    text_encoder=own_te or not random_text_encoder)
            self.rt.compile = compile
            self.cfg, self.max_batch = self.rt.cfg, None
            self.schedule = resolve_schedule(self.cfg, resolution, 1.0)
            # whole-scale CUDA graphs are planned per batch size (and text length): keep one per dynamic batch size
            # (ImageService's batch buckets keep them few; a capture out of memory drops the others first)
            self.rt.orchestrator(self.schedule).graphs.max_plans = 32
            self.text_encoder = self.rt.text_encoder
            self.label = f"model {self.cfg.name} (PyTorch)"
        if self.text_encoder is None and random_text_encoder and not engine_dir:
            # benchmarks with random weights: a random 2-layer T5 of the model's text width stands in for flan-t5-xl
            from toprovar.model.text import tiny_text_encoder
            self.rt.text_encoder = tiny_text_encoder(self.cfg.text_channels, self.cfg.text_maxlen,
                                                     seed=weights_seed).to(device)
            self.text_encoder = self.rt.text_encoder
        if self.text_encoder is None:
            raise ValueError("serve: this model has no text encoder (pass --t5 DIR; benchmarks with random weights: "
                             "--random-text-encoder)")

    def check_prompt(self, prompt: str) -> None:
        """RequestError unless ``prompt`` fits the text encoder."""
        te = self.text_encoder
        try:
            tokenize_batch(te.tokenize, [prompt], te.max_length, te.label)
        except ValueError as exc:
            raise RequestError(str(exc).replace("--prompt:", "prompt:", 1)) from None

    def policy(self, name: str) -> Policy:
        return serving_policy(name, self.cfg.depth, len(self.schedule), self.calibration)

    def text_bucket(self, length: int) -> int:
        """The text length a graphed batch is padded to: ``TEXT_BUCKET_MIN`` or the next power of two above it,
        at most the model's ``text_maxlen`` (a scale-graph plan is keyed by the text length too, so most prompts
        share one plan, the one the warm-up captured)."""
        bucket = TEXT_BUCKET_MIN
        while bucket < length:
            bucket *= 2
        return max(length, min(bucket, self.cfg.text_maxlen))

    def generate(self, rows: Sequence[Row], pad_to: int | None = None) -> np.ndarray:
        """One batched generation of rows sharing a policy -> (B, H, W, 3) uint8. ``pad_to``: generate that
        many rows, the last row repeated, with the text features padded to ``text_bucket`` (positions past
        each row's length are masked), and return the first B images."""
        rows = list(rows)
        n = len(rows)
        if pad_to is not None and pad_to > n:
            rows += [rows[-1]] * (pad_to - n)
        kw = dict(seed=[r.seed for r in rows], row_cfg=[r.cfg for r in rows], policy=self.policy(rows[0].policy),
                  progress=False)
        prompts = [r.prompt for r in rows]
        if self.max_batch is not None:  # an export directory's runtime
            res = self.rt.generate(prompts, **kw)
        elif pad_to is None:
            res = self.rt.generate(prompts, resolution=self.resolution, **kw)
        else:
            text, lengths = self.text_encoder.encode(prompts)
            text = torch.nn.functional.pad(text, (0, 0, 0, self.text_bucket(text.shape[1]) - text.shape[1]))
            res = self.rt.generate_from_features(text, lengths, resolution=self.resolution, **kw)
        return to_uint8(res.images[:n])


class ImageService:
    """Validation and batched generation for one model instance."""

    def __init__(self, model: ImageModel, default_policy: str = "none", max_batch: int | None = None,
                 batch_buckets: Sequence[int] | None = None):
        """batch_buckets: sizes to pad static-policy batches up to (``toprovar serve --batch-buckets``,
        resolved by ``toprovar.serving.server.batch_buckets``), or None."""
        if default_policy not in POLICY_NAMES:
            raise ValueError(f"--policy: unknown policy {default_policy!r}; choose from {list(POLICY_NAMES)}")
        self.model, self.default_policy = model, default_policy
        limits = [m for m in (max_batch, model.max_batch) if m]
        self.max_batch = min(limits) if limits else None
        self.buckets = sorted(batch_buckets) if batch_buckets else None
        self._static: dict[str, bool] = {}

    def pad_to(self, n: int, policy: str) -> int | None:
        """The bucket a batch of n rows of ``policy`` is padded to (None: not padded)."""
        if not self.buckets:
            return None
        if policy not in self._static:
            self._static[policy] = self.model.policy(policy).plan_key() is not None
        if not self._static[policy]:
            return None
        return next((b for b in self.buckets if b >= n), None)

    def split(self, n: int, policy: str) -> list[int] | None:
        """The buckets n rows of ``policy`` run as, one generation each, largest first (None: one unpadded
        generation of n rows): the fewest padded rows, then the fewest pieces. Buckets 1, 2, 4, 8, 16: 11 ->
        [8, 2, 1], 16 -> [16]; buckets 4, 8: 5 -> [8], 9 -> [8, 4]."""
        if self.pad_to(1, policy) is None:
            return None
        best: list[tuple[int, int, list[int]]] = [(0, 0, [])]  # per row count: (rows generated, pieces, buckets)
        for m in range(1, n + 1):
            rows, count, sizes = min((best[max(0, m - b)][0] + b, best[max(0, m - b)][1] + 1,
                                      [b] + best[max(0, m - b)][2]) for b in self.buckets)
            best.append((rows, count, sorted(sizes, reverse=True)))
        return best[n][2]

    def warm_up(self, policies: Sequence[str], on_plan: Callable[[str, int, float], None] | None = None
                ) -> list[tuple[str, int]]:
        """Generate each bucket twice for every graphed policy of ``policies`` (largest bucket first), so that
        requests replay scale graphs from the start; returns the (policy, bucket) plans warmed and calls
        ``on_plan(policy, bucket, seconds)`` after each. Policies that are not graphed, or no buckets: nothing
        to do."""
        warmed = []
        for name in policies:
            for bucket in sorted(self.buckets or [], reverse=True):
                if self.pad_to(bucket, name) is None:
                    break
                t0 = time.monotonic()
                rows = [Row(WARMUP_PROMPT, 0, float(self.model.cfg.default_cfg), name)] * bucket
                for _ in range(2):  # the eager warm-up, then the capture
                    self.model.generate(rows, bucket)
                warmed.append((name, bucket))
                if on_plan:
                    on_plan(name, bucket, time.monotonic() - t0)
        return warmed

    def parse(self, prompt, seed=None, cfg=None, policy=None) -> Row:
        """One row from a request's values (bytes or str prompt/policy, int seed, float cfg; None: default)."""
        if isinstance(prompt, (bytes, np.bytes_)):
            try:
                prompt = bytes(prompt).decode("utf-8")
            except UnicodeDecodeError:
                raise RequestError("prompt: not valid UTF-8") from None
        if not isinstance(prompt, str) or not prompt.strip():
            raise RequestError("prompt: empty; send one non-empty string per request")
        self.model.check_prompt(prompt)
        seed = 0 if seed is None else int(seed)
        if not 0 <= seed <= MAX_SEED:
            raise RequestError(f"seed: {seed} is out of range [0, 2^63 - 1]")
        cfg = float(self.model.cfg.default_cfg) if cfg is None else float(cfg)
        if not math.isfinite(cfg) or cfg < 0:
            raise RequestError(f"cfg: must be a finite number >= 0, got {cfg}")
        if isinstance(policy, (bytes, np.bytes_)):
            policy = bytes(policy).decode("utf-8", errors="replace")
        policy = policy.strip() if policy else self.default_policy
        if policy not in POLICY_NAMES:
            raise RequestError(f"policy: unknown policy {policy!r}; choose from {', '.join(POLICY_NAMES)}")
        return Row(prompt, seed, cfg, policy)

    def run(self, rows: Sequence[Row], on_error: Callable[[BaseException], None] | None = None
            ) -> list[np.ndarray | Exception]:
        """Generate every row: (H, W, 3) uint8 or the exception that row failed with. Rows are grouped by
        policy into batched generations of at most ``max_batch`` (with buckets: split into bucket-sized pieces,
        ``split``); a failed generation is retried row by row."""
        out: list[np.ndarray | Exception | None] = [None] * len(rows)
        by_policy: dict[str, list[int]] = {}
        for i, r in enumerate(rows):
            by_policy.setdefault(r.policy, []).append(i)
        for policy, idx in by_policy.items():
            step = self.max_batch or len(idx)
            pieces = []  # (row indices, bucket or None)
            for k in range(0, len(idx), step):
                chunk = idx[k:k + step]
                sizes = self.split(len(chunk), policy)
                if sizes is None:
                    pieces.append((chunk, None))
                for size in sizes or []:
                    pieces.append((chunk[:size], size))
                    chunk = chunk[size:]
            for chunk, pad in pieces:
                try:
                    images = self.model.generate([rows[i] for i in chunk], pad)
                    for i, img in zip(chunk, images):
                        out[i] = img
                    continue
                except Exception as exc:  # noqa: BLE001  (isolate the failing row below)
                    _recover()
                    if on_error:
                        on_error(exc)
                    if len(chunk) == 1:
                        out[chunk[0]] = exc
                        continue
                for i in chunk:  # batch-mates of a failure: one by one, so only the failing row fails
                    try:
                        out[i] = self.model.generate([rows[i]], self.pad_to(1, rows[i].policy))[0]
                    except Exception as exc:  # noqa: BLE001
                        _recover()
                        out[i] = exc
        return out  # type: ignore[return-value]


def _recover() -> None:
    """After a failed generation: free cached device memory (an out-of-memory batch leaves it fragmented)."""
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def one_line(exc: BaseException) -> str:
    """The first line of an exception's message (its type name when empty)."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
