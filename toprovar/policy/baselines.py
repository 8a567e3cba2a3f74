"""Fixed-rule scale baselines: SkipVAR-STYLE and fixed scale exit.

SkipVAR-style: SkipVAR (Li et al. 2025) chooses per sample, with a learned frequency-based decision
model, between skipping late scales and replacing the unconditional CFG branch. That decision model
is not used here: this baseline applies ONE FIXED rule to every prompt (``SkipVARConfig``: the
unconditional branch dropped from a scale position on, late scales skipped), so it is labelled
"SkipVAR-style", not SkipVAR.

Fixed scale exit (ToProVAR appendix A.1.5): a hand-chosen exit scale, the same for every prompt.
"""
from __future__ import annotations

from .base import GenerationInfo, Policy
from .config import ScaleExitConfig, SkipVARConfig


class SkipVARStylePolicy(Policy):
    """SkipVAR-STYLE fixed rule: cond-only from ``uncond_drop_from``, scales from ``skip_from`` not run."""

    name = "skipvar"
    label = "SkipVAR-style (fixed rule; not SkipVAR's decision model)"

    def __init__(self, config: SkipVARConfig | None = None):
        self.config = config if config is not None else SkipVARConfig()

    def params(self) -> dict:
        return {"name": self.name, "label": self.label, **self.config.to_dict()}

    def plan_key(self) -> str:
        return self.params_key()

    def start(self, info: GenerationInfo) -> None:
        super().start(info)
        self.cond_from, self.skip_from = self.config.resolve(len(info.schedule))

    def run_scale(self, si: int) -> bool:
        return si < self.skip_from

    def use_cfg(self, si: int) -> bool:
        return si < self.cond_from


class ScaleExitPolicy(Policy):
    """Fixed scale exit: scales from ``exit_from`` on are not run (the summed codes so far are decoded)."""

    name = "scale-exit"

    def __init__(self, config: ScaleExitConfig | None = None):
        self.config = config if config is not None else ScaleExitConfig()

    def params(self) -> dict:
        return {"name": self.name, **self.config.to_dict()}

    def plan_key(self) -> str:
        return self.params_key()

    def start(self, info: GenerationInfo) -> None:
        super().start(info)
        self.exit = self.config.resolve(len(info.schedule))

    def run_scale(self, si: int) -> bool:
        return si < self.exit


__all__ = ["SkipVARStylePolicy", "ScaleExitPolicy"]
