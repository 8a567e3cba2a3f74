"""The HART text-to-image transformer (official ``HARTForT2I`` as released for 1024px), checkpoint-compatible.

Released configuration (``attn_type = mlp_type = "llama"``, ``disable_aln``, no shared AdaLN, no cross-attention,
``use_timestep_embed``, ``use_context_norm``, no q/k L2 norm): each block is
``x += proj(attn(rmsnorm(x)))``, ``x += down(silu(gate(h)) * up(h))`` with ``h = rmsnorm(x)``; attention scale
0.25/sqrt(hd); q/k rotated by RoPE before the KV cache. Scale 0 is the text: the L (= ``context_token``) projected
Qwen2 features, with 1D RoPE at their context positions; scale s > 0 is the h x w token map with 2D RoPE at
positions (i, j) * G / pn + (last context position), G the last scale's side. The head sees AdaLN conditioned on
the max over the context tokens' projections; the codes are 4096-way categorical (``vocab_size``).

State-dict keys: word_embed, context_embed, context_norm.weight, lvl_embed.mlp.{0,2} (a sinusoidal "timestep"
embedding of the scale index), blocks.{i}.{ln_wo_grad.weight, attn.{qkv_proj.weight, q_bias, v_bias, zero_k_bias,
proj}, ffn.{gate_proj, up_proj, down_proj}}, head_nm.{ln_wo_grad.weight, ada_lin.1}, head, decoder_norm.weight,
diffloss.net.* (``diffusion.py``). The codebook and quant_resi convolutions (``quantize.*``) come from the
tokenizer checkpoint (``tokenizer.py``). The official training buffers ``lvl_1L`` and ``attn_bias_for_masking``
are derived from the config and dropped on load.

Conventions as in ``toprovar.model.layers``: residual stream float32, matrix products in the block dtype, norms,
RoPE and the head in float32. In the orchestrator's slots: ``ada`` (B', 1) float32 holds each row's last context
position (what the official adds to the 2D positions), ``ca_kv``/``ca_lengths`` are the text rows' unused
projections / context lengths, ``rope`` (2, n, 2) per scale: [0] the positions (row, col) or (i, i) for context
tokens, [1] the context flag.
"""
from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from ...config import ModelConfig
from ...ops import attention
from ..checkpoint import CheckpointError, check_state_dict, read_state_dict
from ..layers import linear
from ..seeded import build_seeded
from .diffusion import DiffLoss, TimestepEmbedder
from .tokenizer import HybridQuantizer

ROPE_BASE = 10000.0
DERIVED_BUFFERS = ("lvl_1L", "attn_bias_for_masking")


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x * rsqrt(mean(x^2) + eps) * weight over the last dim, in float32."""
    x = x.float()
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight.float()


class RMSNorm(nn.Module):
    """RMS norm with a weight (the official ``LlamaRMSNormFused`` keeps one even when 'without affine')."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """(..., d) -> cat(-x[d/2:], x[:d/2])."""
    a, b = x.chunk(2, dim=-1)
    return torch.cat([-b, a], dim=-1)


def rope_cos_sin(rope: torch.Tensor, offset: torch.Tensor, head_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The official (quirky) RoPE tables per row: rope (2, n, 2) float32 (see the module docstring), offset (B, 1)
    float32 -> cos, sin (B, n, head_dim) float32.

    Image tokens: positions p_a = pos_a + offset (a = row, col); element j uses angle p_{j // (d/2)} * f_{j % (d/4)},
    f_k = base^(-4k/d). Context tokens: position min(i, offset), element j uses p * g_{j % (d/2)}, g_k = base^(-2k/d).
    Both are applied as x * cos + rotate_half(x) * sin (rotate_half pairs j with j + d/2)."""
    dev = rope.device
    f4 = 1.0 / ROPE_BASE ** (torch.arange(0, head_dim, 4, dtype=torch.int64, device=dev).float() / head_dim)
    f2 = 1.0 / ROPE_BASE ** (torch.arange(0, head_dim, 2, dtype=torch.int64, device=dev).float() / head_dim)
    pos, flag = rope[0].float(), rope[1, ..., :1].float()  # (n, 2), (n, 1); or per row (B, n, ...)
    if pos.dim() == 2:
        pos, flag = pos.unsqueeze(0), flag.unsqueeze(0)
    p2 = pos + offset.float().unsqueeze(-1)  # (B, n, 2)
    a_row = p2[..., :1] * f4
    a_col = p2[..., 1:] * f4
    ang2 = torch.cat([a_row, a_row, a_col, a_col], dim=-1)
    p1 = torch.minimum(pos[..., :1], offset.float().unsqueeze(-1))  # (B, n, 1)
    a1 = p1 * f2
    ang1 = torch.cat([a1, a1], dim=-1)
    ang = torch.where(flag > 0.5, ang1, ang2)
    return ang.cos(), ang.sin()


