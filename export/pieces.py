"""Piece specifications: what ``toprovar-export`` exports, with names, dynamic axes, sample inputs and the
TensorRT optimization profiles (one per scale for the dynamic pieces), in the manner of demo/Diffusion's
model classes.

Every spec wraps the very ``nn.Module`` the PyTorch backend runs (``toprovar.model.pieces`` over the same
``Infinity`` instance, the text encoder, the VAE decoder); names follow ``docs/export-format.md``.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn as nn

from toprovar.config import ModelConfig
from toprovar.model.infinity import Infinity
from toprovar.model.pieces import BlockPiece, ConditionPiece, HeadPiece, NextInputPiece
from toprovar.schedule import cumulative_tokens, token_counts

TEXT_OPT_LEN = 128  # text length the dynamic pieces are tuned for (capped at the model's text_maxlen)


@dataclass(frozen=True)
class Axis:
    """A dynamic axis: a named symbol (shared by inputs), or ``factor`` x another symbol (CFG batch)."""
    name: str
    min: int = 1
    max: int | None = None
    base: str | None = None
    factor: int = 1


@dataclass
class PieceSpec:
    """One exported piece.

    inputs/outputs: names, in forward-argument order; sample: example inputs (small, distinct sizes);
    dynamic: {input name: {axis index: symbol name}}; axes: the symbols; profiles: TensorRT
    optimization profiles [{input name: (min, opt, max) shapes}], empty for a static piece.
    """
    name: str
    module: nn.Module
    inputs: list[str]
    outputs: list[str]
    sample: tuple[torch.Tensor, ...]
    dynamic: dict[str, dict[int, str]] = field(default_factory=dict)
    axes: dict[str, Axis] = field(default_factory=dict)
    profiles: list[dict[str, tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]]] = field(default_factory=list)
    scale: int | None = None
    layer: int | None = None
    custom_ops: list[str] = field(default_factory=list)
    kind: str = ""
    description: str = ""

    @property
    def module_name(self) -> str:
        m = type(self.module)
        return f"{m.__module__}.{m.__qualname__}"

    def dynamic_shapes(self) -> dict[str, dict[int, object]] | None:
        """torch.export ``dynamic_shapes`` keyed by forward-argument name (derived dims for CFG batch)."""
        if not self.dynamic:
            return None
        dims: dict[str, object] = {}
        for sym, ax in self.axes.items():
            if ax.base is None:
                dims[sym] = (torch.export.Dim(sym, min=ax.min, max=ax.max) if ax.max
                             else torch.export.Dim(sym, min=ax.min))
        for sym, ax in self.axes.items():
            if ax.base is not None:
                dims[sym] = ax.factor * dims[ax.base]
        return {name: ({a: dims[s] for a, s in self.dynamic[name].items()} if name in self.dynamic else None)
                for name in self.inputs}


@dataclass(frozen=True)
class ExportSettings:
    """What the specs depend on besides the model: schedule, dtype, batch range, policy minimum."""
    schedule: list[tuple[int, int]]
    dtype: torch.dtype = torch.float32
    batch_size: int = 1          # optimum batch (prompts) of the TensorRT profiles
    max_batch_size: int = 4      # largest batch (prompts) the engines accept
    min_tokens: tuple[int, ...] | int = 1  # smallest token count a block runs per scale (the policy minimum)
    text_opt_len: int = TEXT_OPT_LEN


# ------------------------------------------------------------------------------------------ wrappers
class TextEncoderPiece(nn.Module):
    """input_ids (B, L) int64, attention_mask (B, L) int64 -> hidden (B, L, C_text) float32 (a T5 encoder)."""

    def __init__(self, encoder: nn.Module):
        super().__init__()
        self.encoder = encoder

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.encoder(input_ids=input_ids, attention_mask=attention_mask)["last_hidden_state"].float()


class VaeDecoderPiece(nn.Module):
    """summed (B, d, Hf, Wf) float32 -> image (B, 3, H, W) float32 (what ``TorchBackend.decode`` runs)."""

    def __init__(self, decoder: nn.Module):
        super().__init__()
        self.decoder = decoder

    def forward(self, summed: torch.Tensor) -> torch.Tensor:
        return self.decoder(summed.to(next(self.decoder.parameters()).dtype)).float()


# ------------------------------------------------------------------------------------------ helpers
def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _rand(*shape, dtype=torch.float32, seed=0) -> torch.Tensor:
    return torch.randn(*shape, generator=_gen(seed)).to(dtype)


def _profile(shapes: dict[str, tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]]):
    return {k: (tuple(a), tuple(b), tuple(c)) for k, (a, b, c) in shapes.items()}


def latent_grid(cfg: ModelConfig, schedule: list[tuple[int, int]]) -> tuple[int, int]:
    """(Hf, Wf) of the summed codes: the last scale's side (x2 with spatial patchify)."""
    f = 2 if cfg.spatial_patchify else 1
    return schedule[-1][0] * f, schedule[-1][1] * f


