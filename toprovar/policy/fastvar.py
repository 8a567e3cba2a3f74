"""FastVAR (Guo et al. 2025) as a policy, following what its public Infinity code does.

Token choice ("high frequency" tokens): per batch row (conditional and unconditional rows choose on
their own), the score of token i is ||x_i - mean_j x_j||^2 over the channels of the residual stream
entering the sub-layer (float32), and the n - int(n * ratio) tokens with the largest score are kept.
The choice is made again before each sub-layer (self-attention, cross-attention, FFN) of a pruned
layer, on the residual stream at that point. The branch output of the kept tokens is scattered into a
full-size branch output whose other slots hold the same sub-layer's branch output cached at the cache
scale (24x24 in the public code), area-interpolated to this scale's grid; the result is added to the
residual stream. Only the self-attention's kept tokens enter the layer's KV cache (RoPE is gathered
with them). A scale with ratio 1.0 is not run, nor any later one (the public code skips 48x48 and
64x64: the 40x40 sum is decoded).

Which scales and layers: see ``FastVARConfig`` (positions from the end of the schedule; the default
is the ToProVAR paper's Table 8 setting, "public" is the released code's; on HART both are its released
HART code's: 48x48 at 0.5 and 64x64 at 0.75 in every layer, cache at 36x36). This policy runs its pruned
layers through a ``BlockRunner`` on the PyTorch model (per-sub-layer selection is not one graph piece); on a
compiled backend the whole sub-layer-by-sub-layer block is one ``torch.compile``d function
(``TorchBackend.compiled_fn``), as the backend's own blocks are.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..model.layers import CrossAttnBlock, layer_norm
from .base import GenerationInfo, Policy
from .config import FastVARConfig


def fastvar_select(x: torch.Tensor, ratio: float) -> torch.Tensor:
    """FastVAR's kept tokens: x (B, n, C) -> indices (B, n - int(n * ratio)) int64, ascending per row."""
    n = x.shape[1]
    keep = n - int(n * ratio)
    xf = x.float()
    score = (xf - xf.mean(dim=1, keepdim=True)).pow(2).sum(dim=-1)
    return torch.topk(score, keep, dim=1, sorted=False).indices.sort(dim=1).values