class HartAttention(nn.Module):
    """Self-attention with the official q/v biases, RoPE and a cross-scale KV cache (no q/k normalisation)."""

    def __init__(self, width: int, num_heads: int):
        super().__init__()
        self.num_heads, self.head_dim = num_heads, width // num_heads
        self.scale = 0.25 / math.sqrt(self.head_dim)
        self.qkv_proj = nn.Linear(width, 3 * width, bias=False)
        self.q_bias = nn.Parameter(torch.zeros(width))
        self.v_bias = nn.Parameter(torch.zeros(width))
        self.register_buffer("zero_k_bias", torch.zeros(width))
        self.proj = nn.Linear(width, width)

    def qkv(self, x: torch.Tensor, offset: torch.Tensor, rope: torch.Tensor):
        """x (B, n, C), offset (B, 1), rope (2, n, 2) or per row (2, B, n, 2) -> q, k, v (B, H, n, hd) token-major
        views, compute dtype."""
        B, n, _ = x.shape
        bias = torch.cat([self.q_bias, self.zero_k_bias.to(self.q_bias.dtype), self.v_bias])
        q, k, v = linear(x, self.qkv_proj, bias).view(B, n, 3, self.num_heads, self.head_dim).unbind(2)
        cos, sin = (t.unsqueeze(2) for t in rope_cos_sin(rope, offset, self.head_dim))  # (B, n, 1, hd)
        dt = self.qkv_proj.weight.dtype
        q = (q.float() * cos + rotate_half(q.float()) * sin).to(dt)
        k = (k.float() * cos + rotate_half(k.float()) * sin).to(dt)
        return q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)

    def attend(self, q, keys, vals, attn_mask=None, entropy=None):
        """q (B, H, n, hd); keys/vals (B, H, P+n, hd) -> (o (B, H, n, hd), entropy | None); ``attn_mask`` (n, P+n)
        bool only for teacher forcing."""
        if attn_mask is not None:
            return F.scaled_dot_product_attention(q, keys, vals, attn_mask=attn_mask, scale=self.scale), None
        return attention(q, keys, vals, self.scale, entropy=entropy)

    def output(self, o: torch.Tensor) -> torch.Tensor:
        B, H, n, hd = o.shape
        return linear(o.transpose(1, 2).reshape(B, n, H * hd), self.proj)


