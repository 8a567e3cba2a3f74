"""The interface between the generation orchestrator and a pruning policy.

The orchestrator asks the policy, causally, before each scale and each layer what to run, and tells it
the entropies it computed. The base class runs everything (no pruning) and asks for no entropy.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class GenerationInfo:
    """What a policy may know before generation starts."""
    schedule: list[tuple[int, int]]
    depth: int
    batch: int
    device: torch.device


@dataclass
class PolicyTrace:
    """Per scale, per layer: tokens run (k) and tokens at the scale (n); filled by the orchestrator."""
    kept: dict[int, list[int]] = field(default_factory=dict)
    tokens: dict[int, int] = field(default_factory=dict)
    cfg_batch: dict[int, bool] = field(default_factory=dict)


class Policy:
    """No pruning: every scale, layer and token runs; no entropy is computed."""

    name = "none"

    def start(self, info: GenerationInfo) -> None:
        self.info = info

    def run_scale(self, si: int) -> bool:
        """False stops generation before scale ``si`` (the summed codes so far are decoded)."""
        return True

    def use_cfg(self, si: int) -> bool:
        """False runs scale ``si`` (and all later ones) on the conditional branch only."""
        return True

    def wants_entropy(self, si: int, layer: int) -> bool:
        """Whether the block at (si, layer) should also return its self-attention entropy."""
        return False

    def keep(self, si: int, layer: int, n: int) -> torch.Tensor | None:
        """Token indices (k,) int64 ascending to run layer ``layer`` on; None = all n; empty = skip."""
        return None

    def observe(self, si: int, layer: int, entropy: torch.Tensor, kept: torch.Tensor | None) -> None:
        """Entropy (B, k) float32 of the conditional half for the tokens that ran (kept; None = all)."""