# ------------------------------------------------------------------------------------------ specs
def condition_spec(model: Infinity, st: ExportSettings, cfg_batch: bool) -> PieceSpec:
    c = model.cfg
    B, L = 2, 6
    text = _rand(B, L, c.text_channels, seed=1)
    lengths = torch.tensor([L, 3], dtype=torch.int32)
    lo, hi = 1, c.text_maxlen
    Lopt = min(st.text_opt_len, hi)
    prof = _profile({"text": ((1, lo, c.text_channels), (st.batch_size, Lopt, c.text_channels),
                              (st.max_batch_size, hi, c.text_channels)),
                     "lengths": ((1,), (st.batch_size,), (st.max_batch_size,))})
    return PieceSpec(
        name="condition_cfg" if cfg_batch else "condition", module=ConditionPiece(model, cfg_batch),
        inputs=["text", "lengths"], outputs=["cond", "ada", "ca_kv", "ca_lengths", "x0"],
        sample=(text, lengths), dynamic={"text": {0: "B", 1: "L"}, "lengths": {0: "B"}},
        axes={"B": Axis("B", 1), "L": Axis("L", 1, c.text_maxlen)}, profiles=[prof], kind="condition",
        description=f"text conditioning{' with the CFG batch [cond; uncond]' if cfg_batch else ''}")


