"""HART's graph pieces (the exported modules and what the PyTorch backend runs), with the contracts of
``toprovar.model.pieces`` so the shared orchestrator and backends run them unchanged.

Sampling noise per token and scale s (uniform [0, 1), drawn on the CPU by the orchestrator; ``noise_widths``):
[0] the categorical draw, then V Gumbel uniforms when ``more_smooth``, then at the last scale 2 (1 + steps) Cvae
uniforms turned into the diffusion head's standard normals (Box-Muller: pairs (u1, u2) -> sqrt(-2 ln(1 - u1))
cos(2 pi u2)). On a CUDA device the Gumbel uniforms come from per-row CUDA generators seeded with the
row's seed (``ModelSpec.device_noise``: 4096 per token are too many to draw on the host and copy) and the CPU
stream draws the other columns only, so with ``more_smooth`` a CUDA image differs from the CPU image of the same
seed (without it they draw the same noise); the CPU draw is the one the oracle test matches.

At the last scale the head is two pieces: ``HartHeadPiece`` (logits, CFG, top-k/top-p, the draw, the codes) and
``HartDiffusionPiece`` (the residual diffusion head); the PyTorch backend runs them back to back (``forward``),
the export has them as ``head_sXX`` (with the hard codes as a second output) and ``diffusion_head``.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn

from ...config import ModelConfig
from .transformer import Hart


def noise_widths(cfg: ModelConfig) -> tuple[int, ...]:
    """Uniforms per token at each scale (module docstring)."""
    S = len(cfg.patch_nums)
    base = 1 + (cfg.vocab_size if cfg.more_smooth else 0)
    return tuple(base + (2 * (1 + cfg.diff_steps) * cfg.codebook_dim if s == S - 1 else 0) for s in range(S))


def top_k_of_scale(si: int, vocab: int) -> int:
    """The official top-k: 600 at the first 7 scales, 300 after (at most V)."""
    return min(600 if si < 7 else 300, vocab)


def cfg_schedule(cfg: float, num_scales: int) -> list[float]:
    """Per-scale CFG weight w = 1 + t as the official loop schedules it: t = cfg * si / (S - 1), and the last
    scale reuses the previous scale's ratio (the official code does not update it for its last stage)."""
    return [1.0 + cfg * min(si, num_scales - 2) / (num_scales - 1) for si in range(num_scales)]


def filter_logits(logits: torch.Tensor, top_k: int, top_p: torch.Tensor) -> torch.Tensor:
    """Official top-k (keep logits >= the k-th largest) then top-p (when top_p > 0: drop the smallest whose
    cumulative probability is <= 1 - top_p, never the largest) -> logits with -inf at the removed codes."""
    thr = logits.topk(top_k, dim=-1).values.amin(dim=-1, keepdim=True)
    logits = logits.masked_fill(logits < thr, float("-inf"))
    srt, idx = logits.sort(dim=-1, descending=False)
    remove = srt.softmax(dim=-1).cumsum(dim=-1) <= (1 - top_p)
    remove[..., -1:] = False
    remove = remove & (top_p > 0)
    return logits.masked_fill(torch.zeros_like(remove).scatter(-1, idx, remove), float("-inf"))


