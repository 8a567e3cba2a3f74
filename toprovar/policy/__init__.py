"""Pruning policies: the ToProVAR tri-dimensional policy and the baselines, over one interface."""
from __future__ import annotations

from .base import GenerationInfo, Policy, PolicyTrace

POLICIES: dict[str, type[Policy]] = {"none": Policy}


def make_policy(name: str, calibration: str | None = None) -> Policy:
    """Instantiate a policy by name (one clear error for an unknown name)."""
    if name not in POLICIES:
        raise ValueError(f"--policy: unknown policy {name!r}; choose from {sorted(POLICIES)}")
    return POLICIES[name]() if calibration is None else POLICIES[name].from_calibration(calibration)


__all__ = ["GenerationInfo", "Policy", "PolicyTrace", "POLICIES", "make_policy"]
