"""HART's residual diffusion head: the MLP with AdaLN (official ``SimpleMLPAdaLN`` under ``diffloss.net``) and its
iDDPM sampler as the official ``DiffLoss.sample`` runs it: cosine beta schedule over 1000 steps respaced to
``diff_steps`` (8) evenly spaced steps, epsilon prediction with a learned variance range, x0 clipped to [-1, 1],
classifier-free guidance on epsilon only (the variance from the conditional row), output times 0.6.

Noise is given, not drawn: (steps + 1, N, Cvae) standard normals, [0] the start, [k] the noise of the k-th step
(the last step adds none, as the official ``nonzero_mask``).

Per generation the condition is embedded once (``cond_embed``: the same for every step) and each step's time
embedding once (one row, broadcast over the tokens); the official code recomputes both per step and token. The
linear layers run in their weights' dtype (``Hart.to_inference_dtype``: bfloat16 on CUDA; float32 in float32
runs) with float32 inputs cast to it and float32 outputs; norms, modulation and the sampler stay float32.
"""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

VAE_SCALE = 0.6
TRAIN_STEPS = 1000


def _lin(x: torch.Tensor, layer: nn.Linear) -> torch.Tensor:
    """layer(x) in the weights' dtype -> float32."""
    w = layer.weight
    return F.linear(x.to(w.dtype), w, layer.bias.to(w.dtype)).float()


class TimestepEmbedder(nn.Module):
    """t (N,) -> (N, W) float32: Linear-SiLU-Linear of a 256-d sinusoidal embedding (cos half first); HART embeds
    both the diffusion timestep and the scale index (``lvl_embed``) with it."""

    def __init__(self, width: int, freq_dim: int = 256):
        super().__init__()
        self.freq_dim = freq_dim
        self.mlp = nn.Sequential(nn.Linear(freq_dim, width), nn.SiLU(), nn.Linear(width, width))

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        half = self.freq_dim // 2
        freqs = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
        args = t[:, None].float() * freqs[None]
        emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
        return _lin(F.silu(_lin(emb, self.mlp[0])), self.mlp[2])


def _modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return x * (1 + scale) + shift


class ResBlock(nn.Module):
    """x + gate * MLP(LN(x) * (1 + scale) + shift), (shift, scale, gate) = Linear(SiLU(y))."""

    def __init__(self, width: int):
        super().__init__()
        self.in_ln = nn.LayerNorm(width, eps=1e-6)
        self.mlp = nn.Sequential(nn.Linear(width, width), nn.SiLU(), nn.Linear(width, width))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(width, 3 * width))

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        shift, scale, gate = _lin(F.silu(y), self.adaLN_modulation[1]).chunk(3, dim=-1)
        h = _modulate(F.layer_norm(x, (x.shape[-1],), self.in_ln.weight.float(), self.in_ln.bias.float(), 1e-6),
                      shift, scale)
        return x + gate * _lin(F.silu(_lin(h, self.mlp[0])), self.mlp[2])


class FinalLayer(nn.Module):
    """Linear(LN(x) * (1 + scale) + shift), LayerNorm without affine."""

    def __init__(self, width: int, out_channels: int):
        super().__init__()
        self.linear = nn.Linear(width, out_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(width, 2 * width))

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        shift, scale = _lin(F.silu(y), self.adaLN_modulation[1]).chunk(2, dim=-1)
        return _lin(_modulate(F.layer_norm(x, (x.shape[-1],), eps=1e-6), shift, scale), self.linear)


