"""Where the model instances of ``toprovar serve`` run: one per visible GPU by default.

Triton places an instance of an ``instance_group { kind: KIND_GPU, gpus: [...] }`` on each listed GPU and
tells it its device (``model_instance_device_id``: an index among the GPUs the server process sees, i.e.
after ``CUDA_VISIBLE_DEVICES``). Each instance holds a whole model on its GPU (no model parallelism, no
collective communication); instances never share a GPU unless ``--instances-per-gpu`` > 1 asks for it.
"""
from __future__ import annotations

import os


def visible_gpus(device_count: int | None = None, env: dict | None = None) -> int:
    """How many GPUs the server process sees: ``device_count`` (default: torch's CUDA count) limited by
    ``CUDA_VISIBLE_DEVICES`` (of ``env``, default os.environ; '' or '-1' hides every GPU)."""
    env = os.environ if env is None else env
    if device_count is None:
        import torch
        device_count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    mask = env.get("CUDA_VISIBLE_DEVICES")
    if mask is None:
        return device_count
    ids = [t for t in (s.strip() for s in mask.split(",")) if t]
    if not ids or ids[0].startswith("-"):
        return 0
    valid = []
    for t in ids:  # CUDA stops at the first invalid entry
        if t.startswith("-"):
            break
        valid.append(t)
    return min(len(valid), device_count)


def instance_groups(gpus: int, instances_per_gpu: int = 1, gpu_ids: list[int] | None = None) -> list[dict]:
    """Triton ``instance_group`` entries: ``instances_per_gpu`` instances on each GPU (``gpu_ids``, default
    all ``gpus`` visible ones), or one CPU instance when there is no GPU.

    >>> instance_groups(2)
    [{'kind': 'KIND_GPU', 'count': 1, 'gpus': [0, 1]}]
    """
    if instances_per_gpu < 1:
        raise ValueError(f"--instances-per-gpu: must be >= 1, got {instances_per_gpu}")
    if gpu_ids is None:
        gpu_ids = list(range(gpus))
    bad = [g for g in gpu_ids if not 0 <= g < gpus]
    if bad:
        raise ValueError(f"--gpus: {bad} not among the {gpus} visible GPUs (0..{gpus - 1})")
    if not gpu_ids:
        return [{"kind": "KIND_CPU", "count": 1}]
    return [{"kind": "KIND_GPU", "count": instances_per_gpu, "gpus": sorted(set(gpu_ids))}]


def instance_device(kind: str, device_id: int | str) -> str:
    """The torch device of an instance from Triton's ``model_instance_kind`` / ``model_instance_device_id``."""
    return f"cuda:{int(device_id)}" if kind.upper() in ("GPU", "KIND_GPU") else "cpu"


def to_pbtxt(groups: list[dict]) -> str:
    """``instance_group [...]`` in Triton's model-configuration text format."""
    items = []
    for g in groups:
        gpus = f", gpus: [{', '.join(map(str, g['gpus']))}]" if g.get("gpus") else ""
        items.append(f"  {{ kind: {g['kind']}, count: {g['count']}{gpus} }}")
    return "instance_group [\n" + ",\n".join(items) + "\n]\n"
