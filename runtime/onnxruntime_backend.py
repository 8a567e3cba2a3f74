"""ONNX Runtime backend: the exported ONNX pieces, run with IO binding on torch tensors.

CPU: the CPU execution provider, inputs and outputs bound by pointer to torch CPU tensors (no copies).
CUDA: the CUDA execution provider of onnxruntime-gpu, bound to torch CUDA tensors on the backend's
stream (``user_compute_stream``), ORT's end-of-run synchronisation off, so pieces, the orchestrator's
gathers and the sampling noise copies are ordered on one stream. The FAE node runs as its model-local
ONNX function. A session is created (and its ONNX file's sha256 checked against the manifest) the first
time a piece is used, so the ``_entropy`` block variants cost nothing unless a policy asks for entropy.
"""
from __future__ import annotations

import torch

from .buffers import ONNX_ELEMENT_TYPES
from .piece_backend import PieceBackend


class BackendUnavailable(RuntimeError):
    """The requested backend or device cannot run here (message: one line, says what to install)."""


def _ort():
    try:
        import onnxruntime as ort
    except ImportError:
        raise BackendUnavailable("--backend onnxruntime: onnxruntime is not installed; pip install onnxruntime "
                                 "(CPU) or onnxruntime-gpu (CUDA)") from None
    return ort


class OnnxRuntimeBackend(PieceBackend):
    """Backend protocol over ONNX Runtime sessions, one per piece (created on first use)."""

    name = "onnxruntime"

    def __init__(self, manifest, device: torch.device | str = "cpu", verify: bool = True,
                 threads: int | None = None, optimization: str = "all", providers: list | None = None):
        super().__init__(manifest, device)
        ort = _ort()
        self.ort = ort
        self.verify = verify
        self._sessions: dict[str, object] = {}
        self._so = ort.SessionOptions()
        self._so.log_severity_level = 3
        self._so.graph_optimization_level = {
            "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL, "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
            "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC, "none": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
        }[optimization]
        if threads:
            self._so.intra_op_num_threads = threads
        self._run_options = ort.RunOptions()
        available = ort.get_available_providers()
        if self.device.type == "cuda":
            if "CUDAExecutionProvider" not in available:
                raise BackendUnavailable(f"--backend onnxruntime --device {self.device}: this onnxruntime has no "
                                         f"CUDAExecutionProvider (has {available}); pip install onnxruntime-gpu or "
                                         f"use --device cpu")
            self.stream = torch.cuda.Stream(self.device)
            self._providers = providers or [("CUDAExecutionProvider", {
                "device_id": self.device.index, "user_compute_stream": str(self.stream.cuda_stream)})]
            # the pieces run on our stream, like everything else of the generation: no sync per run
            self._run_options.add_run_config_entry("disable_synchronize_execution_providers", "1")
            self._io_device, self._io_index = "cuda", self.device.index
        elif self.device.type == "cpu":
            self.stream = None
            self._providers = providers or ["CPUExecutionProvider"]
            self._io_device, self._io_index = "cpu", 0
        else:
            raise BackendUnavailable(f"--device {self.device}: the onnxruntime backend runs on cpu or cuda")

    def session(self, name: str):
        """The InferenceSession of piece ``name`` (hash-checked and created on first use)."""
        sess = self._sessions.get(name)
        if sess is None:
            self.require(name)
            if self.verify:
                from toprovar.export.manifest import verify
                verify(self.manifest, [name])
            path = self.manifest.piece_path(name)
            try:
                sess = self.ort.InferenceSession(str(path), self._so, providers=self._providers)
            except Exception as exc:  # ORT raises its own Fail/InvalidGraph types
                first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
                raise RuntimeError(f"onnxruntime: cannot load piece {name} ({path}): {first[:300]}") from None
            self._sessions[name] = sess
        return sess

    def load_all(self, names=None) -> None:
        """Create every session now (else on first use)."""
        for name in (names or self.pieces):
            self.session(name)

    def _execute(self, name, inputs, outputs):
        sess = self.session(name)
        io = sess.io_binding()
        dev, idx = self._io_device, self._io_index
        for key, t in inputs.items():
            io.bind_input(key, dev, idx, ONNX_ELEMENT_TYPES[t.dtype], list(t.shape), t.data_ptr())
        for key, t in outputs.items():
            if t is None:
                io.bind_output(key, dev, idx)
            else:
                io.bind_output(key, dev, idx, ONNX_ELEMENT_TYPES[t.dtype], list(t.shape), t.data_ptr())
        if self.stream is not None:
            self.stream.wait_stream(torch.cuda.current_stream(self.device))
        sess.run_with_iobinding(io, self._run_options)
        if self.stream is not None:
            torch.cuda.current_stream(self.device).wait_stream(self.stream)
        if any(t is None for t in outputs.values()):
            values = io.get_outputs()
            outputs = dict(outputs)
            for i, key in enumerate(outputs):
                if outputs[key] is None:
                    outputs[key] = torch.from_dlpack(values[i])
        return outputs


__all__ = ["BackendUnavailable", "OnnxRuntimeBackend"]
