"""TensorRT engines from the exported ONNX pieces (``toprovar-export --engines``).

TensorRT 11 is strongly typed (no FP16/BF16 builder flags): the precision is the ONNX graph's, so a
float16/bfloat16 export gives float16/bfloat16 engines. Per piece: one optimization profile per scale for
the dynamic blocks (tokens min = 1 or the policy minimum, opt = max = that scale's n; cache length up to
that scale's cumulative tokens), one profile for the other pieces; a shared timing cache; the FAE plugin
library loaded before parsing. Engines are named ``<piece>.trt<version>.<gpu>.plan`` (demo/Diffusion puts
the TensorRT version in the engine name) and recorded in the manifest with the sha256 of the ONNX bytes
they were built from, so a runtime refuses stale engines (``manifest.check_engine``).

The FAE node: the parser maps ``toprovar::FlashAttentionEntropy`` to the IPluginV3 creator of the same
name (namespace ``toprovar``, version "1") only if it does not prefer the node's model-local function,
so the builder parses a copy of the model with that function stripped (and sets ENABLE_PLUGIN_OVERRIDE
where the parser has it), then checks that the network and the built engine hold one plugin layer per
FAE node. Everything TensorRT is imported lazily: without TensorRT, ``import_tensorrt`` raises
``TensorRTUnavailable`` with one line.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import time
from pathlib import Path
from typing import Callable

from . import fae_onnx
from .manifest import Manifest, ManifestError, file_entry, write_manifest

PLUGIN_ENV = "TOPROVAR_FAE_PLUGIN"
PLUGIN_LIBRARY = "libtoprovar_fae_trt.so"
DEFAULT_WORKSPACE = 8 << 30


class EngineError(RuntimeError):
    """An engine that cannot be built as asked (message: one line)."""


class TensorRTUnavailable(EngineError):
    """``import tensorrt`` failed."""


class PluginError(EngineError):
    """The FAE plugin library is missing or cannot be loaded, or the engine does not use it."""


def _first_line(exc: BaseException) -> str:
    for line in str(exc).strip().splitlines():
        if line.strip():
            return line.strip()[:300]
    return type(exc).__name__


# ------------------------------------------------------------------------------------------ environment
def import_tensorrt():
    """The ``tensorrt`` module, or TensorRTUnavailable (one line, with the import error)."""
    try:
        import tensorrt as trt
        _ = trt.__version__, trt.Builder  # the lean runtime / stub wheels have no builder
    except Exception as exc:
        raise TensorRTUnavailable(f"TensorRT is not importable ({type(exc).__name__}: {_first_line(exc)})") from None
    return trt


def repo_root() -> Path:
    return Path(__file__).resolve().parents[2]


def default_plugin_path() -> Path:
    """``$TOPROVAR_FAE_PLUGIN``, else ``build/native/libtoprovar_fae_trt.so`` of the source tree
    (``cmake -S cmake -B build/native && cmake --build build/native``)."""
    env = os.environ.get(PLUGIN_ENV)
    return Path(env) if env else repo_root() / "build" / "native" / PLUGIN_LIBRARY


def find_plugins(paths: list[str] | None) -> list[Path]:
    """Existing plugin library paths (``--plugins``, default ``default_plugin_path()``) or PluginError."""
    cands = [Path(p) for p in paths] if paths else [default_plugin_path()]
    for p in cands:
        if not p.is_file():
            how = ("pass --plugins PATH" if paths else
                   f"build it with `cmake -S cmake -B build/native && cmake --build build/native`, set "
                   f"{PLUGIN_ENV} or pass --plugins PATH")
            raise PluginError(f"FAE TensorRT plugin library not found: {p} ({how})")
    return [p.resolve() for p in cands]


_LOADED: dict[str, object] = {}


def load_plugins(trt, paths: list[Path]) -> None:
    """Load plugin libraries into TensorRT's registry once per process (``IPluginRegistry::loadLibrary``:
    the library exports getCreators/setLoggerFinder; never also dlopen it with ctypes)."""
    reg = trt.get_plugin_registry()
    for p in paths:
        key = str(p)
        if key in _LOADED:
            continue
        try:
            handle = reg.load_library(key)
        except Exception as exc:
            raise PluginError(f"cannot load the FAE plugin library {p} ({_first_line(exc)})") from None
        if handle is None:
            raise PluginError(f"cannot load the FAE plugin library {p} (TensorRT's registry refused it; see the "
                              f"TensorRT log with -v)")
        _LOADED[key] = handle
    creator = _fae_creator(trt)
    if creator is None:
        raise PluginError(f"no plugin creator {fae_onnx.OP_TYPE!r} (namespace {fae_onnx.PLUGIN_NAMESPACE!r}, version "
                          f"{fae_onnx.PLUGIN_VERSION}) after loading {', '.join(map(str, paths))}")


def _fae_creator(trt):
    reg = trt.get_plugin_registry()
    for getter in ("get_creator", "get_plugin_creator"):
        fn = getattr(reg, getter, None)
        if fn is None:
            continue
        try:
            c = fn(fae_onnx.OP_TYPE, fae_onnx.PLUGIN_VERSION, fae_onnx.PLUGIN_NAMESPACE)
        except Exception:
            c = None
        if c is not None:
            return c
    for c in getattr(reg, "all_creators", None) or getattr(reg, "plugin_creator_list", None) or []:
        if (getattr(c, "name", None) == fae_onnx.OP_TYPE
                and getattr(c, "plugin_namespace", "") == fae_onnx.PLUGIN_NAMESPACE):
            return c
    return None


def gpu_name(device: int = 0) -> str:
    """The GPU's marketing name (torch.cuda, else nvidia-smi), or EngineError."""
    try:
        import torch
        if torch.cuda.is_available():
            return torch.cuda.get_device_name(device)
    except Exception:
        pass
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader", f"--id={device}"],
                             capture_output=True, text=True, timeout=30, check=True).stdout.strip()
        if out:
            return out.splitlines()[0].strip()
    except Exception:
        pass
    raise EngineError("no CUDA GPU found: TensorRT engines are built on the GPU they will run on")


def slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9.]+", "-", text).strip("-")


def engine_filename(piece: str, trt_version: str, gpu: str) -> str:
    """``<piece>.trt<version>.<gpu>.plan``, e.g. ``block_00.trt11.1.0.12.NVIDIA-H100-80GB-HBM3.plan``."""
    return f"{piece}.trt{trt_version}.{slug(gpu)}.plan"


# ------------------------------------------------------------------------------------------ one engine
def _parse(trt, logger, network, onnx_path: Path, verbose: bool):
    """Parse ``onnx_path`` without the FAE local function (plugin override flag set when present)."""
    import onnx
    model = onnx.load(str(onnx_path), load_external_data=False)
    n_fae = len(fae_onnx.fae_nodes(model))
    stripped = fae_onnx.strip_local_function(model)
    parser = trt.OnnxParser(network, logger)
    flag = getattr(getattr(trt, "OnnxParserFlag", None), "ENABLE_PLUGIN_OVERRIDE", None)
    if flag is not None:
        parser.set_flag(flag)
    ok = parser.parse(stripped.SerializeToString(), str(onnx_path))  # path: where external data is found
    if not ok:
        errs = [str(parser.get_error(i)) for i in range(parser.num_errors)]
        raise EngineError(f"TensorRT cannot parse {onnx_path.name}: " + (errs[0].splitlines()[0] if errs else "?")
                          + (f" (+{len(errs) - 1} more)" if len(errs) > 1 else ""))
    return parser, n_fae


def network_plugin_layers(trt, network) -> int:
    """Number of plugin layers in a parsed network (the FAE nodes that became the plugin)."""
    kinds = {getattr(trt.LayerType, k) for k in ("PLUGIN_V3", "PLUGIN_V2", "PLUGIN") if hasattr(trt.LayerType, k)}
    return sum(1 for i in range(network.num_layers) if network.get_layer(i).type in kinds)


def engine_plugin_layers(trt, engine) -> int | None:
    """Plugin layers the engine inspector reports for a built engine (None if the inspector says nothing)."""
    try:
        inspector = engine.create_engine_inspector()
        info = json.loads(inspector.get_engine_information(trt.LayerInformationFormat.JSON))
    except Exception:
        return None
    layers = info.get("Layers", []) if isinstance(info, dict) else []
    if not layers or not isinstance(layers[0], dict) or "LayerType" not in layers[0]:
        return None  # names only (profiling verbosity below DETAILED)
    # only the layer type counts: an expanded function's layers may carry the op name in their names
    return sum(1 for layer in layers if "plugin" in str(layer.get("LayerType", "")).lower())


def _profiles(trt, builder, config, entry: dict) -> int:
    n = 0
    static = {i["name"] for i in entry["inputs"] if all(isinstance(d, int) for d in i["shape"])}
    for prof in entry.get("profiles", []):
        p = builder.create_optimization_profile()
        for name, s in prof.items():
            if name in static:
                continue
            p.set_shape(name, tuple(s["min"]), tuple(s["opt"]), tuple(s["max"]))
        config.add_optimization_profile(p)
        n += 1
    return n


