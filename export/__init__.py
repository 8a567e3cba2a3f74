"""``toprovar-export``: the model and policy as ONNX pieces + manifest, and TensorRT engines.

Layout (NVIDIA demo/Diffusion style): ``OUT/onnx/*.onnx``, ``OUT/engine/*.plan``, ``OUT/manifest.json``;
the contract is ``docs/export-format.md``. The runtime reads the manifest with
``toprovar.export.manifest.load_manifest`` / ``verify`` / ``check_engine``.
"""
from .manifest import FORMAT, Manifest, ManifestError, check_engine, load_manifest, verify

__all__ = ["FORMAT", "Manifest", "ManifestError", "check_engine", "load_manifest", "verify"]
