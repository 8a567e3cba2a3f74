"""The two TensorRT flavours an export can hold engines of, and where each one's engines run.

- ``tensorrt``: TensorRT 11 (module ``tensorrt``). An engine is built on the GPU it runs on (data-centre
  and RTX GPUs alike); the manifest records that GPU's name and the runtime refuses any other GPU.
- ``rtx``: TensorRT for RTX (module ``tensorrt_rtx``, or ``tensorrt_rtx_bindings`` without the meta
  package). Engines are built ahead of time, with or without a GPU, for the compute capabilities given
  (``--trt-target sm86,sm89,sm120``); they run on RTX GPUs of those capabilities (8.6: RTX 30xx/A-series,
  8.9: RTX 40xx/Ada, 12.x: RTX 50xx/Blackwell RTX PRO), never on Hopper data-centre GPUs (H100/H200:
  compute 9.0). The runtime compares the GPU's compute capability with the manifest's targets before it
  imports or deserialises anything, so the refusal is one line even where TensorRT-RTX is not installed.

Same API family (Builder, OnnxParser, IBuilderConfig, optimization profiles, strongly typed networks,
Runtime, ``execute_async_v3``): one build path and one runtime serve both; only the module, the target
compute capabilities and the timing cache (a no-op in TensorRT-RTX) differ.
"""
from __future__ import annotations

import importlib
from pathlib import Path

FLAVOURS = ("tensorrt", "rtx")
MODULES = {"tensorrt": ("tensorrt",), "rtx": ("tensorrt_rtx", "tensorrt_rtx_bindings")}
LABELS = {"tensorrt": "TensorRT", "rtx": "TensorRT-RTX"}
INSTALL = {"tensorrt": "pip install tensorrt (TensorRT 11, a CUDA GPU to build on)",
           "rtx": "pip install tensorrt-rtx-cu13-libs==1.7.1.116 tensorrt-rtx-cu13-bindings==1.7.1.116"}
# compute capabilities TensorRT-RTX 1.7 builds for (its ComputeCapability enum; SM75 cannot compile float32
# matrix products, so it is left out) and that its runtime runs on
RTX_TARGETS = ("sm80", "sm86", "sm89", "sm120", "sm121")
DEFAULT_RTX_TARGETS = ("sm86", "sm89", "sm120")


class TensorRTUnavailable(RuntimeError):
    """The flavour's module cannot be imported or has no builder (message: one line)."""


class TargetError(ValueError):
    """A ``--trt-target`` list or an engine target that does not fit (message: one line)."""


def _first_line(exc: BaseException) -> str:
    for line in str(exc).strip().splitlines():
        if line.strip():
            return line.strip()[:300]
    return type(exc).__name__


def check_flavour(flavour: str) -> str:
    if flavour not in FLAVOURS:
        raise TargetError(f"--trt-flavor: unknown flavour {flavour!r}; choose from {', '.join(FLAVOURS)}")
    return flavour


def import_flavour(flavour: str, builder: bool = False):
    """The module of ``flavour`` or TensorRTUnavailable (one line). Any import failure counts (a missing
    wheel, a stub wheel, a shared library that does not load: ImportError, OSError, RuntimeError...);
    ``builder=True`` also needs ``Builder`` (the lean/dispatch runtimes have none)."""
    check_flavour(flavour)
    errors = []
    for name in MODULES[flavour]:
        try:
            trt = importlib.import_module(name)
            _ = trt.__version__, trt.Runtime
            if builder and not hasattr(trt, "Builder"):
                raise ImportError(f"{name} has no Builder (a runtime-only wheel)")
            return trt
        except Exception as exc:  # noqa: BLE001 - a broken wheel raises anything; reported in one line
            errors.append(f"{name}: {type(exc).__name__}: {_first_line(exc)}")
    raise TensorRTUnavailable(f"{LABELS[flavour]} is not importable ({'; '.join(errors)}); {INSTALL[flavour]}")


def parse_targets(text: str | list[str] | None) -> list[str]:
    """``"sm86,sm89"`` (or a list, or None for the default) -> sorted unique ``["sm86", "sm89"]``."""
    items = text if isinstance(text, list) else (text.split(",") if text else list(DEFAULT_RTX_TARGETS))
    out = sorted({t.strip().lower() for t in items if t.strip()}, key=lambda t: int(t[2:]) if t[2:].isdigit() else 0)
    bad = [t for t in out if t not in RTX_TARGETS]
    if bad or not out:
        raise TargetError(f"--trt-target: {', '.join(bad) or 'empty list'} not a TensorRT-RTX target; choose from "
                          f"{', '.join(RTX_TARGETS)} (comma separated)")
    return out


def capability_name(major: int, minor: int) -> str:
    return f"sm{major}{minor}"


def check_capability(targets: list[str], capability: tuple[int, int], gpu: str, what: str) -> None:
    """TargetError (one line) unless a GPU of compute ``capability`` runs engines built for ``targets``."""
    have = capability_name(*capability)
    if have in targets:
        return
    cc = f"{capability[0]}.{capability[1]}"
    why = (" (TensorRT-RTX runs on RTX GPUs: compute 8.6, 8.9, 12.x; not on Hopper data-centre GPUs)"
           if have not in RTX_TARGETS else "")
    raise TargetError(f"{what}: TensorRT-RTX engines built for {','.join(targets)} cannot run on this GPU ({gpu}, "
                      f"compute capability {cc}){why}; use --backend onnxruntime or torch, or rebuild with "
                      f"toprovar-export --engines --trt-flavor tensorrt on this GPU")


def rtx_parser_library() -> Path:
    """Make ``libtensorrt_rtx.so`` resolvable for TensorRT-RTX's ONNX parser, which dlopens that unversioned name
    when it imports a plugin node (1.7.1: the wheel ships only ``libtensorrt_rtx.so.1``; without it the parser
    throws inside a noexcept function and the process aborts; plugins/README.md). Creates the symlink beside
    the wheel's library (the parser's $ORIGIN) if missing, else one-line TargetError naming what to do."""
    try:
        import tensorrt_rtx_libs
    except Exception:  # noqa: BLE001 - an SDK install: its lib/ holds the unversioned name
        return Path("libtensorrt_rtx.so")
    libdir = Path(tensorrt_rtx_libs.__file__).parent
    link = libdir / "libtensorrt_rtx.so"
    if link.exists():
        return link
    try:
        link.symlink_to("libtensorrt_rtx.so.1")
    except OSError as exc:
        raise TargetError(f"TensorRT-RTX's ONNX parser needs {link} to import the FAE plugin node and it cannot be "
                          f"created ({exc.strerror}): run `ln -s libtensorrt_rtx.so.1 {link}` or put a folder "
                          f"holding that name on LD_LIBRARY_PATH") from None
    return link


def set_targets(trt, config, targets: list[str]) -> None:
    """Put the compute capabilities on a TensorRT-RTX builder config."""
    enum = trt.ComputeCapability
    missing = [t for t in targets if not hasattr(enum, t.upper())]
    if missing:
        raise TargetError(f"--trt-target: this TensorRT-RTX ({trt.__version__}) has no target {', '.join(missing)}")
    config.num_compute_capabilities = len(targets)
    for i, t in enumerate(targets):
        config.set_compute_capability(getattr(enum, t.upper()), i)


__all__ = ["DEFAULT_RTX_TARGETS", "FLAVOURS", "INSTALL", "LABELS", "MODULES", "RTX_TARGETS", "TargetError",
           "TensorRTUnavailable", "capability_name", "check_capability", "check_flavour", "import_flavour",
           "parse_targets", "rtx_parser_library", "set_targets"]
