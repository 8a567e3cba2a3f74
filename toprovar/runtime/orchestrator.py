"""Scale-by-scale generation, written once for every backend.

The orchestrator owns the buffers (torch tensors on the backend's device: KV caches preallocated for the
whole schedule, the summed codes, the residual stream) and the control flow (policy decisions, kept-token
gather/scatter, CFG batch, sampling noise); a ``Backend`` only runs the pieces of
``toprovar.model.pieces``.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Protocol, Sequence

import torch
from tqdm.auto import tqdm

from ..policy.base import GenerationInfo, Policy, PolicyTrace


class Backend(Protocol):
    """Runs the graph pieces; all tensors are torch tensors on ``device``."""
    name: str
    device: torch.device
    dtype: torch.dtype  # dtype of k/v and ca_kv

    def condition(self, text: torch.Tensor, lengths: torch.Tensor, cfg: bool) -> tuple[torch.Tensor, ...]: ...
    def block(self, layer: int, x, ada, ca_kv, ca_lengths, rope, past_k, past_v, entropy: bool
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]: ...
    def head(self, si: int, x, cond, uniform, cfg, tau, top_p) -> torch.Tensor: ...
    def next_input(self, si: int, bits, summed) -> tuple[torch.Tensor, torch.Tensor | None]: ...
    def decode(self, summed: torch.Tensor) -> torch.Tensor: ...
    def synchronize(self) -> None: ...


@dataclass
class ModelSpec:
    """What the orchestrator must know of the model (from a config or an export manifest)."""
    depth: int
    num_heads: int
    head_dim: int
    width: int
    token_bits: int
    codebook_dim: int
    spatial_patchify: bool


@dataclass
class GenerationResult:
    """images (B, 3, H, W) float32 in [-1, 1]; bits per scale (B, n, token_bits); per-scale report."""
    images: torch.Tensor
    bits: list[torch.Tensor]
    trace: PolicyTrace
    scale_ms: list[float] = field(default_factory=list)


def per_scale(value: float | Sequence[float], n: int, name: str) -> list[float]:
    """A scalar or a per-scale list -> a list of n floats (one clear error on a wrong length)."""
    if isinstance(value, (int, float)):
        return [float(value)] * n
    vals = [float(v) for v in value]
    if len(vals) < n:
        raise ValueError(f"--{name}: {len(vals)} values given for {n} scales")
    return vals[:n]


def uniform_noise(gen: torch.Generator, batch: int, n: int, bits: int, device: torch.device) -> torch.Tensor:
    """Sampling noise (B, n, bits) float32 drawn on the CPU (same stream for every backend/device)."""
    return torch.rand(batch, n, bits, generator=gen).to(device)


class Orchestrator:
    """Generates images from text features through a backend, a policy and a scale schedule."""

    def __init__(self, backend: Backend, spec: ModelSpec, schedule: list[tuple[int, int]],
                 ropes: list[torch.Tensor]):
        self.backend, self.spec, self.schedule = backend, spec, schedule
        self.ropes = [r.to(backend.device) for r in ropes]

    @torch.no_grad()
    def generate(self, text: torch.Tensor, lengths: torch.Tensor, *, seed: int,
                 cfg: float | Sequence[float] = 3.0, tau: float | Sequence[float] = 1.0, top_p: float = 0.97,
                 policy: Policy | None = None, profile: bool = False, progress: bool = True,
                 ) -> GenerationResult:
        """text (B, L, C_text) float32, lengths (B,) int32 -> GenerationResult."""
        be, sp, S = self.backend, self.spec, len(self.schedule)
        dev = be.device
        policy = policy or Policy()
        cfgs, taus = per_scale(cfg, S, "cfg"), per_scale(tau, S, "tau")
        B = text.shape[0]
        use_cfg = any(c != 1.0 for c in cfgs)
        cond, ada, ca_kv, ca_len, x = be.condition(text.to(dev), lengths.to(dev), use_cfg)
        Bp = x.shape[0]
        total = sum(h * w for h, w in self.schedule)
        shape = (Bp, sp.num_heads, total, sp.head_dim)
        cache_k = [torch.empty(shape, dtype=be.dtype, device=dev) for _ in range(sp.depth)]
        cache_v = [torch.empty(shape, dtype=be.dtype, device=dev) for _ in range(sp.depth)]
        cache_len = [0] * sp.depth
        fh, fw = self.schedule[-1]
        f = 2 if sp.spatial_patchify else 1
        summed = torch.zeros(B, sp.codebook_dim, fh * f, fw * f, device=dev)
        gen = torch.Generator().manual_seed(seed)
        trace, bits_out, scale_ms = PolicyTrace(), [], []
        policy.start(GenerationInfo(self.schedule, sp.depth, B, dev))
        scalar = lambda v: torch.tensor([v], dtype=torch.float32, device=dev)  # noqa: E731
        top_p_t = scalar(top_p)
        bar = tqdm(range(S), desc=f"scales [{be.name}]", disable=not progress, leave=False)
        for si in bar:
            if not policy.run_scale(si):
                break
            t0 = time.perf_counter()
            h, w = self.schedule[si]
            n = h * w
            if Bp > B and not (use_cfg and policy.use_cfg(si)):
                Bp, x, cond, ada, ca_kv, ca_len = B, x[:B], cond[:B], ada[:B], ca_kv[:B], ca_len[:B]
            rope = self.ropes[si]
            trace.tokens[si], trace.kept[si], trace.cfg_batch[si] = n, [], Bp > B
            for layer in range(sp.depth):
                idx = policy.keep(si, layer, n)
                if idx is not None and idx.numel() == 0:
                    trace.kept[si].append(0)
                    continue
                xin = x if idx is None else x.index_select(1, idx)
                rin = rope if idx is None else rope.index_select(1, idx)
                P = cache_len[layer]
                want = policy.wants_entropy(si, layer)
                xo, k, v, ent = be.block(layer, xin, ada, ca_kv, ca_len, rin,
                                         cache_k[layer][:Bp, :, :P], cache_v[layer][:Bp, :, :P], want)
                m = k.shape[2]
                cache_k[layer][:Bp, :, P:P + m] = k
                cache_v[layer][:Bp, :, P:P + m] = v
                cache_len[layer] = P + m
                x = xo if idx is None else x.index_copy(1, idx, xo)
                trace.kept[si].append(m)
                if want:
                    policy.observe(si, layer, ent[:B], idx)
            uniform = uniform_noise(gen, B, n, sp.token_bits, dev)
            bits = be.head(si, x, cond, uniform, scalar(cfgs[si]), scalar(taus[si]), top_p_t)
            bits_out.append(bits)
            summed, x_next = be.next_input(si, bits, summed)
            if x_next is not None:
                x = torch.cat([x_next] * (Bp // B), dim=0)
            if profile:
                be.synchronize()
                scale_ms.append((time.perf_counter() - t0) * 1e3)
        images = be.decode(summed)
        return GenerationResult(images, bits_out, trace, scale_ms)
