"""toprovar: ToProVAR entropy-guided pruning for Visual AutoRegressive text-to-image models (Infinity), with
ONNX/TensorRT export (``toprovar.export``) and one runtime over TensorRT, ONNX Runtime and PyTorch
(``toprovar.runtime``)."""

__version__ = "0.1.0"
