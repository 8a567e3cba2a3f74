"""HART's piece specifications for ``toprovar-export`` (``export/pieces.py`` for the family ``hart``): the same
piece names and contracts as Infinity's (``docs/export-format.md``), over the modules of
``toprovar.model.hart.pieces`` that the PyTorch backend runs, plus ``diffusion_head`` (the residual diffusion MLP
with its sampler, run after ``head_sXX`` of the last scale, whose second output ``hard`` feeds it).

Differences of the contracts: ``ada`` (B', 1) float32 (each row's last context position); blocks take no text
(``ca_kv``/``ca_lengths`` are not inputs); ``rope`` (2, n, 2) float32 positions and context flag; scale 0 runs the
L = ``text_maxlen`` context tokens; the heads take no ``tau`` and output the codes (B, n, Cvae).
"""
from __future__ import annotations

import torch
import torch.nn as nn

from toprovar.model.hart.pieces import (HartConditionPiece, HartDiffusionPiece, HartHeadPiece, HartNextInputPiece,
                                        noise_widths)
from toprovar.model.hart.transformer import Hart
from toprovar.schedule import token_counts

from .pieces import Axis, ExportSettings, PieceSpec, _gen, _profile, _rand, policy_spec


class HartBlockPiece(nn.Module):
    """x (B', n, C) float32, ada (B', 1), rope (2, n, 2), past_k/past_v (B', H, P, hd) -> x, k, v [, entropy]."""

    def __init__(self, block, entropy: bool):
        super().__init__()
        self.block, self.entropy = block, entropy

    def forward(self, x, ada, rope, past_k, past_v):
        x, k, v, ent = self.block(x, ada, None, None, rope, past_k, past_v, entropy="mean" if self.entropy else None)
        return (x, k, v, ent) if self.entropy else (x, k, v)


class HartExportHead(nn.Module):
    """``HartHeadPiece`` without the unused ``tau`` input; at the last scale without the residual (the
    ``diffusion_head`` piece adds it) and with the hard codes as a second output."""

    def __init__(self, piece: HartHeadPiece):
        super().__init__()
        self.piece = piece

    def forward(self, x, cond, uniform, cfg, top_p):
        codes, hard = self.piece.discrete(self.piece.logits(x, cond), uniform, cfg, top_p)
        return (codes, hard) if self.piece.last else codes


def _counts(model: Hart, st: ExportSettings) -> list[int]:
    """Tokens each scale runs (scale 0: the context tokens)."""
    return [model.cfg.text_maxlen] + token_counts(st.schedule)[1:]


def condition_spec(model: Hart, st: ExportSettings, cfg_batch: bool) -> PieceSpec:
    c = model.cfg
    B, L = 2, c.text_maxlen
    text = _rand(B, L, c.text_channels, seed=1)
    lengths = torch.tensor([L, 3], dtype=torch.int32)
    prof = _profile({"text": ((1, L, c.text_channels), (st.batch_size, L, c.text_channels),
                              (st.max_batch_size, L, c.text_channels)),
                     "lengths": ((1,), (st.batch_size,), (st.max_batch_size,))})
    return PieceSpec(
        name="condition_cfg" if cfg_batch else "condition", module=HartConditionPiece(model, cfg_batch),
        inputs=["text", "lengths"], outputs=["cond", "ada", "ca_kv", "ca_lengths", "x0"],
        sample=(text, lengths), dynamic={"text": {0: "B"}, "lengths": {0: "B"}}, axes={"B": Axis("B", 1)},
        profiles=[prof], kind="condition",
        description=f"context tokens{' with the CFG batch [cond; zero text]' if cfg_batch else ''}")


