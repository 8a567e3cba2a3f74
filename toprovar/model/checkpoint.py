"""Strict checkpoint I/O shared by the transformer and the VAE.

Reads the official ``.pth`` format (a state dict, possibly wrapped under a key such as ``trainer`` /
``gpt_fsdp`` / ``model`` / ``state_dict``) and safetensors; every load is checked key by key and shape by
shape, and any mismatch raises one ``CheckpointError`` naming the file and the first offending keys.
Saving writes to a temporary name and renames it when complete.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Iterable, Mapping

import torch

from ..outputs import atomic_write  # noqa: F401  (the writers of weights, engines, manifests use it from here)

WRAPPER_KEYS = ("gpt_fsdp", "gpt_ema_fsdp", "model", "state_dict", "module", "vae", "gpt_wo_ddp")


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be loaded as asked: unreadable, truncated, or not matching the model."""


def read_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Load a flat {name: tensor} state dict from ``.pth``/``.pt``/``.bin`` or ``.safetensors``."""
    from ..inputs import file_problem
    path = Path(path)
    problem = file_problem(path)
    if problem:
        raise CheckpointError(f"{path}: checkpoint {problem}")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file
            sd = load_file(str(path))
        else:
            sd = torch.load(str(path), map_location="cpu", weights_only=True, mmap=True)
    except Exception as exc:  # truncated zip, bad pickle, bad header ...
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(f"{path}: cannot read checkpoint ({first})") from None
    while isinstance(sd, Mapping) and not any(isinstance(v, torch.Tensor) for v in sd.values()):
        inner = next((sd[k] for k in WRAPPER_KEYS if k in sd and isinstance(sd[k], Mapping)), None)
        if inner is None:
            raise CheckpointError(f"{path}: no state dict found (top-level keys: {list(sd)[:5]})")
        sd = inner
    if not isinstance(sd, Mapping):
        raise CheckpointError(f"{path}: expected a state dict, got {type(sd).__name__}")
    return {k.removeprefix("module."): v for k, v in sd.items() if isinstance(v, torch.Tensor)}


def _first(items: Iterable[str], n: int = 5) -> str:
    items = sorted(items)
    more = f" (+{len(items) - n} more)" if len(items) > n else ""
    return ", ".join(items[:n]) + more


def check_state_dict(model: torch.nn.Module, sd: Mapping[str, torch.Tensor], source: str,
                     ignore_prefixes: tuple[str, ...] = ()) -> None:
    """Raise CheckpointError unless ``sd`` has exactly the model's keys with the model's shapes.

    Keys starting with one of ``ignore_prefixes`` (e.g. the VAE encoder when only the decoder is built)
    are dropped from ``sd`` before the comparison.
    """
    expected = model.state_dict()
    given = {k: v for k, v in sd.items() if not k.startswith(ignore_prefixes)} if ignore_prefixes else sd
    missing = set(expected) - set(given)
    unexpected = set(given) - set(expected)
    wrong = [f"{k} {tuple(given[k].shape)} != {tuple(expected[k].shape)}"
             for k in expected if k in given and tuple(given[k].shape) != tuple(expected[k].shape)]
    problems = []
    if missing:
        problems.append(f"missing keys: {_first(missing)}")
    if unexpected:
        problems.append(f"unexpected keys: {_first(unexpected)}")
    if wrong:
        problems.append(f"wrong shapes: {_first(wrong, 3)}")
    if problems:
        raise CheckpointError(f"{source}: state dict does not match the model; " + "; ".join(problems))


def load_into(model: torch.nn.Module, path_or_sd: str | os.PathLike | Mapping[str, torch.Tensor],
              ignore_prefixes: tuple[str, ...] = (), rename=None) -> None:
    """Strictly load a checkpoint file (or an in-memory state dict) into ``model``.

    rename: optional callable {name: tensor} -> {name: tensor} applied before the check (format
    adapters, e.g. the official layout of a parameter).
    """
    if isinstance(path_or_sd, Mapping):
        sd, source = dict(path_or_sd), "state dict"
    else:
        sd, source = read_state_dict(path_or_sd), str(path_or_sd)
    if rename is not None:
        sd = rename(sd)
    check_state_dict(model, sd, source, ignore_prefixes)
    sd = {k: v for k, v in sd.items() if not k.startswith(ignore_prefixes)} if ignore_prefixes else sd
    model.load_state_dict(sd, strict=True)


def save_state_dict(model: torch.nn.Module, path: str | os.PathLike, dtype: torch.dtype | None = None) -> Path:
    """Save the model's state dict as safetensors (``.safetensors``) or torch ``.pth``, atomically;
    ``dtype`` casts the floating-point tensors (e.g. bfloat16 for a compact file)."""
    sd = {k: (v.to(dtype) if dtype is not None and v.is_floating_point() else v).detach().contiguous().cpu()
          for k, v in model.state_dict().items()}

    def write(tmp: str) -> None:
        if str(path).endswith(".safetensors"):
            from safetensors.torch import save_file
            save_file(sd, tmp)
        else:
            torch.save(sd, tmp)
    return atomic_write(path, write)
