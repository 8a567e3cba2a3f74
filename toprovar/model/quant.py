"""Parameter-free multiscale BSQ quantizer pieces: bits -> codes, summed-code accumulation, next input.

Layouts: bits (B, n, token_bits) in {0, 1} float32 for an h x w scale (row-major tokens); codes and the
summed codes live in the VAE latent grid (B, d, H, W) float32. With spatial patchify a token holds the
2x2 latent positions (token_bits = 4d), un/patchified by pixel (un)shuffle as the official code does.
Resizing is the official trilinear interpolation of the (B, d, 1, H, W) layout, which on one frame is
bilinear with align_corners=False.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def bits_to_codes(bits: torch.Tensor, h: int, w: int, codebook_dim: int, patchify: bool) -> torch.Tensor:
    """(B, h*w, token_bits) {0,1} -> codes (B, d, h', w') at +-1/sqrt(d) (h' = 2h with patchify)."""
    B = bits.shape[0]
    grid = bits.float().view(B, h, w, -1).permute(0, 3, 1, 2)
    if patchify:
        grid = F.pixel_shuffle(grid, 2)
    return (grid * 2 - 1) / codebook_dim ** 0.5


def resize_codes(codes: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """(B, d, h, w) -> (B, d, H, W) by the official trilinear mode on a single frame."""
    if tuple(codes.shape[-2:]) == tuple(size):
        return codes
    return F.interpolate(codes.unsqueeze(2), size=(1, *size), mode="trilinear").squeeze(2)


def codes_to_tokens(codes: torch.Tensor, patchify: bool) -> torch.Tensor:
    """Latent grid (B, d, H, W) -> transformer tokens (B, n, token_bits)."""
    if patchify:
        codes = F.pixel_unshuffle(codes, 2)
    return codes.flatten(2).transpose(1, 2)


def latent_size(side: tuple[int, int], patchify: bool) -> tuple[int, int]:
    """Latent grid size of a token grid side (h, w)."""
    f = 2 if patchify else 1
    return side[0] * f, side[1] * f