def block_spec(model: Hart, st: ExportSettings, layer: int, entropy: bool) -> PieceSpec:
    c = model.cfg
    C, H, hd = c.width, c.num_heads, c.head_dim
    dt = st.dtype
    Bp, n, P = 2, 5, 7
    rope = torch.cat([torch.rand(1, n, 2, generator=_gen(5)) * 8, torch.zeros(1, n, 2)])
    sample = (_rand(Bp, n, C, seed=2), torch.tensor([[3.0], [0.0]]), rope,
              _rand(Bp, H, P, hd, dtype=dt, seed=6), _rand(Bp, H, P, hd, dtype=dt, seed=7))
    dynamic = {"x": {0: "Bp", 1: "n"}, "ada": {0: "Bp"}, "rope": {1: "n"}, "past_k": {0: "Bp", 2: "P"},
               "past_v": {0: "Bp", 2: "P"}}
    axes = {"Bp": Axis("Bp", 1), "n": Axis("n", 1), "P": Axis("P", 0)}
    b_min, b_opt, b_max = 1, 2 * st.batch_size, 2 * st.max_batch_size
    counts = _counts(model, st)
    profiles = []
    for si, ns in enumerate(counts):
        mt = st.min_tokens if isinstance(st.min_tokens, int) else st.min_tokens[si]
        nmin = max(1, min(mt, ns))
        pmax = sum(counts[:si])
        profiles.append(_profile({
            "x": ((b_min, nmin, C), (b_opt, ns, C), (b_max, ns, C)),
            "ada": ((b_min, 1), (b_opt, 1), (b_max, 1)),
            "rope": ((2, nmin, 2), (2, ns, 2), (2, ns, 2)),
            "past_k": ((b_min, H, 0, hd), (b_opt, H, pmax, hd), (b_max, H, pmax, hd)),
            "past_v": ((b_min, H, 0, hd), (b_opt, H, pmax, hd), (b_max, H, pmax, hd)),
        }))
    return PieceSpec(
        name=f"block_{layer:02d}" + ("_entropy" if entropy else ""),
        module=HartBlockPiece(model.blocks[layer], entropy), inputs=["x", "ada", "rope", "past_k", "past_v"],
        outputs=["x_out", "k", "v"] + (["entropy"] if entropy else []), sample=sample, dynamic=dynamic, axes=axes,
        profiles=profiles, layer=layer, kind="block",
        custom_ops=["toprovar::FlashAttentionEntropy"] if entropy else [],
        description=f"HART block {layer}" + (" with FAE self-attention entropy" if entropy else ""))


def head_spec(model: Hart, st: ExportSettings, si: int, cfg_batch: bool) -> PieceSpec:
    c = model.cfg
    h, w = st.schedule[si]
    n, C = h * w, c.width
    n_run = c.text_maxlen if si == 0 else n
    W = noise_widths(c)[si]
    f, B = (2 if cfg_batch else 1), 2
    sample = (_rand(f * B, n_run, C, seed=8), _rand(f * B, C, seed=9), torch.rand(B, n, W, generator=_gen(10)),
              torch.tensor([2.5]), torch.tensor([0.0]))
    if cfg_batch:
        dyn = {"x": {0: "Bp"}, "cond": {0: "Bp"}, "uniform": {0: "B"}}
        axes = {"B": Axis("B", 1), "Bp": Axis("Bp", base="B", factor=2)}
    else:
        dyn = {"x": {0: "B"}, "cond": {0: "B"}, "uniform": {0: "B"}}
        axes = {"B": Axis("B", 1)}
    bmin, bopt, bmax = 1, st.batch_size, st.max_batch_size
    prof = _profile({"x": ((f * bmin, n_run, C), (f * bopt, n_run, C), (f * bmax, n_run, C)),
                     "cond": ((f * bmin, C), (f * bopt, C), (f * bmax, C)),
                     "uniform": ((bmin, n, W), (bopt, n, W), (bmax, n, W)),
                     "cfg": ((1,), (1,), (1,)), "top_p": ((1,), (1,), (1,))})
    piece = HartHeadPiece(model, si, residual=False)
    return PieceSpec(
        name=f"head_s{si:02d}" + ("" if cfg_batch else "_nocfg"), module=HartExportHead(piece),
        inputs=["x", "cond", "uniform", "cfg", "top_p"], outputs=["bits"] + (["hard"] if piece.last else []),
        sample=sample, dynamic=dyn, axes=axes, profiles=[prof], scale=si, kind="head",
        description=f"head + code sampling at scale {si} ({'CFG batch 2B' if cfg_batch else 'no CFG, batch B'})")


