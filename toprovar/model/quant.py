"""Parameter-free multiscale BSQ quantizer pieces: bits -> codes, summed-code accumulation, next input.

Layouts: transformer bits (B, n, token_bits) in {0, 1} for an h x w scale (row-major tokens); codes and
the summed codes live in the VAE latent grid (B, d, H, W) float32. With spatial patchify (8B) a token
holds a 2x2 block of latent positions (token_bits = 4d), un/patchified by pixel (un)shuffle as the
official code does. Resizing is the official trilinear interpolation of the (B, d, 1, H, W) layout.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

def bits_to_codes(bits: torch.Tensor) -> torch.Tensor:
    """Bits (B, h, w, d) in {0, 1} (any int/float/bool dtype) -> codes (B, d, h, w) float32, +-1/sqrt(d).

    Same arithmetic as the official ``indices_to_codes(..., label_type='bit_label')``: +-s with s = 1/sqrt(d),
    then L2-normalised over the d bits (so each entry is +-1/sqrt(d) up to float rounding). The result is a
    channels-last view, the memory layout the official code produces.
    """
    d = bits.shape[-1]
    s = 1.0 / math.sqrt(d)
    codes = F.normalize(bits.to(torch.float32) * s * 2 - s, dim=-1)
    return codes.permute(0, 3, 1, 2)


def upsample_codes(codes: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Resize codes (B, d, h, w) -> (B, d, H, W) (up or down) as the official quantizer's ``z_interplote_up``.

    The official code interpolates the (B, d, 1, h, w) layout with mode 'trilinear' (align_corners=False); on one
    frame this is bilinear interpolation without antialiasing, and it is computed here on the same 5D layout so the
    result is bit-identical. Same dtype as the input.
    """
    return F.interpolate(codes.unsqueeze(2), size=(1, int(size[0]), int(size[1])), mode="trilinear").squeeze(2)


def patchify(x: torch.Tensor) -> torch.Tensor:
    """Channel-first (B, C, 2h, 2w) -> (B, 4C, h, w) by pixel_unshuffle(2) (latent -> 8B transformer tokens)."""
    return F.pixel_unshuffle(x, 2)


def unpatchify(x: torch.Tensor) -> torch.Tensor:
    """Channel-first (B, 4C, h, w) -> (B, C, 2h, 2w) by pixel_shuffle(2); inverse of ``patchify``."""
    return F.pixel_shuffle(x, 2)


def unpatchify_bits(bits: torch.Tensor) -> torch.Tensor:
    """Channel-last token bits (B, h, w, 4d) -> latent bits (B, 2h, 2w, d), as the official 8B sampler does."""
    return unpatchify(bits.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)


def accumulate_codes(summed: torch.Tensor | None, bits: torch.Tensor, final_size: tuple[int, int],
                     spatial_patchify: bool = False) -> torch.Tensor:
    """Add one scale's sampled bits to the summed codes, as the official generation loop.

    bits: (B, h, w, token_bits) {0,1}; summed: (B, d, H, W) float32 or None for the first scale;
    final_size: (H, W) latent size of the last scale. Returns the new summed codes (B, d, H, W) float32.
    """
    if spatial_patchify:
        bits = unpatchify_bits(bits)
    codes = bits_to_codes(bits)
    if tuple(codes.shape[-2:]) != tuple(final_size):
        codes = upsample_codes(codes, final_size)
    return codes if summed is None else summed + codes


def next_scale_input(summed: torch.Tensor, size: tuple[int, int], spatial_patchify: bool = False) -> torch.Tensor:
    """Summed codes (B, d, H, W) -> the next scale's transformer input (B, h*w, token_bits) float32.

    size: the next scale's token grid (h, w); with spatial patchify the codes are resized to (2h, 2w) and each
    token takes the 2x2 block's 4d values (pixel_unshuffle channel order).
    """
    f = 2 if spatial_patchify else 1
    x = upsample_codes(summed, (size[0] * f, size[1] * f))
    if spatial_patchify:
        x = patchify(x)
    return x.flatten(2).transpose(1, 2)


def quantize_multiscale(f: torch.Tensor, schedule: list[tuple[int, int]]
                        ) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Multiscale residual BSQ encoding of a latent: the inverse of ``accumulate_codes`` over a schedule.

    f: (B, d, H, W) float, (H, W) = the last scale. At each scale (h, w) the residual is area-downsampled,
    its signs are the bits, and their codes (+-1/sqrt(d), ``bits_to_codes``), resized to (H, W) exactly as
    generation resizes them, are subtracted from the residual. Returns the bits per scale, each (B, h, w, d)
    uint8 in {0, 1}, and f_hat (B, d, H, W) float32 = the summed codes that generation would rebuild from them.
    """
    final = tuple(f.shape[-2:])
    if tuple(schedule[-1]) != final:
        raise ValueError(f"quantize_multiscale: latent {final} is not the schedule's last scale {schedule[-1]}")
    residual = f.float()
    f_hat = torch.zeros_like(residual)
    bits_out = []
    for h, w in schedule:
        r = residual if (h, w) == final else F.interpolate(residual, size=(h, w), mode="area")
        bits = (r > 0).permute(0, 2, 3, 1).to(torch.uint8)
        up = upsample_codes(bits_to_codes(bits), final) if (h, w) != final else bits_to_codes(bits)
        residual = residual - up
        f_hat = f_hat + up
        bits_out.append(bits)
    return bits_out, f_hat
