"""What differs per model family (``ModelConfig.family``), in one place: building the model and its tokenizer
decoder, the scale schedule, the RoPE tables and the graph pieces. Everything else (orchestrator, policies,
export, backends) is shared and reaches the family through these functions.
"""
from __future__ import annotations

import torch

from ..config import ModelConfig
from ..schedule import get_schedule, preset_for_resolution, rope_grid_side
from . import vae as vae_mod
from .rope import rope_tables


def build_model(cfg: ModelConfig, seed: int | None = 0, device: str | torch.device = "cpu"):
    """The family's transformer with random weights from ``seed``."""
    if cfg.is_hart:
        from .hart.transformer import build_hart
        return build_hart(cfg, seed=seed, device=device)
    from .infinity import build_model as build_infinity
    return build_infinity(cfg, seed=seed, device=device)


def build_decoder(cfg: ModelConfig, seed: int | None = 0) -> torch.nn.Module:
    """The tokenizer decoder with random weights (summed codes -> image in [-1, 1])."""
    if cfg.is_hart:
        from .hart.tokenizer import build_hart_decoder
        return build_hart_decoder(cfg.vae, seed=seed)
    return vae_mod.build_decoder(cfg.vae, seed=seed)


def load_decoder(cfg: ModelConfig, path: str, model=None) -> torch.nn.Module:
    """The tokenizer decoder from a checkpoint; for HART also the codebook into ``model``."""
    if cfg.is_hart:
        from .hart.tokenizer import load_hart_decoder
        if model is not None:
            model.load_tokenizer(path)
        return load_hart_decoder(path, cfg.vae)
    return vae_mod.load_vae_decoder(path, cfg.vae)


def token_stride(cfg: ModelConfig) -> int:
    """Pixels per transformer token side."""
    if cfg.is_hart:
        from .hart.tokenizer import HART_VAE_CONFIGS
        return HART_VAE_CONFIGS[cfg.vae].stride
    return vae_mod.VAE_CONFIGS[cfg.vae].token_stride


def schedule_for(cfg: ModelConfig, resolution: int | None, h_div_w: float) -> list[tuple[int, int]]:
    """The scale schedule; HART has the one square schedule of its ``patch_nums``."""
    if cfg.is_hart:
        sched = [(p, p) for p in cfg.patch_nums]
        res = sched[-1][0] * token_stride(cfg)
        if (resolution is not None and resolution != res) or abs(h_div_w - 1.0) > 1e-6:
            from ..schedule import ScheduleError
            raise ScheduleError(f"--resolution: {cfg.name} generates only {res}x{res} (asked {resolution}, "
                                f"h/w {h_div_w})")
        return sched
    preset = cfg.default_preset if resolution is None else preset_for_resolution(resolution, token_stride(cfg), h_div_w)
    return get_schedule(preset, h_div_w)


def ropes_for(cfg: ModelConfig, schedule: list[tuple[int, int]]) -> list[torch.Tensor]:
    """The per-scale ``rope`` inputs of the blocks."""
    if cfg.is_hart:
        from .hart.transformer import hart_rope_tables
        return hart_rope_tables(cfg, schedule)
    return rope_tables(cfg.head_dim, schedule, rope_grid_side(schedule[-1][0] / schedule[-1][1]))


def default_cfg_list(cfg: ModelConfig, cfg_scale: float | list, num_scales: int):
    """The per-scale CFG weights of a scalar guidance scale (HART: the official linear ramp), lists unchanged."""
    if cfg.is_hart and isinstance(cfg_scale, (int, float)):
        from .hart.pieces import cfg_schedule
        return cfg_schedule(float(cfg_scale), num_scales)
    return cfg_scale


def noise_widths(cfg: ModelConfig, num_scales: int) -> tuple[int, ...] | None:
    """Uniforms per token per scale when they differ from the head's output width (HART), else None."""
    if cfg.is_hart:
        from .hart.pieces import noise_widths as hart_widths
        return hart_widths(cfg)[:num_scales]
    return None


def device_noise(cfg: ModelConfig) -> tuple[int, int] | None:
    """Noise columns drawn on a CUDA device (``ModelSpec.device_noise``): HART's Gumbel uniforms with
    ``more_smooth``, else None."""
    if cfg.is_hart and cfg.more_smooth:
        return (1, 1 + cfg.vocab_size)
    return None


def condition_piece(model, cfg: bool):
    if model.cfg.is_hart:
        from .hart.pieces import HartConditionPiece
        return HartConditionPiece(model, cfg)
    from .pieces import ConditionPiece
    return ConditionPiece(model, cfg)


def head_piece(model, schedule: list[tuple[int, int]], si: int):
    if model.cfg.is_hart:
        from .hart.pieces import HartHeadPiece
        return HartHeadPiece(model, si)
    from .pieces import HeadPiece
    return HeadPiece(model)


def next_input_piece(model, schedule: list[tuple[int, int]], si: int):
    if model.cfg.is_hart:
        from .hart.pieces import HartNextInputPiece
        return HartNextInputPiece(model, schedule, si)
    from .pieces import NextInputPiece
    return NextInputPiece(model, schedule, si)
