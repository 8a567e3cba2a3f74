"""The Infinity transformer, checkpoint-compatible with FoundationVision/Infinity.

State-dict layout (2B: 22 top-level keys + 21 per block): cfg_uncond, pos_start, text_norm,
text_proj_for_sos.ca.*, text_proj_for_ca.{0,2}, lvl_embed, word_embed, shared_ada_lin.1,
head_nm.ada_lin.1, head, block_chunks.{c}.module.{j}.*.

The model is used through small methods that are also the exported graph pieces
(``toprovar.model.pieces``): text conditioning, scale input embedding, one block with a KV cache, head.
"""
from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..config import ModelConfig
from .checkpoint import load_into
from .layers import AdaLNBeforeHead, CrossAttnBlock, TextAttentivePool, linear
from .seeded import build_seeded


class RMSNorm(nn.Module):
    """x * rsqrt(mean(x^2) + eps) * weight, in float32."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.float()
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight.float()


class MultipleLayers(nn.Module):
    """A chunk of blocks (the official ``block_chunks.{c}.module.{j}`` nesting)."""

    def __init__(self, blocks: list[nn.Module]):
        super().__init__()
        self.module = nn.ModuleList(blocks)


class Infinity(nn.Module):
    """Infinity text-to-image VAR transformer (bitwise head).

    Shapes: text (B, L, C_text) float; C = width; H heads of hd = C/H; token_bits bits per token.
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        C, Ct = cfg.width, cfg.text_channels
        init_std = math.sqrt(1 / C / 3)
        self.cfg_uncond = nn.Parameter(torch.nn.init.trunc_normal_(torch.empty(cfg.text_maxlen, Ct), std=1.2) / Ct ** 0.5)
        self.pos_start = nn.Parameter(torch.nn.init.trunc_normal_(torch.empty(1, 1, C), std=init_std))
        self.text_norm = RMSNorm(Ct, cfg.norm_eps)
        self.text_proj_for_sos = TextAttentivePool(Ct, C, cfg.pool_heads)
        self.text_proj_for_ca = nn.Sequential(nn.Linear(Ct, C), nn.GELU(approximate="tanh"), nn.Linear(C, C))
        self.lvl_embed = nn.Embedding(15, C)
        nn.init.trunc_normal_(self.lvl_embed.weight, std=init_std)
        self.word_embed = nn.Linear(cfg.token_bits, C)
        self.shared_ada_lin = nn.Sequential(nn.SiLU(), nn.Linear(C, 6 * C))
        per_chunk = cfg.depth // cfg.block_chunks
        self.block_chunks = nn.ModuleList(
            MultipleLayers([CrossAttnBlock(C, cfg.num_heads, cfg.mlp_hidden, cfg.norm_eps) for _ in range(per_chunk)])
            for _ in range(cfg.block_chunks))
        self.head_nm = AdaLNBeforeHead(C, C, cfg.norm_eps)
        self.head = nn.Linear(C, 2 * cfg.token_bits)

    # ---------------------------------------------------------------- structure
    @property
    def blocks(self) -> list[CrossAttnBlock]:
        return [b for chunk in self.block_chunks for b in chunk.module]

    @property
    def compute_dtype(self) -> torch.dtype:
        return self.word_embed.weight.dtype

    def to_inference_dtype(self, dtype: torch.dtype, keep_fp32_params: bool = False) -> "Infinity":
        """Cast the text projections, the word embedding and the blocks to ``dtype``; the shared AdaLN, the
        head and the norms outside the blocks stay float32.

        As the official ``load_infinity(bf16=True)`` (``block.bfloat16()``), every block parameter is cast,
        ``ada_gss``, ``ca_norm`` and ``sa.scale_mul_1H11`` included (our AdaLN, norm and attention-scale math
        reads them in float32, as autocast does in the official run; the scale's clamp at ln 100 happens in
        ``dtype``). ``keep_fp32_params=True`` keeps those three float32 at their original values: a deviation
        from the official model (tests/test_model.py measures both against a float64 reference).
        """
        kept = [p for b in self.blocks for p in (b.ada_gss, *b.ca_norm.parameters(), b.sa.scale_mul_1H11)]
        values = [p.detach().float().clone() for p in kept] if keep_fp32_params else []
        for m in [self.text_proj_for_sos, self.text_proj_for_ca, self.word_embed, *self.blocks]:
            m.to(dtype)
        for p, v in zip(kept, values):
            p.data = v
        return self

    # ---------------------------------------------------------------- pieces
    def condition(self, text: torch.Tensor, lengths: torch.Tensor, cfg: bool):
        """Text features -> conditioning, with the learned empty text appended for CFG.

        text (B, L, C_text) float, lengths (B,) int32. With ``cfg`` the batch doubles to [cond; uncond]
        (uncond = cfg_uncond[:L], same lengths). Returns cond (B', C) float32, ada (B', 1, 6, C) float32,
        ca_kv (B', L, C) compute dtype, lengths (B',) int32.
        """
        if cfg:
            unc = self.cfg_uncond[: text.shape[1]].to(text.dtype).unsqueeze(0).expand_as(text)
            text = torch.cat([text, unc], dim=0)
            lengths = torch.cat([lengths, lengths], dim=0)
        t = self.text_norm(text)
        cond = self.text_proj_for_sos(t, lengths).float()
        lin = self.shared_ada_lin[1]
        ada = F.linear(F.silu(cond), lin.weight.float(), lin.bias.float()).view(-1, 1, 6, self.cfg.width)
        p0, p2 = self.text_proj_for_ca[0], self.text_proj_for_ca[2]
        ca_kv = linear(F.gelu(linear(t, p0), approximate="tanh"), p2)
        return cond, ada, ca_kv, lengths.to(torch.int32)

    def first_input(self, cond: torch.Tensor) -> torch.Tensor:
        """Scale-0 input (B', 1, C) float32: pooled text + pos_start + lvl_embed[0]."""
        return cond.unsqueeze(1) + self.pos_start.float() + self.lvl_embed.weight[0].float()

    def embed_scale(self, codes_in: torch.Tensor, scale_index: int) -> torch.Tensor:
        """Next-scale input: codes (B, n, token_bits) float32 -> (B, n, C) float32 with lvl_embed."""
        return linear(codes_in, self.word_embed).float() + self.lvl_embed.weight[scale_index].float()

    def logits(self, x: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        """Head in float32: x (B, n, C), cond (B, C) -> logits (B, n, token_bits, 2)."""
        h = self.head_nm(x, cond)
        out = F.linear(h, self.head.weight.float(), self.head.bias.float())
        return out.view(x.shape[0], x.shape[1], -1, 2)

    # ---------------------------------------------------------------- tests / teacher forcing
    def forward_teacher(self, cond: torch.Tensor, ada: torch.Tensor, ca_kv: torch.Tensor, lengths: torch.Tensor,
                        x: torch.Tensor, ropes: list[torch.Tensor], counts: list[int]) -> torch.Tensor:
        """Non-cached forward over all scales at once with a block-causal mask.

        x (B, sum(counts), C) float32 (each scale's input incl. lvl_embed); ropes: per scale (2, n_s, hd/2).
        Returns logits (B, sum(counts), token_bits, 2).
        """
        N = sum(counts)
        sid = torch.repeat_interleave(torch.arange(len(counts)), torch.tensor(counts)).to(x.device)
        mask = sid[:, None] >= sid[None, :]
        rope = torch.cat(ropes, dim=1)
        B, H, hd = x.shape[0], self.cfg.num_heads, self.cfg.head_dim
        empty = x.new_zeros(B, H, 0, hd, dtype=self.compute_dtype)
        for blk in self.blocks:
            x, _, _, _ = blk(x, ada, ca_kv, lengths, rope, empty, empty, attn_mask=mask)
        assert x.shape[1] == N
        return self.logits(x, cond)

    # ---------------------------------------------------------------- checkpoints
    @staticmethod
    def adapt_official(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Official-format adapters: a flash-layout scale_mul_1H11 (1, 1, H, 1) becomes (1, H, 1, 1)."""
        out = {}
        for k, v in sd.items():
            if k.endswith("sa.scale_mul_1H11") and v.dim() == 4 and v.shape[1] == 1 and v.shape[2] > 1:
                v = v.reshape(1, -1, 1, 1)
            out[k] = v
        return out

    def load_checkpoint(self, path: str | Path) -> "Infinity":
        """Strictly load an official ``.pth`` or a safetensors checkpoint (CheckpointError on mismatch)."""
        load_into(self, path, rename=self.adapt_official)
        return self


def build_model(cfg: ModelConfig, seed: int | None = 0, device: str | torch.device = "cpu") -> Infinity:
    """Build an Infinity model with random weights drawn from ``seed`` (deterministic)."""
    return build_seeded(lambda: Infinity(cfg), seed, device)
