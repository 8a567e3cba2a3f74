"""The Triton Python-backend model ``toprovar``: runs inside Triton's Python-backend stub process, one
instance per GPU (or one on the CPU).

Triton's dynamic batcher hands ``execute`` a list of requests; their rows go through ``ImageService`` in
batched generations, and each request gets its own response: its images, or a Triton error naming what
was wrong with it (its batch-mates are answered normally). PyTriton's own binding API cannot do that (one
exception fails the whole batch), so the server runs this model with the ``tritonserver`` binary and
Python-backend stub of the ``nvidia-pytriton`` wheel.

Inputs (batch dim first, one row per prompt): ``prompt`` BYTES, optional ``seed`` INT64, ``cfg`` FP32,
``policy`` BYTES. Outputs: ``image`` UINT8 (H, W, 3) per row, ``device`` BYTES (the instance's device and
name, e.g. ``cuda:1 NVIDIA H200 toprovar_0_1``).
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import triton_python_backend_utils as pb_utils  # provided by Triton's Python backend

from .placement import instance_device
from .server import OPTIONS_FILE
from .service import ImageModel, ImageService, RequestError, one_line


def device_label(device: str, instance: str) -> str:
    """``cuda:1 NVIDIA H200 toprovar_0_1`` / ``cpu toprovar_0``: the device an instance runs on, as it sees it."""
    if device.startswith("cuda"):
        import torch
        return f"{device} {torch.cuda.get_device_name(torch.device(device))} {instance}"
    return f"{device} {instance}"


class TritonPythonModel:
    """Triton Python-backend interface: initialize / execute / finalize."""

    def initialize(self, args: dict) -> None:
        opts = json.loads((Path(args["model_repository"]) / args["model_version"] / OPTIONS_FILE).read_text())
        self.device = instance_device(args["model_instance_kind"], args["model_instance_device_id"])
        if self.device.startswith("cuda"):
            import torch
            torch.cuda.set_device(torch.device(self.device))
        model = ImageModel(device=self.device, **opts["model"])
        self.service = ImageService(model, opts["default_policy"], opts.get("max_batch"),
                                    opts.get("batch_buckets"))
        self.label = device_label(self.device, args["model_instance_name"])
        if opts.get("warmup"):
            t0 = time.monotonic()
            warmed = self.service.warm_up(opts["warmup"], lambda name, b, sec: pb_utils.Logger.log_info(
                f"toprovar: instance {self.label}: warmed {name} x{b} in {sec:.1f} s"))
            plans = ", ".join(f"{name} x{b}" for name, b in warmed) or "none graphed"
            pb_utils.Logger.log_info(f"toprovar: instance {self.label}: warm-up ({plans}) in "
                                     f"{time.monotonic() - t0:.1f} s")
        pb_utils.Logger.log_info(f"toprovar: instance {self.label}: {model.label} ready")

    def execute(self, requests: list) -> list:
        rows, owner, errors = [], [], {}
        for i, req in enumerate(requests):
            try:
                for row in self._rows(req):
                    rows.append(row)
                    owner.append(i)
            except (RequestError, ValueError, TypeError) as exc:
                errors[i] = one_line(exc)
        results = self.service.run(rows)
        images: dict[int, list] = {}
        for i, res in zip(owner, results):
            if isinstance(res, Exception):
                errors.setdefault(i, f"generation failed: {one_line(res)}")
            else:
                images.setdefault(i, []).append(res)
        responses = []
        for i in range(len(requests)):
            if i in errors:
                responses.append(pb_utils.InferenceResponse(error=pb_utils.TritonError(errors[i])))
                continue
            img = np.stack(images[i])
            dev = np.array([[self.label.encode()]] * len(img), dtype=np.object_)
            responses.append(pb_utils.InferenceResponse(
                output_tensors=[pb_utils.Tensor("image", img), pb_utils.Tensor("device", dev)]))
        return responses

    def _rows(self, req) -> list:
        """The validated rows of one request (RequestError naming the input on a bad value)."""
        def column(name: str):
            t = pb_utils.get_input_tensor_by_name(req, name)
            return None if t is None else t.as_numpy().reshape(-1)

        prompts = column("prompt")
        if prompts is None or prompts.size == 0:
            raise RequestError("prompt: missing; send one string per request")
        cols = {k: column(k) for k in ("seed", "cfg", "policy")}
        for k, v in cols.items():
            if v is not None and v.size != prompts.size:
                raise RequestError(f"{k}: {v.size} values for {prompts.size} prompts")
        return [self.service.parse(p, *(None if v is None else v[j] for v in cols.values()))
                for j, p in enumerate(prompts)]

    def finalize(self) -> None:
        self.service = None
