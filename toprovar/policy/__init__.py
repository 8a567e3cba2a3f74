"""Pruning policies: the ToProVAR tri-dimensional policy and the baselines, over one interface.

Names (``toprovar generate --policy NAME``):
    none                  no pruning
    toprovar              ToProVAR, all three dimensions (scale depth, layer scores, token pruning)
    toprovar-scale        ablation: scale depth only (scales after D are not run)
    toprovar-scale-layer  ablation: scale depth + Detail-layer skipping
    toprovar-scale-token  ablation: scale depth + token pruning on all layers (no layer scores)
    fastvar               FastVAR (frequency token pruning + cached restoration; Table 8 setting)
    fastvar-public        FastVAR with its released code's setting (32:0.4, 40:0.5, 48/64 skipped)
                          (on HART both are its released HART setting: 48:0.5, 64:0.75, every layer)
    skipvar               SkipVAR-STYLE fixed rule (not SkipVAR's decision model)
    scale-exit            fixed scale exit (the last two scales are not run)
"""
from __future__ import annotations

from .base import BlockRunner, GenerationInfo, Policy, PolicyTrace, read_calibration
from .baselines import ScaleExitPolicy, SkipVARStylePolicy
from .config import FastVARConfig, ScaleExitConfig, SkipVARConfig, ToProVARConfig
from .fastvar import FastVARPolicy
from .flops import format_report, policy_report
from .token import TokenKeepPiece
from .toprovar import ToProVARPolicy, ToProVARScale, ToProVARScaleLayer, ToProVARScaleToken


class FastVARPublicPolicy(FastVARPolicy):
    """FastVAR with the setting of its released Infinity code."""

    name = "fastvar-public"

    def __init__(self, config: FastVARConfig | None = None):
        super().__init__(config if config is not None else FastVARConfig(preset="public"))


POLICIES: dict[str, type[Policy]] = {
    "none": Policy,
    "toprovar": ToProVARPolicy,
    "toprovar-scale": ToProVARScale,
    "toprovar-scale-layer": ToProVARScaleLayer,
    "toprovar-scale-token": ToProVARScaleToken,
    "fastvar": FastVARPolicy,
    "fastvar-public": FastVARPublicPolicy,
    "skipvar": SkipVARStylePolicy,
    "scale-exit": ScaleExitPolicy,
}


def make_policy(name: str, calibration: str | None = None) -> Policy:
    """Instantiate a policy by name (one clear error for an unknown name); with ``calibration`` the
    class's ``from_calibration(path)`` reads its parameters (policies without any check and ignore it)."""
    if name not in POLICIES:
        raise ValueError(f"--policy: unknown policy {name!r}; choose from {sorted(POLICIES)}")
    return POLICIES[name]() if calibration is None else POLICIES[name].from_calibration(calibration)


__all__ = ["BlockRunner", "GenerationInfo", "Policy", "PolicyTrace", "POLICIES", "make_policy", "read_calibration",
           "ToProVARConfig", "FastVARConfig", "SkipVARConfig", "ScaleExitConfig", "TokenKeepPiece",
           "ToProVARPolicy", "ToProVARScale", "ToProVARScaleLayer", "ToProVARScaleToken", "FastVARPolicy",
           "FastVARPublicPolicy", "SkipVARStylePolicy", "ScaleExitPolicy", "policy_report", "format_report"]