class LlamaMLP(nn.Module):
    """down(silu(gate(x)) * up(x)), no biases."""

    def __init__(self, width: int, hidden: int):
        super().__init__()
        self.gate_proj = nn.Linear(width, hidden, bias=False)
        self.up_proj = nn.Linear(width, hidden, bias=False)
        self.down_proj = nn.Linear(hidden, width, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(F.silu(linear(x, self.gate_proj)) * linear(x, self.up_proj), self.down_proj)


class HartBlock(nn.Module):
    """One block; the same method contract as ``toprovar.model.layers.CrossAttnBlock`` (``ada`` = per-row
    context offset (B', 1), ``ca_kv``/``ca_lengths`` unused)."""

    def __init__(self, width: int, num_heads: int, mlp_hidden: int, eps: float):
        super().__init__()
        self.eps = eps
        self.attn = HartAttention(width, num_heads)
        self.ffn = LlamaMLP(width, mlp_hidden)
        self.ln_wo_grad = RMSNorm(width, eps)

    @property
    def sa(self) -> HartAttention:
        return self.attn

    def attention_inputs(self, x, ada, rope):
        """x (B, n, C) float32, ada (B, 1), rope (2, n, 2) -> q, k, v (B, H, n, hd)."""
        return self.attn.qkv(self.ln_wo_grad(x), ada, rope)

    def attention_outputs(self, x, ada, o, ca_kv, ca_lengths):
        """x (B, n, C) float32 (block input), o (B, H, n, hd) -> x (B, n, C) float32 after attention and MLP."""
        x = x + self.attn.output(o).float()
        return x + self.ffn(self.ln_wo_grad(x)).float()

    def branches(self, ada, rope, past_k, past_v, kv: dict):
        """The residual branches for sub-layer-wise execution (FastVAR): [(name, fn(tokens, idx) -> branch
        output float32)]; idx (B, k) selects the tokens' RoPE rows; the self-attention's new k/v go into ``kv``."""
        def sa(t, idx):
            r = rope if idx is None else rope[:, idx]
            q, k, v = self.attn.qkv(self.ln_wo_grad(t), ada, r)
            o, _ = self.attn.attend(q, torch.cat([past_k, k], dim=2), torch.cat([past_v, v], dim=2))
            kv["k"], kv["v"] = k, v
            return self.attn.output(o).float()

        def ffn(t, idx):
            return self.ffn(self.ln_wo_grad(t)).float()
        return [("sa", sa), ("ffn", ffn)]

    def forward(self, x, ada, ca_kv, ca_lengths, rope, past_k, past_v, attn_mask=None, entropy=None):
        """As ``CrossAttnBlock.forward``: -> x (B, n, C) float32, k, v (B, H, n, hd), entropy | None."""
        q, k, v = self.attention_inputs(x, ada, rope)
        o, ent = self.attn.attend(q, torch.cat([past_k, k], dim=2), torch.cat([past_v, v], dim=2), attn_mask, entropy)
        return self.attention_outputs(x, ada, o, ca_kv, ca_lengths), k, v, ent


class AdaLNBeforeHead(nn.Module):
    """rmsnorm(x) * (1 + scale) + shift, (scale, shift) = Linear(SiLU(cond)), in float32."""

    def __init__(self, width: int, eps: float):
        super().__init__()
        self.width = width
        self.ln_wo_grad = RMSNorm(width, eps)
        self.ada_lin = nn.Sequential(nn.SiLU(), nn.Linear(width, 2 * width))

    def forward(self, x: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        lin = self.ada_lin[1]
        scale, shift = F.linear(F.silu(cond.float()), lin.weight.float(), lin.bias.float()
                                ).view(-1, 1, 2, self.width).unbind(2)
        return self.ln_wo_grad(x) * (scale + 1) + shift


TRANSFORMER_CHILDREN = ("word_embed", "context_embed", "context_norm", "lvl_embed", "blocks", "head_nm", "head",
                        "decoder_norm", "diffloss")


class Hart(nn.Module):
    """HART transformer + residual diffusion MLP + the tokenizer's codebook (``quantize``).

    Shapes: text (B, L, C_text) float32 with L = ``text_maxlen`` (context_token); C = width; V = vocab_size;
    Cvae = codebook_dim.
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        C, eps = cfg.width, cfg.norm_eps
        self.word_embed = nn.Linear(cfg.codebook_dim, C)
        self.context_embed = nn.Linear(cfg.text_channels, C)
        self.context_norm = RMSNorm(cfg.text_channels, eps)
        self.lvl_embed = TimestepEmbedder(C)  # the scale index embedded as the diffusion MLP embeds a timestep
        self.blocks = nn.ModuleList(HartBlock(C, cfg.num_heads, cfg.mlp_hidden, eps) for _ in range(cfg.depth))
        self.head_nm = AdaLNBeforeHead(C, eps)
        self.head = nn.Linear(C, cfg.vocab_size)
        self.decoder_norm = RMSNorm(C, eps)
        self.diffloss = DiffLoss(cfg.codebook_dim, C, cfg.diff_width, cfg.diff_depth, cfg.diff_steps)
        self.quantize = HybridQuantizer(cfg.vocab_size, cfg.codebook_dim)
        self._random_init()

    def _random_init(self) -> None:
        """Random weights for tests and benchmarks (trained weights replace them): N(0, 1/fan_in) matrices (q/k
        twice that std, so attention is not uniform and per-token entropies differ clearly), unit norms, a head
        whose logits spread over the codes, a unit-variance codebook."""
        for name, p in self.named_parameters():
            if name.endswith("weight") and p.dim() >= 2:
                std = p.shape[1] ** -0.5 * (2.0 if "qkv_proj" in name else 1.0) * (0.25 if "down_proj" in name else 1)
                nn.init.normal_(p, std=std)
            elif name.endswith("bias") or name.endswith("_bias"):
                nn.init.normal_(p, std=0.02)
        nn.init.normal_(self.quantize.embedding.weight, std=1.0)

    # ---------------------------------------------------------------- structure
    @property
    def compute_dtype(self) -> torch.dtype:
        """The blocks' matrix dtype (q/k/v and the KV caches); embeddings stay float32 (``to_inference_dtype``)."""
        return self.blocks[0].attn.qkv_proj.weight.dtype

    def to_inference_dtype(self, dtype: torch.dtype, keep_fp32_params: bool = False) -> "Hart":
        """Cast the blocks' matrices and the diffusion MLP's linear layers to ``dtype``; embeddings, norms, head,
        the MLP's LayerNorms and the codebook stay float32 (so ``keep_fp32_params``, Infinity's option, changes
        nothing here)."""
        for b in self.blocks:
            b.attn.to(dtype)
            b.ffn.to(dtype)
        for m in self.diffloss.net.modules():
            if isinstance(m, nn.Linear):
                m.to(dtype)
        return self

    # ---------------------------------------------------------------- pieces
    def condition(self, text: torch.Tensor, lengths: torch.Tensor, cfg: bool):
        """text (B, L, C_text) float32, lengths (B,) int32 -> cond (B', C) float32 (max over the context tokens'
        projections: the head's AdaLN input), ada (B', 1) float32 (last context position = length - 1),
        ca_kv (B', L, C) float32 (the context tokens' projections), ca_lengths (B',) int32, x0 (B', L, C) float32
        (scale-0 input). With ``cfg`` the batch doubles to [cond; uncond]: the official empty text is all zeros
        with length 1."""
        if cfg:
            text = torch.cat([text, torch.zeros_like(text)], dim=0)
            lengths = torch.cat([lengths, torch.ones_like(lengths)], dim=0)
        ctx = F.linear(self.context_norm(text), self.context_embed.weight.float(), self.context_embed.bias.float())
        cond = ctx.max(dim=1).values
        ada = (lengths.float() - 1).unsqueeze(1)
        x0 = ctx + self.level(0).to(ctx.device)
        return cond, ada, ctx, lengths.to(torch.int32), x0

    def level(self, si: int) -> torch.Tensor:
        """The scale-index embedding (C,) float32."""
        return self.lvl_embed(torch.full((1,), si, dtype=torch.int64, device=self.word_embed.weight.device))[0]

    def embed_scale(self, codes_in: torch.Tensor, scale_index: int) -> torch.Tensor:
        """codes (B, n, Cvae) float32 -> (B, n, C) float32: word_embed + level embedding."""
        w = self.word_embed
        return F.linear(codes_in.float(), w.weight.float(), w.bias.float()) + self.level(scale_index)

    def logits(self, x: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        """Head in float32: x (B, n, C), cond (B, C) -> logits (B, n, V)."""
        h = self.head_nm(x.float(), cond)
        return F.linear(h, self.head.weight.float(), self.head.bias.float())

    def residual_condition(self, x: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
        """The diffusion MLP's condition at the last scale: x (B', n, C) last-layer output, codes (B', n, Cvae)
        the sampled discrete codes -> decoder_norm(x + word_embed(codes)) (B', n, C) float32."""
        w = self.word_embed
        return self.decoder_norm(x.float() + F.linear(codes.float(), w.weight.float(), w.bias.float()))

    # ---------------------------------------------------------------- tests / teacher forcing
    def forward_teacher(self, cond, ada, x: torch.Tensor, ropes: list[torch.Tensor], counts: list[int]) -> torch.Tensor:
        """Non-cached forward over all scales at once with a block-causal mask: x (B, sum(counts), C) float32
        (scale 0 = the context tokens), ropes per scale (2, n_s, 2) -> logits (B, sum(counts), V)."""
        sid = torch.repeat_interleave(torch.arange(len(counts)), torch.tensor(counts)).to(x.device)
        mask = sid[:, None] >= sid[None, :]
        rope = torch.cat(ropes, dim=1)
        B, H, hd = x.shape[0], self.cfg.num_heads, self.cfg.head_dim
        empty = x.new_zeros(B, H, 0, hd, dtype=self.compute_dtype)
        for blk in self.blocks:
            x, _, _, _ = blk(x, ada, None, None, rope, empty, empty, attn_mask=mask)
        return self.logits(x, cond)

    # ---------------------------------------------------------------- checkpoints
    def transformer_view(self) -> nn.Module:
        """A module over the transformer's children only (the official ``HARTForT2I`` state-dict layout), sharing
        their parameters."""
        view = nn.Module()
        for name in TRANSFORMER_CHILDREN:
            view.add_module(name, getattr(self, name))
        return view

    def load_checkpoint(self, path: str | Path) -> "Hart":
        """Strictly load the official transformer checkpoint (``llm/`` directory: ``ema_model.bin`` if present,
        else ``model.safetensors``; or a file: .bin/.pth/.safetensors). CheckpointError names the first
        offending keys."""
        path = Path(path)
        if path.is_dir():
            cands = [path / n for n in ("ema_model.bin", "model.safetensors", "pytorch_model.bin")]
            found = [c for c in cands if c.is_file()]
            if not found:
                raise CheckpointError(f"{path}: no ema_model.bin / model.safetensors in this directory")
            path = found[0]
        sd = {k: v for k, v in read_state_dict(path).items() if k not in DERIVED_BUFFERS}
        view = self.transformer_view()
        check_state_dict(view, sd, str(path))
        view.load_state_dict(sd, strict=True)
        return self

    def load_tokenizer(self, path: str | Path) -> None:
        """The codebook and quant_resi convolutions from the tokenizer checkpoint (see ``tokenizer.py``)."""
        from .tokenizer import read_tokenizer_state
        sd = read_tokenizer_state(path)
        mine = {k.removeprefix("quantize."): v for k, v in sd.items() if k.startswith("quantize.")
                and not k.endswith("ema_vocab_hit_SV")}
        check_state_dict(self.quantize, mine, f"{path} (quantize.*)")
        self.quantize.load_state_dict(mine, strict=True)


def hart_rope_tables(cfg: ModelConfig, schedule: list[tuple[int, int]]) -> list[torch.Tensor]:
    """Per scale (2, n, 2) float32 (module docstring): scale 0 has ``text_maxlen`` context rows (the orchestrator
    slices the ones it runs), scale s > 0 the (i, j) * G / pn positions in row-major order."""
    G = schedule[-1][0]
    out = []
    L = cfg.text_maxlen
    i = torch.arange(L, dtype=torch.float32)
    out.append(torch.stack([torch.stack([i, i], -1), torch.ones(L, 2)]))
    for h, w in schedule[1:]:
        r = torch.arange(h).float() / h * G
        c = torch.arange(w).float() / w * G
        pos = torch.stack(torch.meshgrid(r, c, indexing="ij"), dim=-1).reshape(h * w, 2)
        out.append(torch.stack([pos, torch.zeros(h * w, 2)]))
    return out


def build_hart(cfg: ModelConfig, seed: int | None = 0, device: str | torch.device = "cpu") -> Hart:
    """A HART model with random weights drawn from ``seed`` (deterministic)."""
    return build_seeded(lambda: Hart(cfg), seed, device)