class DiffusionMLP(nn.Module):
    """x (N, Cvae) noisy residual, t (N,) timesteps, c (N, C) condition -> (N, 2 Cvae) [epsilon, variance value],
    float32."""

    def __init__(self, channels: int, cond_width: int, width: int, depth: int):
        super().__init__()
        self.channels = channels
        self.time_embed = TimestepEmbedder(width)
        self.cond_embed = nn.Linear(cond_width, width)
        self.input_proj = nn.Linear(channels, width)
        self.res_blocks = nn.ModuleList(ResBlock(width) for _ in range(depth))
        self.final_layer = FinalLayer(width, 2 * channels)

    def embed_condition(self, c: torch.Tensor) -> torch.Tensor:
        """c (N, C) -> (N, W) float32: the condition's part of every step's AdaLN input."""
        return _lin(c.float(), self.cond_embed)

    def forward(self, x: torch.Tensor, t: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        return self.step(x, t, self.embed_condition(c))

    def step(self, x: torch.Tensor, t: torch.Tensor, c_emb: torch.Tensor) -> torch.Tensor:
        """``forward`` with the condition embedded (``embed_condition``); t (N,) or (1,) (broadcast)."""
        x = _lin(x.float(), self.input_proj)
        y = self.time_embed(t) + c_emb
        for blk in self.res_blocks:
            x = blk(x, y)
        return self.final_layer(x, y)


def _respaced_tables(steps: int) -> dict[str, torch.Tensor]:
    """The sampler's per-step constants for ``steps`` respaced steps, computed in float64 and rounded to float32
    (as the official sampler reads them), plus the original timestep of each step."""
    alpha_bar = lambda t: math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2  # noqa: E731
    betas = np.array([min(1 - alpha_bar((i + 1) / TRAIN_STEPS) / alpha_bar(i / TRAIN_STEPS), 0.999)
                      for i in range(TRAIN_STEPS)], dtype=np.float64)
    stride = (TRAIN_STEPS - 1) / (steps - 1) if steps > 1 else 1
    keep, cur = set(), 0.0
    for _ in range(steps):  # the official ``space_timesteps`` accumulation
        keep.add(round(cur))
        cur += stride
    keep = sorted(keep)
    ac_full = np.cumprod(1.0 - betas)
    new_betas, last = [], 1.0
    for i in keep:
        new_betas.append(1 - ac_full[i] / last)
        last = ac_full[i]
    b = np.array(new_betas, dtype=np.float64)
    ac = np.cumprod(1.0 - b)
    ac_prev = np.append(1.0, ac[:-1])
    post_var = b * (1.0 - ac_prev) / (1.0 - ac)
    post_logvar = np.log(np.append(post_var[1], post_var[1:])) if len(post_var) > 1 else np.log(post_var)
    t = {
        "timestep": np.array(keep, dtype=np.float64),
        "sqrt_recip_ac": np.sqrt(1.0 / ac),
        "sqrt_recipm1_ac": np.sqrt(1.0 / ac - 1),
        "coef1": b * np.sqrt(ac_prev) / (1.0 - ac),
        "coef2": (1.0 - ac_prev) * np.sqrt(1.0 - b) / (1.0 - ac),
        "min_log": post_logvar,
        "max_log": np.log(b),
    }
    return {k: torch.from_numpy(v).float() for k, v in t.items()}


class DiffLoss(nn.Module):
    """The official ``diffloss`` module (its only weights: ``net``) with the sampler."""

    def __init__(self, channels: int, cond_width: int, width: int, depth: int, steps: int):
        super().__init__()
        self.channels, self.steps = channels, steps
        self.net = DiffusionMLP(channels, cond_width, width, depth)
        for k, v in _respaced_tables(steps).items():
            self.register_buffer(k, v, persistent=False)

    def sample(self, z: torch.Tensor, z_uncond: torch.Tensor | None, noise: torch.Tensor,
               guidance: torch.Tensor) -> torch.Tensor:
        """z (N, C) condition, z_uncond (N, C) or None, noise (steps + 1, N, Cvae) standard normals, guidance (1,)
        float32 (the official ``cfg`` of ``DiffLoss.sample``; 1.0 exactly means none) -> residual (N, Cvae) float32.

        With z_uncond: eps = (1 + g) eps(z) - g eps(z_uncond), the variance value from eps(z)'s row."""
        C, N = self.channels, z.shape[0]
        x = noise[0].float()
        zz = z if z_uncond is None else torch.cat([z, z_uncond], dim=0)
        c_emb = self.net.embed_condition(zz)
        for k, i in enumerate(reversed(range(self.steps))):
            out = self.net.step(x if z_uncond is None else torch.cat([x, x], dim=0), self.timestep[i:i + 1], c_emb)
            eps, var = out[:N, :C], out[:N, C:]
            if z_uncond is not None:
                mixed = eps * (1 + guidance) - guidance * out[N:, :C]
                eps = torch.where(guidance == 1.0, eps, mixed)
            frac = (var + 1) / 2
            log_var = frac * self.max_log[i] + (1 - frac) * self.min_log[i]
            x0 = (self.sqrt_recip_ac[i] * x - self.sqrt_recipm1_ac[i] * eps).clamp(-1, 1)
            mean = self.coef1[i] * x0 + self.coef2[i] * x
            x = mean + float(i != 0) * torch.exp(0.5 * log_var) * noise[k + 1].float() if i != 0 else mean
        return x * VAE_SCALE
