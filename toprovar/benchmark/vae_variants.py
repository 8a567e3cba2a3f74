"""VAE decoder execution variants timed by bench/vae_decode.py and checked by bench/vae_fidelity.py.

A variant = compute dtype x upsample layout (plain "nearest x2 + conv" or subpixel) x memory format x
torch.compile; all run the same weights (``BSQDecoder.set_layout``).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

from ..cli_args import DTYPES
from ..model.vae import BSQDecoder


@dataclass(frozen=True)
class Variant:
    dtype: str = "float32"
    subpixel: bool = False
    channels_last: bool = False
    compiled: bool = False

    @property
    def label(self) -> str:
        return " ".join([self.dtype, "subpixel" if self.subpixel else "plain"]
                        + ["channels-last"] * self.channels_last + ["compiled"] * self.compiled)

    def as_dict(self) -> dict:
        return asdict(self)


REFERENCE = Variant()  # float32, plain, contiguous, eager: what every variant is compared with


def variants() -> list[Variant]:
    """All 24 variants, most informative first (a time budget cuts the tail): the reference, the bfloat16
    candidates for the default (eager, then compiled), float16, float32 subpixel, then the rest."""
    V = Variant
    first = [REFERENCE, V("bfloat16", True), V("bfloat16"), V("bfloat16", True, False, True), V("float16", True),
             V("float32", True), V("bfloat16", False, False, True), V("float16", True, False, True),
             V("bfloat16", True, True), V("bfloat16", True, True, True), V("float32", True, False, True)]
    rest = [V(d, s, c, k) for k in (False, True) for d in ("float32", "bfloat16", "float16") for s in (False, True)
            for c in (False, True)]
    return first + [v for v in rest if v not in first]


def pick(labels: str | None) -> list[Variant]:
    """``variants()`` in order, or those named in ``labels`` (comma-separated ``Variant.label``s, e.g.
    "bfloat16 subpixel compiled,bfloat16 subpixel channels-last compiled"), the reference first (the other
    variants are compared with it). ValueError naming --variants for an unknown label."""
    every = variants()
    if not labels:
        return every
    by_label = {v.label: v for v in every}
    wanted = [w.strip() for w in labels.split(",") if w.strip()]
    bad = [w for w in wanted if w not in by_label]
    if bad or not wanted:
        raise ValueError(f"--variants: {bad[0] if bad else labels!r} is not a variant; choose from "
                         f"{', '.join(by_label)}")
    return [REFERENCE] + [by_label[w] for w in dict.fromkeys(wanted) if by_label[w] != REFERENCE]


def prepare(dec: BSQDecoder, v: Variant, device: torch.device):
    """``dec`` (float32, any layout) set to variant ``v`` on ``device`` -> (callable latent -> image, input
    converter). Re-arranges the subpixel weights in float32 before the cast, as ``load_parts``."""
    dec.set_layout(subpixel=v.subpixel, channels_last=v.channels_last)
    dec = dec.to(device, DTYPES[v.dtype]).eval().requires_grad_(False)
    fmt = torch.channels_last if v.channels_last else torch.contiguous_format
    fn = torch.compile(dec, fullgraph=True, dynamic=False) if v.compiled else dec
    return fn, (lambda z: z.to(device, DTYPES[v.dtype]).contiguous(memory_format=fmt))