def block_spec(model: Infinity, st: ExportSettings, layer: int, entropy: bool) -> PieceSpec:
    c = model.cfg
    C, H, hd = c.width, c.num_heads, c.head_dim
    dt = st.dtype
    Bp, n, P, L = 2, 5, 7, 6
    sample = (_rand(Bp, n, C, seed=2), _rand(Bp, 1, 6, C, seed=3) * 0.1, _rand(Bp, L, C, dtype=dt, seed=4),
              torch.tensor([L, 4], dtype=torch.int32), _rand(2, n, hd // 2, seed=5),
              _rand(Bp, H, P, hd, dtype=dt, seed=6), _rand(Bp, H, P, hd, dtype=dt, seed=7))
    dynamic = {"x": {0: "Bp", 1: "n"}, "ada": {0: "Bp"}, "ca_kv": {0: "Bp", 1: "L"}, "ca_lengths": {0: "Bp"},
               "rope": {1: "n"}, "past_k": {0: "Bp", 2: "P"}, "past_v": {0: "Bp", 2: "P"}}
    axes = {"Bp": Axis("Bp", 1), "n": Axis("n", 1), "P": Axis("P", 0), "L": Axis("L", 1, c.text_maxlen)}
    profiles = []
    b_min, b_opt, b_max = 1, 2 * st.batch_size, 2 * st.max_batch_size
    Lopt = min(st.text_opt_len, c.text_maxlen)
    past = [0] + cumulative_tokens(st.schedule)[:-1]
    for si, ns in enumerate(token_counts(st.schedule)):
        mt = st.min_tokens if isinstance(st.min_tokens, int) else st.min_tokens[si]
        nmin = max(1, min(mt, ns))
        # cache: 0 at scale 0; later at most every earlier token, fewer (down to 0) when a policy pruned
        pmin, pmax = 0, past[si]
        profiles.append(_profile({
            "x": ((b_min, nmin, C), (b_opt, ns, C), (b_max, ns, C)),
            "ada": ((b_min, 1, 6, C), (b_opt, 1, 6, C), (b_max, 1, 6, C)),
            "ca_kv": ((b_min, 1, C), (b_opt, Lopt, C), (b_max, c.text_maxlen, C)),
            "ca_lengths": ((b_min,), (b_opt,), (b_max,)),
            "rope": ((2, nmin, hd // 2), (2, ns, hd // 2), (2, ns, hd // 2)),
            "past_k": ((b_min, H, pmin, hd), (b_opt, H, pmax, hd), (b_max, H, pmax, hd)),
            "past_v": ((b_min, H, pmin, hd), (b_opt, H, pmax, hd), (b_max, H, pmax, hd)),
        }))
    return PieceSpec(
        name=f"block_{layer:02d}" + ("_entropy" if entropy else ""), module=BlockPiece(model.blocks[layer], entropy),
        inputs=["x", "ada", "ca_kv", "ca_lengths", "rope", "past_k", "past_v"],
        outputs=["x_out", "k", "v"] + (["entropy"] if entropy else []), sample=sample, dynamic=dynamic, axes=axes,
        profiles=profiles, layer=layer, kind="block",
        custom_ops=["toprovar::FlashAttentionEntropy"] if entropy else [],
        description=f"block {layer}" + (" with FAE self-attention entropy" if entropy else ""))


def head_spec(model: Infinity, st: ExportSettings, si: int, cfg_batch: bool) -> PieceSpec:
    c = model.cfg
    h, w = st.schedule[si]
    n, C, bits = h * w, c.width, c.token_bits
    f = 2 if cfg_batch else 1
    B = 2
    sample = (_rand(f * B, n, C, seed=8), _rand(f * B, C, seed=9), torch.rand(B, n, bits, generator=_gen(10)),
              torch.tensor([3.0]), torch.tensor([1.0]), torch.tensor([0.97]))
    if cfg_batch:  # x and cond hold [cond; uncond]: their batch is the derived dim 2*B
        dyn = {"x": {0: "Bp"}, "cond": {0: "Bp"}, "uniform": {0: "B"}}
        axes = {"B": Axis("B", 1), "Bp": Axis("Bp", base="B", factor=2)}
    else:  # one symbol: x, cond and uniform share B
        dyn = {"x": {0: "B"}, "cond": {0: "B"}, "uniform": {0: "B"}}
        axes = {"B": Axis("B", 1)}
    bmin, bopt, bmax = 1, st.batch_size, st.max_batch_size
    prof = _profile({"x": ((f * bmin, n, C), (f * bopt, n, C), (f * bmax, n, C)),
                     "cond": ((f * bmin, C), (f * bopt, C), (f * bmax, C)),
                     "uniform": ((bmin, n, bits), (bopt, n, bits), (bmax, n, bits)),
                     "cfg": ((1,), (1,), (1,)), "tau": ((1,), (1,), (1,)), "top_p": ((1,), (1,), (1,))})
    return PieceSpec(
        name=f"head_s{si:02d}" + ("" if cfg_batch else "_nocfg"), module=HeadPiece(model),
        inputs=["x", "cond", "uniform", "cfg", "tau", "top_p"], outputs=["bits"], sample=sample, dynamic=dyn,
        axes=axes, profiles=[prof], scale=si, kind="head",
        description=f"head + bitwise sampling at scale {si} ({'CFG batch 2B' if cfg_batch else 'no CFG, batch B'})")


def next_input_spec(model: Infinity, st: ExportSettings, si: int) -> PieceSpec:
    c = model.cfg
    h, w = st.schedule[si]
    Hf, Wf = latent_grid(c, st.schedule)
    B = 2
    bits = (torch.rand(B, h * w, c.token_bits, generator=_gen(11)) < 0.5).float()
    summed = _rand(B, c.codebook_dim, Hf, Wf, seed=12) * 0.1
    last = si == len(st.schedule) - 1
    bmin, bopt, bmax = 1, st.batch_size, st.max_batch_size
    prof = _profile({"bits": ((bmin, h * w, c.token_bits), (bopt, h * w, c.token_bits), (bmax, h * w, c.token_bits)),
                     "summed": ((bmin, c.codebook_dim, Hf, Wf), (bopt, c.codebook_dim, Hf, Wf),
                                (bmax, c.codebook_dim, Hf, Wf))})
    return PieceSpec(
        name=f"next_input_s{si:02d}", module=NextInputPiece(model, st.schedule, si), inputs=["bits", "summed"],
        outputs=["summed_out"] + ([] if last else ["x_next"]), sample=(bits, summed),
        dynamic={"bits": {0: "B"}, "summed": {0: "B"}}, axes={"B": Axis("B", 1)}, profiles=[prof], scale=si,
        kind="next_input", description=f"accumulate scale {si} codes" + ("" if last else f", embed scale {si + 1}"))


def text_encoder_spec(encoder: nn.Module, cfg: ModelConfig, st: ExportSettings, vocab: int) -> PieceSpec:
    B, L = 2, 6
    ids = torch.randint(3, vocab, (B, L), generator=_gen(13))
    mask = torch.ones(B, L, dtype=torch.long)
    mask[1, 4:] = 0
    Lopt = min(st.text_opt_len, cfg.text_maxlen)
    prof = _profile({"input_ids": ((1, 1), (st.batch_size, Lopt), (st.max_batch_size, cfg.text_maxlen)),
                     "attention_mask": ((1, 1), (st.batch_size, Lopt), (st.max_batch_size, cfg.text_maxlen))})
    return PieceSpec(
        name="text_encoder", module=TextEncoderPiece(encoder), inputs=["input_ids", "attention_mask"],
        outputs=["hidden"], sample=(ids, mask), dynamic={"input_ids": {0: "B", 1: "L"},
                                                          "attention_mask": {0: "B", 1: "L"}},
        axes={"B": Axis("B", 1), "L": Axis("L", 1, cfg.text_maxlen)}, profiles=[prof], kind="text_encoder",
        description="T5 encoder")


def vae_decoder_spec(decoder: nn.Module, cfg: ModelConfig, st: ExportSettings) -> PieceSpec:
    Hf, Wf = latent_grid(cfg, st.schedule)
    B = 2
    summed = _rand(B, cfg.codebook_dim, Hf, Wf, seed=14) * 0.1
    prof = _profile({"summed": ((1, cfg.codebook_dim, Hf, Wf), (st.batch_size, cfg.codebook_dim, Hf, Wf),
                                (st.max_batch_size, cfg.codebook_dim, Hf, Wf))})
    return PieceSpec(name="vae_decoder", module=VaeDecoderPiece(decoder), inputs=["summed"], outputs=["image"],
                     sample=(summed,), dynamic={"summed": {0: "B"}}, axes={"B": Axis("B", 1)}, profiles=[prof],
                     kind="vae_decoder", description="VAE decoder")


def policy_spec(piece: nn.Module, st: ExportSettings, si: int) -> PieceSpec:
    """The policy's per-token keep math (``toprovar.policy.token.TokenKeepPiece``) at scale ``si``:
    entropy (n_s,) float32, phi_r (1,) float32 -> p_keep (n_s,) float32, k (1,) int64, order (n_s,) int64."""
    h, w = st.schedule[si]
    n = h * w
    ent = torch.rand(n, generator=_gen(20 + si)) * 3.0 + 0.05
    return PieceSpec(name=f"policy_s{si:02d}", module=piece, inputs=["entropy", "phi_r"],
                     outputs=["p_keep", "k", "order"], sample=(ent, torch.tensor([0.75])), scale=si, kind="policy",
                     description=f"ToProVAR token keep probabilities, count and order at scale {si}")


def model_specs(model: Infinity, st: ExportSettings, policy_piece: nn.Module | None = None) -> list[PieceSpec]:
    """The transformer's pieces: condition(_cfg), every block (plain and _entropy), per scale head (CFG),
    head_nocfg, next_input and (with ``policy_piece``) policy, in export order (HART: ``hart_specs``)."""
    specs = [condition_spec(model, st, True), condition_spec(model, st, False)]
    for layer in range(model.cfg.depth):
        specs += [block_spec(model, st, layer, False), block_spec(model, st, layer, True)]
    for si in range(len(st.schedule)):
        specs += [head_spec(model, st, si, True), head_spec(model, st, si, False), next_input_spec(model, st, si)]
        if policy_piece is not None:
            specs.append(policy_spec(policy_piece, st, si))
    return specs