def build_engine(trt, onnx_path: Path, entry: dict, engine_path: Path, timing_cache: Path | None,
                 workspace: int = DEFAULT_WORKSPACE, opt_level: int | None = None, verbose: bool = False) -> dict:
    """Build one serialized engine (written atomically); returns {profiles, plugin_layers, build_s}."""
    from toprovar.model.checkpoint import atomic_write
    t0 = time.perf_counter()
    logger = trt.Logger(trt.Logger.VERBOSE if verbose else trt.Logger.WARNING)
    builder = trt.Builder(logger)
    flags = 0
    major = int(str(trt.__version__).split(".")[0])
    if major < 11 and hasattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED"):  # TRT 10: opt in
        flags |= 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    network = builder.create_network(flags)
    parser, n_fae = _parse(trt, logger, network, onnx_path, verbose)
    n_plugin = network_plugin_layers(trt, network)
    if n_plugin != n_fae:
        raise PluginError(f"{onnx_path.name}: {n_fae} FlashAttentionEntropy node(s) but {n_plugin} plugin layer(s) "
                          f"after parsing: the parser expanded the function instead of using the plugin")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, workspace)
    if opt_level is not None:
        config.builder_optimization_level = opt_level
    config.profiling_verbosity = trt.ProfilingVerbosity.DETAILED  # layer types for the inspector check
    cache = config.create_timing_cache(timing_cache.read_bytes() if timing_cache and timing_cache.is_file() else b"")
    config.set_timing_cache(cache, ignore_mismatch=False)
    n_prof = _profiles(trt, builder, config, entry)
    plan = builder.build_serialized_network(network, config)
    if plan is None:
        raise EngineError(f"TensorRT failed to build {onnx_path.name} (run with -v for the builder log)")
    data = bytes(plan)
    if timing_cache is not None:
        blob = bytes(config.get_timing_cache().serialize())
        atomic_write(timing_cache, lambda tmp: Path(tmp).write_bytes(blob))
    if n_fae:
        engine = trt.Runtime(logger).deserialize_cuda_engine(data)
        if engine is None:
            raise EngineError(f"{engine_path.name}: the built engine does not deserialize")
        n_eng = engine_plugin_layers(trt, engine)
        if n_eng is not None and n_eng < n_fae:
            raise PluginError(f"{engine_path.name}: the engine holds {n_eng} plugin layer(s) for {n_fae} "
                              f"FlashAttentionEntropy node(s): the plugin was not used")
        del engine
    atomic_write(engine_path, lambda tmp: Path(tmp).write_bytes(data))
    return {"profiles": max(1, n_prof), "plugin_layers": n_plugin, "build_s": round(time.perf_counter() - t0, 1)}


# ------------------------------------------------------------------------------------------ all engines
def build_engines(manifest: Manifest, engine_dir: Path | None = None, plugins: list[str] | None = None,
                  timing_cache: str | None = None, names: list[str] | None = None, workspace: int = DEFAULT_WORKSPACE,
                  opt_level: int | None = None, verbose: bool = False, progress: bool = True,
                  on_engine: Callable[[str, dict], None] | None = None) -> dict:
    """Build (or reuse, when up to date) the engine of every piece; updates and rewrites the manifest."""
    plugin_paths = find_plugins(plugins)
    trt = import_tensorrt()
    load_plugins(trt, plugin_paths)
    gpu = gpu_name()
    root = manifest.root
    engine_dir = Path(engine_dir) if engine_dir else root / "engine"
    try:
        engine_dir.resolve().relative_to(root.resolve())
    except ValueError:
        raise EngineError(f"--engine-dir {engine_dir} must lie inside --out {root}") from None
    engine_dir.mkdir(parents=True, exist_ok=True)
    cache = Path(timing_cache) if timing_cache else engine_dir / "timing.cache"
    from tqdm.auto import tqdm
    todo = [n for n in manifest["pieces"] if names is None or n in names]
    manifest["versions"]["tensorrt"] = str(trt.__version__)
    for name in tqdm(todo, desc="engines", unit="engine", disable=not progress):
        entry = manifest["pieces"][name]
        path = engine_dir / engine_filename(name, trt.__version__, gpu)
        old = manifest["engines"].get(name)
        if (old and old.get("onnx_sha256") == entry["sha256"] and old.get("tensorrt") == str(trt.__version__)
                and old.get("gpu") == gpu and (root / old["file"]).is_file()
                and file_entry(root / old["file"], root)["sha256"] == old["sha256"]):
            continue  # up to date
        info = build_engine(trt, root / entry["file"], entry, path, cache, workspace, opt_level, verbose)
        manifest["engines"][name] = {**file_entry(path, root), "tensorrt": str(trt.__version__), "gpu": gpu,
                                     "onnx_sha256": entry["sha256"], "profiles": info["profiles"],
                                     "plugins": [str(p) for p in plugin_paths] if entry.get("custom_ops") else [],
                                     "plugin_layers": info["plugin_layers"]}
        write_manifest(dict(manifest), root)  # after each engine: an interrupted build keeps what is done
        if on_engine:
            on_engine(name, manifest["engines"][name])
    return manifest


__all__ = ["EngineError", "PluginError", "TensorRTUnavailable", "build_engine", "build_engines", "default_plugin_path",
           "engine_filename", "find_plugins", "gpu_name", "import_tensorrt", "load_plugins", "ManifestError"]
