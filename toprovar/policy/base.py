"""The interface between the generation orchestrator and a pruning policy.

The orchestrator asks the policy, causally, before each scale and each layer what to run, and tells it
the entropies it computed. The base class runs everything (no pruning) and asks for no entropy.

Per scale ``si`` the orchestrator calls ``run_scale(si)`` (False stops generation), ``use_cfg(si)``,
then for every layer: ``block_runner(si, layer)``; if that is None (the default), ``keep(si, layer, n)``
chooses the tokens, the block runs on them (with entropy when ``wants_entropy``), pruned tokens pass
unchanged, only the kept tokens' k/v enter that layer's KV cache, and ``observe`` receives the
entropy. A policy that needs more than one token set per block (FastVAR re-chooses before each
sub-layer, and per batch row) returns a ``BlockRunner`` instead, which runs the whole layer itself.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch


@dataclass
class GenerationInfo:
    """What a policy may know before generation starts."""
    schedule: list[tuple[int, int]]
    depth: int
    batch: int
    device: torch.device
    compile: bool = False  # the backend runs torch.compile'd pieces: a policy may compile its own torch work
    family: str = "infinity"  # the model family (``ModelConfig.family``): "infinity" or "hart"


@dataclass
class PolicyTrace:
    """Per scale, per layer: tokens run (k) and tokens at the scale (n); filled by the orchestrator.

    kept[si][layer] = tokens the layer ran on (0 = skipped); a scale that did not run is absent.
    batch: prompts B; cfg: whether generation started with the CFG batch (2B rows); text_len: the padded
    text length L the cross-attention ran over (FLOP counting, ``toprovar.policy.flops``).
    """
    kept: dict[int, list[int]] = field(default_factory=dict)
    tokens: dict[int, int] = field(default_factory=dict)
    cfg_batch: dict[int, bool] = field(default_factory=dict)
    schedule: list[tuple[int, int]] = field(default_factory=list)
    batch: int = 1
    cfg: bool = False
    text_len: int = 0


class BlockRunner(Protocol):
    """Runs one layer in place of the default gather/block/scatter step.

    Called as ``runner(backend, layer, x, ada, ca_kv, ca_lengths, rope, past_k, past_v)`` with the
    orchestrator's tensors (x (B', n, C) float32, rope (2, n, hd/2), past_k/v (B', H, P, hd)); returns
    (x_out (B', n, C) float32, k, v (B', H, m, hd)): the m keys/values to append to the layer's cache.
    """

    def __call__(self, backend: Any, layer: int, x: torch.Tensor, ada: torch.Tensor, ca_kv: torch.Tensor,
                 ca_lengths: torch.Tensor, rope: torch.Tensor, past_k: torch.Tensor, past_v: torch.Tensor
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]: ...


CALIBRATION_FORMAT = "toprovar-calibration/1"


def read_calibration(path: str | Path) -> dict:
    """Load and check a calibration JSON (``toprovar calibrate``); one clear error when it is not one."""
    from ..inputs import file_problem
    path = Path(path)
    problem = file_problem(path)
    if problem:
        raise FileNotFoundError(f"--calibration: {path}: {problem}")
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"--calibration: {path}: not a JSON file ({exc})") from None
    if not isinstance(data, dict) or data.get("format") != CALIBRATION_FORMAT:
        got = data.get("format") if isinstance(data, dict) else type(data).__name__
        raise ValueError(f"--calibration: {path}: expected format {CALIBRATION_FORMAT!r}, got {got!r}")
    if not isinstance(data.get("policy"), dict):
        raise ValueError(f"--calibration: {path}: no 'policy' object")
    return data


def check_calibration_model(policy: "Policy", model: str) -> None:
    """ValueError unless the policy's calibration (if it read one) was made for ``model`` (a calibration of
    another model of the same depth would otherwise be accepted)."""
    meta = getattr(policy, "calibration", None) or {}
    made = meta.get("model")
    if made and made != model:
        raise ValueError(f"--calibration: {meta.get('path')}: calibrated for model {made!r}, not {model!r}")


class Policy:
    """No pruning: every scale, layer and token runs; no entropy is computed."""

    name = "none"

    @classmethod
    def from_calibration(cls, path: str | Path) -> "Policy":
        """Build from a calibration JSON. Policies without calibrated parameters check the file and
        ignore it (so one --calibration works for every --policy)."""
        read_calibration(path)
        return cls()

    def params(self) -> dict:
        """JSON-ready parameters (recorded in reports and the export manifest)."""
        return {"name": self.name}

    def plan_key(self) -> str | None:
        """A key of this policy's decisions when they never depend on device values: for a model, schedule
        and batch, every generation runs the same scales, layers and kept-token COUNTS, and the policy reads
        nothing back from the device. Then the orchestrator may capture whole scales into CUDA graphs and
        replay them (``toprovar.runtime.scale_graphs``); equal keys must mean equal decisions. None (the
        default of subclasses, which opt in) when a decision reads a device value (a kept count, rho_s, an
        online layer score)."""
        return "none" if type(self) is Policy else None

    def params_key(self) -> str:
        """The policy's parameters as a canonical JSON string (a ``plan_key`` for fixed-rule policies)."""
        return json.dumps(self.params(), sort_keys=True, default=str)

    def start(self, info: GenerationInfo) -> None:
        self.info = info

    def run_scale(self, si: int) -> bool:
        """False stops generation before scale ``si`` (the summed codes so far are decoded)."""
        return True

    def use_cfg(self, si: int) -> bool:
        """False runs scale ``si`` (and all later ones) on the conditional branch only."""
        return True

    def block_runner(self, si: int, layer: int) -> BlockRunner | None:
        """A runner that executes (si, layer) itself, or None for the default keep/observe path."""
        return None

    #: True: a token a layer does not run (pruned, or the layer skipped) receives that layer's update of the
    #: previous scale, bilinearly resized to this scale's grid, instead of passing the layer unchanged.
    restore_pruned: bool = False

    def wants_entropy(self, si: int, layer: int) -> bool:
        """Whether the block at (si, layer) should also return its self-attention entropy."""
        return False

    def keep(self, si: int, layer: int, n: int) -> torch.Tensor | None:
        """Token indices (k,) int64 ascending to run layer ``layer`` on; None = all n; empty = skip."""
        return None

    def observe(self, si: int, layer: int, entropy: torch.Tensor, kept: torch.Tensor | None) -> None:
        """Entropy (B, k) float32 of the conditional half for the tokens that ran (kept; None = all)."""
