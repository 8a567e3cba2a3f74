"""Infinity building blocks with the official parameter names and shapes.

Conventions: the residual stream x is float32 (B, N, C); matrix products run in the block's parameter
dtype (float32, bfloat16 or float16) with explicit casts, so an exported graph is strongly typed; layer
norms, AdaLN modulation, RoPE and the head run in float32.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..ops import attention
from .rope import apply_rope

MAX_SCALE_MUL = math.log(100.0)


def layer_norm(x: torch.Tensor, eps: float, weight: torch.Tensor | None = None,
               bias: torch.Tensor | None = None) -> torch.Tensor:
    """LayerNorm over the last dim in float32."""
    w = None if weight is None else weight.float()
    b = None if bias is None else bias.float()
    return F.layer_norm(x.float(), (x.shape[-1],), w, b, eps)


def linear(x: torch.Tensor, layer: nn.Linear, bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear in the layer's dtype (input cast to it); ``bias`` overrides the layer's bias."""
    w = layer.weight
    b = layer.bias if bias is None else bias
    return F.linear(x.to(w.dtype), w, None if b is None else b.to(w.dtype))


class SelfAttention(nn.Module):
    """Cosine self-attention with a learned per-head scale, 2D RoPE and a cross-scale KV cache.

    Parameters: mat_qkv (3C, C) no bias; q_bias, v_bias (C,); zero_k_bias buffer (C,);
    scale_mul_1H11 (1, H, 1, 1) log scale, clamped at ln 100; proj (C, C) with bias.
    """

    def __init__(self, width: int, num_heads: int):
        super().__init__()
        self.num_heads, self.head_dim = num_heads, width // num_heads
        self.mat_qkv = nn.Linear(width, 3 * width, bias=False)
        self.q_bias = nn.Parameter(torch.zeros(width))
        self.v_bias = nn.Parameter(torch.zeros(width))
        self.register_buffer("zero_k_bias", torch.zeros(width))
        self.scale_mul_1H11 = nn.Parameter(torch.full((1, num_heads, 1, 1), 4.0).log())
        self.proj = nn.Linear(width, width)

    def qkv(self, x: torch.Tensor, rope: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x (B, n, C), rope (2, n, hd/2) or per row (2, B, n, hd/2) -> q, k, v (B, H, n, hd) in the compute
        dtype, q and k normalised, q scaled, both rotated. They are token-major views of (B, n, H, hd)
        memory (the projection's layout): attention then writes its output token-major too, and merging
        its heads before ``proj`` is free."""
        B, n, C = x.shape
        bias = torch.cat([self.q_bias, self.zero_k_bias.to(self.q_bias.dtype), self.v_bias])
        q, k, v = linear(x, self.mat_qkv, bias).view(B, n, 3, self.num_heads, self.head_dim).unbind(2)
        # clamped in the parameter's dtype (a bf16 parameter clamps at bf16(ln 100), as the official cast model)
        scale_mul = self.scale_mul_1H11.clamp_max(MAX_SCALE_MUL).float().exp().transpose(1, 2)  # (1, 1, H, 1)
        q = F.normalize(q.float(), dim=-1, eps=1e-12) * scale_mul
        k = F.normalize(k.float(), dim=-1, eps=1e-12)
        rope = rope.unsqueeze(-2)  # broadcast over heads
        dt = self.mat_qkv.weight.dtype
        return tuple(t.to(dt).transpose(1, 2) for t in (apply_rope(q, rope), apply_rope(k, rope), v))

    @staticmethod
    def attend(q: torch.Tensor, keys: torch.Tensor, vals: torch.Tensor, attn_mask: torch.Tensor | None = None,
               entropy: str | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """q (B, H, n, hd); keys/vals (B, H, P+n, hd), any strides with a contiguous last dim ->
        (o (B, H, n, hd), entropy (B, H, n) | (B, n) float32 | None). ``attn_mask`` (n, P+n) bool only for
        teacher forcing (no entropy then)."""
        if attn_mask is not None:
            return F.scaled_dot_product_attention(q, keys, vals, attn_mask=attn_mask, scale=1.0), None
        return attention(q, keys, vals, 1.0, entropy=entropy)

    def output(self, o: torch.Tensor) -> torch.Tensor:
        """o (B, H, n, hd) -> proj (B, n, C) in the compute dtype."""
        B, H, n, hd = o.shape
        return linear(o.transpose(1, 2).reshape(B, n, H * hd), self.proj)

    def forward(self, x: torch.Tensor, rope: torch.Tensor, past_k: torch.Tensor, past_v: torch.Tensor,
                attn_mask: torch.Tensor | None = None, entropy: str | None = None):
        """x (B, n, C); rope (2, n, hd/2); past_k/v (B, H, P, hd) (P may be 0).

        Returns (out (B, n, C) compute dtype, k, v (B, H, n, hd) to append to the cache, entropy (see
        ``attend``)).
        """
        q, k, v = self.qkv(x, rope)
        o, ent = self.attend(q, torch.cat([past_k, k], dim=2), torch.cat([past_v, v], dim=2), attn_mask, entropy)
        return self.output(o), k, v, ent


class CrossAttention(nn.Module):
    """Scaled dot-product attention to projected text (or, pooled, one learned query per head).

    Parameters: mat_q (C, C) with bias, or a learned query (1, H, hd) when ``pool``; mat_kv (2C, C_kv) no
    bias; v_bias (C,); zero_k_bias buffer (C,); proj (C, C) with bias.
    """

    def __init__(self, width: int, kv_width: int, num_heads: int, pool: bool = False):
        super().__init__()
        self.num_heads, self.head_dim = num_heads, width // num_heads
        self.pool = pool
        if pool:
            self.mat_q = nn.Parameter(torch.empty(1, num_heads, self.head_dim))
            nn.init.trunc_normal_(self.mat_q, std=math.sqrt(1 / width / 3))
        else:
            self.mat_q = nn.Linear(width, width)
        self.mat_kv = nn.Linear(kv_width, 2 * width, bias=False)
        self.v_bias = nn.Parameter(torch.zeros(width))
        self.register_buffer("zero_k_bias", torch.zeros(width))
        self.proj = nn.Linear(width, width)

    def kv_proj(self, kv: torch.Tensor) -> torch.Tensor:
        """kv (B, L, C_kv) -> the text keys and values (B, L, 2C) in the compute dtype (``split_kv`` splits
        them); they depend on the text only, so a generation may compute them once for every scale."""
        bias = torch.cat([self.zero_k_bias.to(self.v_bias.dtype), self.v_bias])
        return linear(kv, self.mat_kv, bias)

    def split_kv(self, kv_proj: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, L, 2C) (any row stride, contiguous rows) -> k, v (B, H, L, hd) views."""
        return kv_proj.unflatten(-1, (2, self.num_heads, self.head_dim)).permute(2, 0, 3, 1, 4).unbind(0)

    def forward(self, x: torch.Tensor | None, kv: torch.Tensor | None, kv_lengths: torch.Tensor,
                kv_proj: torch.Tensor | None = None) -> torch.Tensor:
        """x (B, n, C) or None when pooling; kv (B, L, C_kv); kv_lengths (B,) int -> (B, n or 1, C).
        ``kv_proj``: ``kv_proj(kv)`` computed beforehand (then ``kv`` is unused)."""
        k, v = self.split_kv(self.kv_proj(kv) if kv_proj is None else kv_proj)
        B = k.shape[0]
        if self.pool:
            q = self.mat_q.to(k.dtype).unsqueeze(2).expand(B, -1, -1, -1)
        else:
            q = linear(x, self.mat_q).view(B, -1, self.num_heads, self.head_dim).transpose(1, 2)
        o, _ = attention(q, k, v, 1.0 / math.sqrt(self.head_dim), key_lengths=kv_lengths)
        o = o.transpose(1, 2).reshape(B, q.shape[2], -1)
        return linear(o, self.proj)


class FFN(nn.Module):
    """fc1 (hidden, C) -> GELU(tanh) -> fc2 (C, hidden)."""

    def __init__(self, width: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(width, hidden)
        self.fc2 = nn.Linear(hidden, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(F.gelu(linear(x, self.fc1), approximate="tanh"), self.fc2)


class CrossAttnBlock(nn.Module):
    """One Infinity block: shared-AdaLN self-attention, cross-attention to text, FFN.

    ada_gss (1, 1, 6, C) is added to the shared AdaLN output (B, 1, 6, C) and unbound as
    gamma1, gamma2, scale1, scale2, shift1, shift2; ca_norm is an affine LayerNorm.
    """

    def __init__(self, width: int, num_heads: int, mlp_hidden: int, eps: float):
        super().__init__()
        self.eps = eps
        self.sa = SelfAttention(width, num_heads)
        self.ca = CrossAttention(width, width, num_heads)
        self.ffn = FFN(width, mlp_hidden)
        self.ca_norm = nn.LayerNorm(width, eps=eps)
        self.ada_gss = nn.Parameter(torch.randn(1, 1, 6, width) / width ** 0.5)

    def modulation(self, ada: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """ada (B, 1, 6, C) float32 -> gamma1, gamma2, scale1, scale2, shift1, shift2, each (B, 1, C)."""
        return (self.ada_gss.float() + ada).unbind(2)

    def attention_inputs(self, x: torch.Tensor, ada: torch.Tensor, rope: torch.Tensor
                         ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x (B, n, C) float32, ada (B, 1, 6, C), rope (2, n, hd/2) -> the self-attention's q, k, v
        (B, H, n, hd) in the compute dtype (modulated LayerNorm, projection, q/k normalisation, RoPE)."""
        _, _, s1, _, b1, _ = self.modulation(ada)
        return self.sa.qkv(layer_norm(x, self.eps) * (s1 + 1) + b1, rope)

    def attention_outputs(self, x: torch.Tensor, ada: torch.Tensor, o: torch.Tensor, ca_kv: torch.Tensor | None,
                          ca_lengths: torch.Tensor, ca_kv_proj: torch.Tensor | None = None) -> torch.Tensor:
        """x (B, n, C) float32 (the block's input), o (B, H, n, hd) the self-attention output ->
        x (B, n, C) float32 after the self-attention residual, the cross-attention and the FFN.
        ``ca_kv_proj``: the cross-attention's text keys/values ``ca.kv_proj(ca_kv)`` (B, L, 2C), computed
        beforehand (then ``ca_kv`` is unused)."""
        g1, g2, _, s2, _, b2 = self.modulation(ada)
        x = x + self.sa.output(o).float() * g1
        x = x + self.ca(layer_norm(x, self.eps, self.ca_norm.weight, self.ca_norm.bias), ca_kv, ca_lengths,
                        ca_kv_proj).float()
        h = layer_norm(x, self.eps) * (s2 + 1) + b2
        return x + self.ffn(h).float() * g2

    def forward(self, x: torch.Tensor, ada: torch.Tensor, ca_kv: torch.Tensor, ca_lengths: torch.Tensor,
                rope: torch.Tensor, past_k: torch.Tensor, past_v: torch.Tensor,
                attn_mask: torch.Tensor | None = None, entropy: str | None = None):
        """x (B, n, C) float32; ada (B, 1, 6, C) float32; ca_kv (B, L, C); ca_lengths (B,) int32;
        rope (2, n, hd/2); past_k/v (B, H, P, hd).

        Returns x (B, n, C) float32, k, v (B, H, n, hd), self-attention entropy (see SelfAttention.attend).
        """
        q, k, v = self.attention_inputs(x, ada, rope)
        o, ent = self.sa.attend(q, torch.cat([past_k, k], dim=2), torch.cat([past_v, v], dim=2), attn_mask, entropy)
        return self.attention_outputs(x, ada, o, ca_kv, ca_lengths), k, v, ent


class TextAttentivePool(nn.Module):
    """Pools normalised text features (B, L, C_text) into one vector (B, C) by a learned query."""

    def __init__(self, text_channels: int, width: int, num_heads: int):
        super().__init__()
        self.ca = CrossAttention(width, text_channels, num_heads, pool=True)

    def forward(self, text: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        return self.ca(None, text, lengths).squeeze(1)


class AdaLNBeforeHead(nn.Module):
    """LayerNorm modulated by SiLU -> Linear(C_cond, 2C) (scale, shift), in float32."""

    def __init__(self, width: int, cond_width: int, eps: float):
        super().__init__()
        self.width, self.eps = width, eps
        self.ada_lin = nn.Sequential(nn.SiLU(), nn.Linear(cond_width, 2 * width))

    def forward(self, x: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        lin = self.ada_lin[1]
        ss = F.linear(F.silu(cond.float()), lin.weight.float(), lin.bias.float())
        scale, shift = ss.view(-1, 1, 2, self.width).unbind(2)
        return layer_norm(x, self.eps) * (scale + 1) + shift