def diffusion_spec(model: Hart, st: ExportSettings, cfg_batch: bool) -> PieceSpec:
    c = model.cfg
    si = len(st.schedule) - 1
    h, w = st.schedule[si]
    n, C, Cv, W = h * w, c.width, c.codebook_dim, noise_widths(c)[si]
    f, B = (2 if cfg_batch else 1), 2
    sample = (_rand(f * B, n, C, seed=15), _rand(B, n, Cv, seed=16), torch.rand(B, n, W, generator=_gen(17)),
              torch.tensor([2.5]))
    if cfg_batch:
        dyn = {"x": {0: "Bp"}, "hard": {0: "B"}, "uniform": {0: "B"}}
        axes = {"B": Axis("B", 1), "Bp": Axis("Bp", base="B", factor=2)}
    else:
        dyn = {"x": {0: "B"}, "hard": {0: "B"}, "uniform": {0: "B"}}
        axes = {"B": Axis("B", 1)}
    bmin, bopt, bmax = 1, st.batch_size, st.max_batch_size
    prof = _profile({"x": ((f * bmin, n, C), (f * bopt, n, C), (f * bmax, n, C)),
                     "hard": ((bmin, n, Cv), (bopt, n, Cv), (bmax, n, Cv)),
                     "uniform": ((bmin, n, W), (bopt, n, W), (bmax, n, W)), "cfg": ((1,), (1,), (1,))})
    return PieceSpec(
        name="diffusion_head" + ("" if cfg_batch else "_nocfg"), module=HartDiffusionPiece(model),
        inputs=["x", "hard", "uniform", "cfg"], outputs=["residual"], sample=sample, dynamic=dyn, axes=axes,
        profiles=[prof], scale=si, kind="diffusion_head",
        description=f"residual diffusion head ({c.diff_steps} iDDPM steps) at the last scale")


def next_input_spec(model: Hart, st: ExportSettings, si: int) -> PieceSpec:
    c = model.cfg
    h, w = st.schedule[si]
    G, Cv, B = st.schedule[-1][0], c.codebook_dim, 2
    codes = _rand(B, h * w, Cv, seed=11)
    summed = _rand(B, Cv, G, G, seed=12) * 0.1
    last = si == len(st.schedule) - 1
    bmin, bopt, bmax = 1, st.batch_size, st.max_batch_size
    prof = _profile({"bits": ((bmin, h * w, Cv), (bopt, h * w, Cv), (bmax, h * w, Cv)),
                     "summed": ((bmin, Cv, G, G), (bopt, Cv, G, G), (bmax, Cv, G, G))})
    return PieceSpec(
        name=f"next_input_s{si:02d}", module=HartNextInputPiece(model, st.schedule, si), inputs=["bits", "summed"],
        outputs=["summed_out"] + ([] if last else ["x_next"]), sample=(codes, summed),
        dynamic={"bits": {0: "B"}, "summed": {0: "B"}}, axes={"B": Axis("B", 1)}, profiles=[prof], scale=si,
        kind="next_input", description=f"accumulate scale {si} codes" + ("" if last else f", embed scale {si + 1}"))


def hart_model_specs(model: Hart, st: ExportSettings, policy_piece: nn.Module | None = None) -> list[PieceSpec]:
    """condition(_cfg), every block (plain and _entropy), per scale head (CFG / no CFG), next_input, policy (scales
    > 0: scale 0 is the text), and diffusion_head(_nocfg)."""
    specs = [condition_spec(model, st, True), condition_spec(model, st, False)]
    for layer in range(model.cfg.depth):
        specs += [block_spec(model, st, layer, False), block_spec(model, st, layer, True)]
    for si in range(len(st.schedule)):
        specs += [head_spec(model, st, si, True), head_spec(model, st, si, False), next_input_spec(model, st, si)]
        if policy_piece is not None and si > 0:
            specs.append(policy_spec(policy_piece, st, si))
    specs += [diffusion_spec(model, st, True), diffusion_spec(model, st, False)]
    return specs