def categorical(logits: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Inverse-CDF draw: logits (..., V) (-inf allowed), u (...) in [0, 1) -> index (...) int64."""
    cdf = logits.softmax(dim=-1).cumsum(dim=-1)
    return (cdf < (u * cdf[..., -1]).unsqueeze(-1)).sum(dim=-1).clamp_max(logits.shape[-1] - 1)


def exponential_from_uniform(u: torch.Tensor) -> torch.Tensor:
    """Exp(1) variates -log(1 - u), clamped away from 0."""
    return (-torch.log(1 - u)).clamp_min(1e-20)


def gumbel_from_uniform(u: torch.Tensor) -> torch.Tensor:
    """Gumbel variates -log(E), E = ``exponential_from_uniform(u)`` (the official -log(Exp(1)))."""
    return -torch.log(exponential_from_uniform(u))


def normal_from_uniform(u: torch.Tensor) -> torch.Tensor:
    """u (..., 2m) uniforms -> (..., m) standard normals (Box-Muller on the pairs (u[2i], u[2i+1]))."""
    u1, u2 = u.unflatten(-1, (-1, 2)).unbind(-1)
    return torch.sqrt(2 * exponential_from_uniform(u1)) * torch.cos(2 * math.pi * u2)


def area_matrix(n_in: int, n_out: int) -> torch.Tensor:
    """(n_out, n_in) float32: row i averages inputs [floor(i n_in / n_out), ceil((i + 1) n_in / n_out)) (the
    official "area" interpolation, i.e. adaptive average pooling, along one axis)."""
    a = torch.zeros(n_out, n_in)
    for i in range(n_out):
        lo, hi = (i * n_in) // n_out, -((-(i + 1) * n_in) // n_out)
        a[i, lo:hi] = 1.0 / (hi - lo)
    return a


class HartConditionPiece(nn.Module):
    """text (B, L, C_text) float32, lengths (B,) int32 -> cond (B', C), ada (B', 1), ca_kv (B', L, C),
    ca_lengths (B',) int32, x0 (B', L, C) float32; B' = 2B with CFG."""

    def __init__(self, model: Hart, cfg: bool):
        super().__init__()
        self.model, self.cfg = model, cfg

    def forward(self, text: torch.Tensor, lengths: torch.Tensor):
        return self.model.condition(text, lengths, self.cfg)


class HartDiffusionPiece(nn.Module):
    """The residual diffusion head as its own piece (last scale): x (B', n, C) last-layer output, hard (B, n, Cvae)
    the drawn codebook entries, uniform (B, n, noise width) the scale's noise, cfg (1,) the CFG weight w (guidance
    w - 1) -> residual (B, n, Cvae) float32."""

    def __init__(self, model: Hart):
        super().__init__()
        self.model = model
        c = model.cfg
        self.offset = 1 + (c.vocab_size if c.more_smooth else 0)

    def forward(self, x, hard, uniform, cfg):
        B, n, Cv = hard.shape
        normals = normal_from_uniform(uniform[..., self.offset:]).view(B, n, -1, Cv)
        z = self.model.residual_condition(x, hard.repeat(x.shape[0] // B, 1, 1)).reshape(-1, x.shape[-1])
        z_c, z_u = (z[:B * n], z[B * n:]) if x.shape[0] > B else (z, None)
        noise = normals.permute(2, 0, 1, 3).reshape(normals.shape[2], B * n, Cv)
        return self.model.diffloss.sample(z_c, z_u, noise, cfg - 1).view(B, n, Cv)


class HartHeadPiece(nn.Module):
    """Scale ``si``'s head: x (B', n_run, C) float32 (scale 0: the context tokens, the last one is used), cond
    (B', C), uniform (B, n, noise width), cfg (1,) the CFG weight w (logits w * cond - (w - 1) * uncond), tau (1,)
    unused (the official sampler has no temperature), top_p (1,) -> codes (B, n, Cvae) float32: the codebook entry
    of the drawn index (or, with ``more_smooth``, the Gumbel-softmax mixture of the codebook), plus at the last
    scale the diffusion head's residual (``residual=False``: without it, and the hard codes as a second output)."""

    def __init__(self, model: Hart, si: int, residual: bool = True):
        super().__init__()
        self.model, self.si = model, si
        c = model.cfg
        self.S, self.V = len(c.patch_nums), c.vocab_size
        self.top_k = top_k_of_scale(si, self.V)
        self.ratio = min(si, self.S - 2) / (self.S - 1)
        self.smooth = c.more_smooth
        self.last = si == self.S - 1
        self.diffusion = HartDiffusionPiece(model) if self.last and residual else None

    def logits(self, x, cond):
        if self.si == 0:
            x = x[:, -1:]
        return self.model.logits(x, cond)

    def discrete(self, logits, uniform, cfg, top_p):
        """-> codes (B, n, Cvae) (soft with ``more_smooth``), hard (B, n, Cvae) the drawn entries."""
        B = uniform.shape[0]
        lg = logits if logits.shape[0] == B else cfg * logits[:B] - (cfg - 1) * logits[B:]
        lg = filter_logits(lg, self.top_k, top_p)
        idx = categorical(lg, uniform[..., 0])
        emb = self.model.quantize.embedding.weight.float()
        hard = emb[idx]
        if not self.smooth:
            return hard, hard
        tau_g = max(0.27 * (1 - self.ratio * 0.95), 0.005)
        g = gumbel_from_uniform(uniform[..., 1:1 + self.V])
        return ((lg * (1 + self.ratio) + g) / tau_g).softmax(dim=-1) @ emb, hard

    def sample(self, logits, uniform, cfg, tau, top_p, x=None):
        codes, hard = self.discrete(logits, uniform, cfg, top_p)
        return codes + self.diffusion(x, hard, uniform, cfg) if self.diffusion is not None else codes

    def forward(self, x, cond, uniform, cfg, tau, top_p):
        return self.sample(self.logits(x, cond), uniform, cfg, tau, top_p, x=x)


class HartNextInputPiece(nn.Module):
    """codes (B, pn*pn, Cvae) float32, summed (B, Cvae, G, G) float32 -> summed and, unless last, x_next
    (B, n_next, C) float32 (area-downsampled summed codes, word_embed + level embedding)."""

    def __init__(self, model: Hart, schedule: list[tuple[int, int]], si: int):
        super().__init__()
        self.model, self.schedule, self.si = model, schedule, si
        if si < len(schedule) - 1:
            (H, W), (h, w) = schedule[-1], schedule[si + 1]
            dev = model.word_embed.weight.device  # the piece is built beside a model already on its device
            self.register_buffer("area_h", area_matrix(H, h).to(dev), persistent=False)
            self.register_buffer("area_w", area_matrix(W, w).to(dev), persistent=False)

    def forward(self, bits: torch.Tensor, summed: torch.Tensor):
        h, w = self.schedule[self.si]
        B = bits.shape[0]
        codes = bits.transpose(1, 2).reshape(B, bits.shape[-1], h, w)
        summed = self.model.quantize.accumulate(summed, codes, self.si, len(self.schedule))
        if self.si == len(self.schedule) - 1:
            return (summed,)
        nxt = self.area_h @ summed @ self.area_w.T  # area resize to the next scale as two matrix products
        return summed, self.model.embed_scale(nxt.flatten(2).transpose(1, 2), self.si + 1)
