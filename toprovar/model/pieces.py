"""The static graph pieces of generation, as nn.Modules over a shared model.

These are exactly what ``toprovar-export`` exports to ONNX and what the PyTorch backend runs, so the
two cannot drift. All tensors are explicit inputs (no Python state), shapes as documented per piece.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from ..sampling import sample_bits
from .infinity import Infinity
from .layers import CrossAttnBlock
from .quant import accumulate_codes, next_scale_input


class ConditionPiece(nn.Module):
    """text (B, L, C_text) float32, lengths (B,) int32 -> cond (B', C), ada (B', 1, 6, C),
    ca_kv (B', L, C), ca_lengths (B',) int32, x0 (B', 1, C) float32; B' = 2B with CFG."""

    def __init__(self, model: Infinity, cfg: bool):
        super().__init__()
        self.model, self.cfg = model, cfg

    def forward(self, text: torch.Tensor, lengths: torch.Tensor):
        cond, ada, ca_kv, ca_lengths = self.model.condition(text, lengths, self.cfg)
        return cond, ada, ca_kv, ca_lengths, self.model.first_input(cond)


class BlockPiece(nn.Module):
    """One block on n tokens with a cache of P tokens (both dynamic).

    x (B', n, C) float32, ada (B', 1, 6, C) float32, ca_kv (B', L, C), ca_lengths (B',) int32,
    rope (2, n, hd/2) float32, past_k/past_v (B', H, P, hd) -> x (B', n, C) float32, k, v (B', H, n, hd)
    [, entropy (B', n) float32 head-mean self-attention entropy when ``entropy``].
    """

    def __init__(self, block: CrossAttnBlock, entropy: bool):
        super().__init__()
        self.block, self.entropy = block, entropy

    def forward(self, x, ada, ca_kv, ca_lengths, rope, past_k, past_v):
        x, k, v, ent = self.block(x, ada, ca_kv, ca_lengths, rope, past_k, past_v,
                                  entropy="mean" if self.entropy else None)
        return (x, k, v, ent) if self.entropy else (x, k, v)


class CachedBlockPiece:
    """``BlockPiece``'s computation with the KV cache written in place: the PyTorch backend's form.

    ONNX has no in-place writes, so the exported ``BlockPiece`` takes the cache prefix and concatenates
    the new keys/values to it, a copy of the whole prefix per layer (at the 2B last scale, 10.5k keys and
    values per layer for 4k new ones). Here the same block methods run with the new keys/values written
    into the cache at [P, P+n) and attention reading the prefix [0, P+n) in place.

    ``inputs``/``outputs``: the block's ``attention_inputs``/``attention_outputs`` or compiled versions of
    them; with ``writes_inside`` ``inputs`` is ``inputs_to_cache`` (or a compiled version of it), which
    writes the new keys/values itself (compiled: from the kernels that produce them, no separate copies).
    ``whole``: a compiled ``forward`` (the whole block in one graph) that calls replace, or None.
    """

    def __init__(self, block: CrossAttnBlock, inputs=None, outputs=None, writes_inside: bool = False):
        self.block, self.writes_inside, self.whole = block, writes_inside, None
        self.inputs = inputs or (self.inputs_to_cache if writes_inside else block.attention_inputs)
        self.outputs = outputs or block.attention_outputs

    def inputs_to_cache(self, x, ada, rope, k_out, v_out):
        """``attention_inputs`` writing k, v into k_out/v_out (B', H, n, hd) views of the cache -> q."""
        q, k, v = self.block.attention_inputs(x, ada, rope)
        k_out.copy_(k)
        v_out.copy_(v)
        return q

    def __call__(self, *args):
        """``forward``, or the compiled version of it that the PyTorch backend set as ``whole``."""
        return (self.whole or self.forward)(*args)

    def forward(self, x, ada, ca_kv, ca_lengths, rope, cache_k, cache_v, past: int, entropy: bool,
                ca_kv_proj=None):
        """x (B', n, C) float32, ada, ca_kv, ca_lengths, rope as ``BlockPiece``; cache_k/cache_v
        (B', H, >= past+n, hd) holding ``past`` keys/values -> x (B', n, C) float32 and, with ``entropy``,
        the head-mean self-attention entropy (B', n) float32, else None. Writes cache[:, :, past:past+n].
        ``ca_kv_proj``: the cross-attention's text keys/values (B', L, 2C) computed beforehand
        (``CrossAttention.kv_proj``; Infinity blocks only), then ``ca_kv`` is not read."""
        end = past + x.shape[1]
        if self.writes_inside:
            q = self.inputs(x, ada, rope, cache_k[:, :, past:end], cache_v[:, :, past:end])
        else:
            q, k, v = self.inputs(x, ada, rope)
            cache_k[:, :, past:end].copy_(k)
            cache_v[:, :, past:end].copy_(v)
        o, ent = self.block.sa.attend(q, cache_k[:, :, :end], cache_v[:, :, :end],
                                      entropy="mean" if entropy else None)
        if ca_kv_proj is None:
            return self.outputs(x, ada, o, ca_kv, ca_lengths), ent
        return self.outputs(x, ada, o, None, ca_lengths, ca_kv_proj), ent


class HeadPiece(nn.Module):
    """x (B', n, C) float32, cond (B', C) float32, uniform (B, n, bits) float32, cfg/tau/top_p (1,)
    float32 -> bits (B, n, token_bits) float32 in {0, 1} (CFG mixing when B' = 2B)."""

    def __init__(self, model: Infinity, top_k: int = 0):
        super().__init__()
        self.model, self.top_k = model, top_k

    def logits(self, x, cond):
        return self.model.logits(x, cond)

    def sample(self, logits, uniform, cfg, tau, top_p, x=None):
        """The sampling half of ``forward`` (``x`` unused: HART's last-scale head needs it)."""
        return sample_bits(logits, uniform, cfg, tau, top_p, self.top_k)

    def forward(self, x, cond, uniform, cfg, tau, top_p):
        return self.sample(self.logits(x, cond), uniform, cfg, tau, top_p)


class NextInputPiece(nn.Module):
    """Accumulate scale ``si``'s codes and embed the next scale's input.

    bits (B, h*w, token_bits) float32, summed (B, d, Hf, Wf) float32 -> summed (B, d, Hf, Wf) and, unless
    this is the last scale, x_next (B, n_next, C) float32 (word_embed + lvl_embed[si+1]).
    """

    def __init__(self, model: Infinity, schedule: list[tuple[int, int]], si: int):
        super().__init__()
        self.model, self.schedule, self.si = model, schedule, si
        self.patchify = model.cfg.spatial_patchify

    def forward(self, bits: torch.Tensor, summed: torch.Tensor):
        h, w = self.schedule[self.si]
        grid = bits.view(bits.shape[0], h, w, bits.shape[-1])
        summed = accumulate_codes(summed, grid, tuple(summed.shape[-2:]), self.patchify)
        if self.si == len(self.schedule) - 1:
            return (summed,)
        nxt = next_scale_input(summed, self.schedule[self.si + 1], self.patchify)
        return summed, self.model.embed_scale(nxt, self.si + 1)
