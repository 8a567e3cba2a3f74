"""The runtime: one scale-by-scale orchestration (``orchestrator``) over three backends.

- ``torch_backend.TorchBackend``: the PyTorch modules of ``toprovar.model.pieces`` (CPU or CUDA);
- ``onnxruntime_backend.OnnxRuntimeBackend``: the exported ONNX pieces (CPU; CUDA with onnxruntime-gpu);
- ``tensorrt_backend.TensorRTBackend``: the TensorRT engines of an export (CUDA).

``engine_dir.EngineRuntime.open(DIR, backend)`` generates from a ``toprovar-export`` directory; the
command line is ``toprovar generate --engine-dir DIR --backend {trt,onnxruntime,torch}``. Submodules
are imported on use (TensorRT and ONNX Runtime are optional).
"""
from __future__ import annotations

__all__ = ["buffers", "engine_dir", "onnxruntime_backend", "orchestrator", "piece_backend", "tensorrt_backend",
           "torch_backend"]