def _gather(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    return torch.gather(x, 1, idx.unsqueeze(-1).expand(-1, -1, x.shape[-1]))


def restore_branch(branch: torch.Tensor, idx: torch.Tensor, cached: torch.Tensor, cached_hw: tuple[int, int],
                   hw: tuple[int, int]) -> torch.Tensor:
    """branch (B, k, C) of the kept tokens idx (B, k) -> (B, h*w, C): the cached branch output
    (B, hc*wc, C) area-interpolated from cached_hw to hw, with the kept slots replaced by ``branch``."""
    B, _, C = cached.shape
    grid = cached.reshape(B, *cached_hw, C).permute(0, 3, 1, 2)
    full = F.interpolate(grid, size=tuple(hw), mode="area").permute(0, 2, 3, 1).reshape(B, hw[0] * hw[1], C)
    return full.scatter(1, idx.unsqueeze(-1).expand(-1, -1, C), branch.to(full.dtype))


class FastVARBlock:
    """Runs one ``CrossAttnBlock`` sub-layer by sub-layer, with FastVAR's per-sub-layer token choice.

    With ``ratio == 0`` and ``store is None`` it computes exactly what ``CrossAttnBlock.forward`` does
    (same ops in the same order: bit-identical, tested). ``store``: a dict that receives the full
    branch outputs {"sa", "ca", "ffn"} (B', n, C) float32 (the cache scale). ``cache``: the stored dict
    and its grid side, used to restore pruned slots when ``ratio > 0``.
    """

    @staticmethod
    def run(block: CrossAttnBlock, x, ada, ca_kv, ca_lengths, rope, past_k, past_v, hw: tuple[int, int],
            ratio: float = 0.0, cache: tuple[dict, tuple[int, int]] | None = None, store: dict | None = None):
        prune = ratio > 0.0
        if prune and cache is None:
            raise ValueError("fastvar: a pruned scale needs the cache scale's branch outputs (cache_scale)")

        def branch(name, xin, fn):
            """Residual update of one sub-layer: fn(tokens, idx) -> branch output (B', k, C) float32."""
            if not prune:
                out = fn(xin, None)
                if store is not None:
                    store[name] = out
                return out
            idx = fastvar_select(xin, ratio)
            out = fn(_gather(xin, idx), idx)
            return restore_branch(out, idx, cache[0][name][: xin.shape[0]], cache[1], hw)

        kv: dict = {}
        if hasattr(block, "branches"):  # another family's block (HART) lists its own sub-layers
            for name, fn in block.branches(ada, rope, past_k, past_v, kv):
                x = x + branch(name, x, fn)
            return x, kv["k"], kv["v"]
        g1, g2, s1, s2, b1, b2 = block.modulation(ada)

        def sa(t, idx):
            h = layer_norm(t, block.eps) * (s1 + 1) + b1
            r = rope if idx is None else rope[:, idx]  # (2, B', k, hd/2): per-row RoPE
            a, k, v, _ = block.sa(h, r, past_k, past_v)
            kv["k"], kv["v"] = k, v
            return a.float() * g1

        def ca(t, idx):
            return block.ca(layer_norm(t, block.eps, block.ca_norm.weight, block.ca_norm.bias), ca_kv,
                            ca_lengths).float()

        def ffn(t, idx):
            h = layer_norm(t, block.eps) * (s2 + 1) + b2
            return block.ffn(h).float() * g2

        x = x + branch("sa", x, sa)
        x = x + branch("ca", x, ca)
        x = x + branch("ffn", x, ffn)
        return x, kv["k"], kv["v"]


class FastVARPolicy(Policy):
    """FastVAR baseline (frequency-based token pruning with cached restoration, scale skipping)."""

    name = "fastvar"

    def __init__(self, config: FastVARConfig | None = None):
        self.config = config if config is not None else FastVARConfig()

    def params(self) -> dict:
        return {"name": self.name, **self.config.to_dict()}

    def plan_key(self) -> str:
        return self.params_key()  # fixed ratios per scale, top-k of a device score: nothing read back

    def start(self, info: GenerationInfo) -> None:
        super().start(info)
        self.schedule = [tuple(s) for s in info.schedule]
        self.ratios, self.layers, self.cache_si = self.config.resolve(info.depth, len(info.schedule), info.family)
        self.caches: dict[int, dict] = {}

    def run_scale(self, si: int) -> bool:
        return self.ratios[si] < 1.0

    def block_runner(self, si: int, layer: int):
        if layer not in self.layers:
            return None
        ratio = self.ratios[si]
        if si == self.cache_si:
            store = self.caches.setdefault(layer, {})
            return self._runner(si, 0.0, None, store)
        if ratio > 0.0:
            if layer not in self.caches:
                raise ValueError(f"fastvar: scale {si} is pruned but the cache scale {self.cache_si} did not run")
            return self._runner(si, ratio, (self.caches[layer], self.schedule[self.cache_si]), None)
        return None

    def _runner(self, si, ratio, cache, store):
        hw = self.schedule[si]

        def run(backend, layer, x, ada, ca_kv, ca_lengths, rope, past_k, past_v):
            model = getattr(backend, "model", None)
            if model is None:
                raise ValueError(f"--policy fastvar: needs the PyTorch backend (got {backend.name!r}); its per-"
                                 "sub-layer token choice is not an exported piece")
            run_block = backend.compiled_fn(FastVARBlock.run)
            return run_block(model.blocks[layer], x, ada, ca_kv, ca_lengths, rope, past_k, past_v, hw, ratio, cache,
                             store)
        return run


__all__ = ["FastVARPolicy", "FastVARBlock", "fastvar_select", "restore_branch"]
