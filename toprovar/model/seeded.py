"""Building a module with random weights drawn from a seed, without touching the caller's random state."""
from __future__ import annotations

from typing import Callable, TypeVar

import torch

M = TypeVar("M", bound=torch.nn.Module)


def build_seeded(make: Callable[[], M], seed: int | None = 0, device: str | torch.device = "cpu") -> M:
    """``make()`` under ``torch.device(device)`` with the global generator seeded by ``seed`` (None: as it is),
    restored afterwards; the module is returned in eval mode without gradients."""
    state = torch.random.get_rng_state()
    if seed is not None:
        torch.manual_seed(seed)
    try:
        with torch.device(device):
            module = make()
    finally:
        torch.random.set_rng_state(state)
    return module.eval().requires_grad_(False)
