"""transformers made importable where SciPy / scikit-learn are installed but broken.

Triton's Python-backend stub of nvidia-pytriton 0.7.0 (Triton 2.51, pybind11 2.10) needs numpy<2
(``serving.server.check_numpy``). Where the machine's SciPy was built for numpy 2 (the H200 image:
``scipy.sparse`` fails under numpy 1.26 with ``module 'numpy' has no attribute 'long'``), SciPy and
scikit-learn cannot be imported, and transformers imports both at module level whenever they are installed
(SciPy for object-detection losses, scikit-learn for assisted decoding's ``roc_curve``; toprovar's text
encoders use neither), so ``T5EncoderModel`` cannot be imported at all.
"""
from __future__ import annotations

import importlib
import importlib.util
import sys
import warnings

PROBES = {"scipy": "scipy.optimize", "sklearn": "sklearn.metrics"}  # package -> what transformers imports of it


def hide_unimportable_packages() -> dict[str, str]:
    """Mark SciPy / scikit-learn absent in this process when installed but not importable.

    ``sys.modules[name] = None`` is Python's own "not importable" mark: ``find_spec`` answers None (what
    transformers asks) and ``import name`` raises ImportError. The modules the failed import added are
    dropped (half-initialised). Returns {package: first line of its import error} for the packages it hid (SciPy first: a
    scikit-learn without it fails too).
    """
    hidden = {}
    for package, probe in PROBES.items():
        if package in sys.modules or importlib.util.find_spec(package) is None:
            continue
        before = set(sys.modules)
        try:
            importlib.import_module(probe)
        except Exception as exc:  # noqa: BLE001 (an ABI mismatch raises AttributeError, ImportError, ValueError ...)
            for name in set(sys.modules) - before:  # what the failed import left half-initialised
                del sys.modules[name]
            sys.modules[package] = None
            text = (str(exc).strip().splitlines() or [""])[0]
            hidden[package] = f"{type(exc).__name__}: {text}".rstrip(": ")
    return hidden


def prepare_transformers_import() -> None:
    """Call before importing from transformers: hides what cannot be imported, with one warning each."""
    for package, why in hide_unimportable_packages().items():
        warnings.warn(f"{package} cannot be imported with numpy {importlib.import_module('numpy').__version__} "
                      f"({why}); marked absent so that transformers loads", RuntimeWarning, stacklevel=2)
