"""HART's hybrid tokenizer at inference: the codebook with its quant_resi convolutions (the discrete path of the
next-scale input) and the decoder (VAR-style convolutional decoder with self-attention at the lowest resolution).

Checkpoint (``tokenizer/`` of the release: ``HARTAutoEncoderWithDisc``, keys under ``vae.``): ``quantize.embedding``
(V, Cvae), ``quantize.quant_resi.qresi_ls.{0..3}`` (3x3 convs, partially shared over the scales),
``post_quant_conv``, ``decoder.*``; the encoder, ``quant_conv``, ``decoder2``/``post_quant_conv2``, the
discriminator and the usage statistics are not needed for generation and are skipped (and listed nowhere else).
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from ..checkpoint import CheckpointError, check_state_dict, read_state_dict

QUANT_RESI = 0.5
IGNORED_PREFIXES = ("encoder.", "quant_conv.", "decoder2.", "post_quant_conv2.", "disc.", "quantize.ema_vocab_hit_SV")


@dataclass(frozen=True)
class HartVAEConfig:
    """Decoder architecture: z channels (Cvae), base channels, per-level multipliers, residual blocks per level."""
    name: str
    z_channels: int
    ch: int
    ch_mult: tuple[int, ...]
    num_res_blocks: int = 2

    @property
    def stride(self) -> int:
        return 2 ** (len(self.ch_mult) - 1)


HART_VAE_CONFIGS = {
    "hart-1024": HartVAEConfig("hart-1024", 32, 160, (1, 1, 2, 2, 4)),
    "hart-tiny": HartVAEConfig("hart-tiny", 8, 32, (1, 1, 2)),
}


class Phi(nn.Conv2d):
    """h * (1 - r) + conv3x3(h) * r, r = 0.5."""

    def __init__(self, channels: int):
        super().__init__(channels, channels, 3, padding=1)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return h * (1 - QUANT_RESI) + super().forward(h) * QUANT_RESI


class _PartiallyShared(nn.Module):
    def __init__(self, channels: int, k: int = 4):
        super().__init__()
        self.qresi_ls = nn.ModuleList(Phi(channels) for _ in range(k))
        ticks = np.linspace(1 / 3 / k, 1 - 1 / 3 / k, k) if k == 4 else np.linspace(1 / 2 / k, 1 - 1 / 2 / k, k)
        self.ticks = tuple(float(t) for t in ticks)  # the official float64 ticks, as Python floats

    def at(self, frac: float) -> Phi:
        """The convolution of relative scale position ``frac`` in [0, 1] (nearest tick, the first on a tie as
        the official ``np.argmin``; plain Python: no numpy in the scale loop, nothing for torch.compile to
        break on)."""
        dist = [abs(t - frac) for t in self.ticks]
        return self.qresi_ls[dist.index(min(dist))]


class HybridQuantizer(nn.Module):
    """The codebook (V, Cvae) and quant_resi; the generation-time next-scale accumulation."""

    def __init__(self, vocab_size: int, channels: int):
        super().__init__()
        self.embedding = nn.Embedding(vocab_size, channels)
        self.quant_resi = _PartiallyShared(channels)

    def accumulate(self, summed: torch.Tensor, codes: torch.Tensor, si: int, num_scales: int) -> torch.Tensor:
        """summed (B, Cvae, G, G) + scale ``si``'s codes (B, Cvae, pn, pn): bicubic to G, quant_resi (not at the
        last scale, where codes are already G x G and are added as they are)."""
        if si == num_scales - 1:
            return summed + codes
        up = F.interpolate(codes, size=tuple(summed.shape[-2:]), mode="bicubic")
        return summed + self.quant_resi.at(si / (num_scales - 1))(up)


def _norm(c: int) -> nn.GroupNorm:
    return nn.GroupNorm(32, c, eps=1e-6)


class ResnetBlock(nn.Module):
    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.norm1, self.conv1 = _norm(cin), nn.Conv2d(cin, cout, 3, padding=1)
        self.norm2, self.conv2 = _norm(cout), nn.Conv2d(cout, cout, 3, padding=1)
        self.nin_shortcut = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x):
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        return self.nin_shortcut(x) + h


class AttnBlock(nn.Module):
    """Single-head self-attention over the positions, fused qkv 1x1 conv."""

    def __init__(self, c: int):
        super().__init__()
        self.norm = _norm(c)
        self.qkv = nn.Conv2d(c, 3 * c, 1)
        self.proj_out = nn.Conv2d(c, c, 1)

    def forward(self, x):
        B, C, H, W = x.shape
        q, k, v = self.qkv(self.norm(x)).reshape(B, 3, 1, C, H * W).unbind(1)  # one head: (B, 1, C, HW)
        o = F.scaled_dot_product_attention(q.transpose(2, 3), k.transpose(2, 3), v.transpose(2, 3), scale=C ** -0.5)
        return x + self.proj_out(o.transpose(2, 3).reshape(B, C, H, W))


class Upsample(nn.Module):
    def __init__(self, c: int):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, padding=1)

    def forward(self, x):
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class _Level(nn.Module):
    def __init__(self, blocks, attn, upsample):
        super().__init__()
        self.block = nn.ModuleList(blocks)
        self.attn = nn.ModuleList(attn)
        if upsample is not None:
            self.upsample = upsample


class _Mid(nn.Module):
    def __init__(self, c: int):
        super().__init__()
        self.block_1, self.attn_1, self.block_2 = ResnetBlock(c, c), AttnBlock(c), ResnetBlock(c, c)


class Decoder(nn.Module):
    """z (B, Cvae, h, w) -> image (B, 3, h*s, w*s); attention in every block of the lowest-resolution level and in
    the middle."""

    def __init__(self, cfg: HartVAEConfig):
        super().__init__()
        n = len(cfg.ch_mult)
        c = cfg.ch * cfg.ch_mult[-1]
        self.conv_in = nn.Conv2d(cfg.z_channels, c, 3, padding=1)
        self.mid = _Mid(c)
        levels = [None] * n
        for lvl in reversed(range(n)):
            cout = cfg.ch * cfg.ch_mult[lvl]
            blocks, attn = [], []
            for _ in range(cfg.num_res_blocks + 1):
                blocks.append(ResnetBlock(c, cout))
                c = cout
                if lvl == n - 1:
                    attn.append(AttnBlock(c))
            levels[lvl] = _Level(blocks, attn, Upsample(c) if lvl != 0 else None)
        self.up = nn.ModuleList(levels)
        self.norm_out = _norm(c)
        self.conv_out = nn.Conv2d(c, 3, 3, padding=1)

    def forward(self, z):
        h = self.mid.block_2(self.mid.attn_1(self.mid.block_1(self.conv_in(z))))
        for lvl in reversed(range(len(self.up))):
            up = self.up[lvl]
            for i, blk in enumerate(up.block):
                h = blk(h)
                if len(up.attn):
                    h = up.attn[i](h)
            if lvl != 0:
                h = up.upsample(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class HartDecoder(nn.Module):
    """summed codes (B, Cvae, G, G) -> image (B, 3, G*s, G*s) float32 in [-1, 1] (``post_quant_conv``, decoder,
    clamp: the official ``fhat_to_img``)."""

    def __init__(self, cfg: HartVAEConfig):
        super().__init__()
        self.cfg = cfg
        self.post_quant_conv = nn.Conv2d(cfg.z_channels, cfg.z_channels, 3, padding=1)
        self.decoder = Decoder(cfg)

    def forward(self, summed: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.post_quant_conv(summed)).clamp(-1, 1)


def read_tokenizer_state(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The tokenizer's state dict with the ``vae.`` prefix removed; a directory means its model.safetensors."""
    path = Path(path)
    if path.is_dir():
        cands = [path / n for n in ("model.safetensors", "pytorch_model.bin")]
        found = [c for c in cands if c.is_file()]
        if not found:
            raise CheckpointError(f"{path}: no model.safetensors in this tokenizer directory")
        path = found[0]
    sd = read_state_dict(path)
    if any(k.startswith("vae.") for k in sd):
        sd = {k.removeprefix("vae."): v for k, v in sd.items() if k.startswith("vae.")}
    return sd


def build_hart_decoder(name: str, seed: int | None = 0) -> HartDecoder:
    """A decoder with random weights from ``seed`` (deterministic)."""
    state = torch.random.get_rng_state()
    if seed is not None:
        torch.manual_seed(seed)
    try:
        dec = HartDecoder(HART_VAE_CONFIGS[name])
    finally:
        torch.random.set_rng_state(state)
    return dec.eval().requires_grad_(False)


def load_hart_decoder(path: str | os.PathLike, name: str) -> HartDecoder:
    """Strictly load ``post_quant_conv.*`` and ``decoder.*`` of a tokenizer checkpoint (other known parts skipped,
    anything else is an error naming it)."""
    sd = read_tokenizer_state(path)
    keep = {k: v for k, v in sd.items() if not k.startswith(IGNORED_PREFIXES) and not k.startswith("quantize.")}
    dec = HartDecoder(HART_VAE_CONFIGS[name])
    check_state_dict(dec, keep, str(path))
    dec.load_state_dict(keep, strict=True)
    return dec.eval().requires_grad_(False)
