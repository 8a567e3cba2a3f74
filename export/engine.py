"""TensorRT engines from the exported ONNX pieces (``toprovar-export --engines --trt-flavor tensorrt|rtx``).

One build path for both flavours (``trt_flavour``): TensorRT 11 (built on the GPU it runs on) and
TensorRT-RTX (built ahead of time for ``--trt-target`` compute capabilities, with or without a GPU).
Networks are strongly typed (TensorRT 11 and TensorRT-RTX have no FP16/BF16 builder flags): the precision
is the ONNX graph's. TF32 is cleared, so the float32 parts (every export's residual stream, AdaLN, head,
sampling; all of a float32 export) compute in float32. Per piece: one optimization profile per scale for
the blocks, one for the other dynamic pieces (the manifest's ``profiles``).

The FAE node (``block_XX_entropy``), one of two ways, recorded per engine as ``fae``:

- ``plugin``: a plugin library is given (``--plugin`` or ``$TOPROVAR_FAE_PLUGIN``). It is loaded into the
  registry before parsing; the parser gets a copy of the model without the FAE local function, so the
  node's ``plugin_namespace`` attribute selects the IPluginV3 creator (no ENABLE_PLUGIN_OVERRIDE: that
  flag would also hand other nodes to standard plugins). Then the network and the built engine (its
  layer report) must hold one IPluginV3 layer per FAE node. The plugin takes bfloat16/float16 q/k/v: a
  float32 export is refused for it in one line before anything is built.
- ``function``: no plugin library. The parser expands the model-local function body (the node's plugin
  attributes are dropped from the copy it parses, so a registered creator cannot take over); the engine
  must hold no FAE plugin layer. Correct in every dtype, slower than the fused kernel.

Engines are named ``<piece>.trt<version>.<gpu>.plan`` (TensorRT) or ``<piece>.rtx<version>.<targets>.plan``
(TensorRT-RTX) and recorded in the manifest with flavour, version, GPU or targets and the sha256 of the
ONNX bytes they were built from, so a runtime refuses stale or foreign engines (``manifest.check_engine``).
"""
from __future__ import annotations

import dataclasses
import os
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

from . import fae_onnx
from .engine_check import (EngineCheckError, check_network_io, check_report, fae_layer_names, make_build_log,
                           network_fae_plugin_layers, report_from_engine)
from .manifest import Manifest, ManifestError, file_entry, write_manifest
from .trt_flavour import (LABELS, TargetError, TensorRTUnavailable, check_flavour, import_flavour, parse_targets,
                          rtx_parser_library, set_targets)

PLUGIN_ENV = "TOPROVAR_FAE_PLUGIN"
PLUGIN_LIBRARY = "libtoprovar_fae_trt.so"
PLUGIN_DTYPES = ("bfloat16", "float16")  # what the FAE plugin's supportsFormatCombination accepts for q/k/v
DEFAULT_WORKSPACE = 8 << 30


class EngineError(RuntimeError):
    """An engine that cannot be built as asked (message: one line)."""


class PluginError(EngineError):
    """The FAE plugin library is missing or cannot be loaded, or the engine does not use it."""


def _first_line(exc: BaseException) -> str:
    for line in str(exc).strip().splitlines():
        if line.strip():
            return line.strip()[:300]
    return type(exc).__name__


def _warn(msg: str) -> None:
    print(f"toprovar-export: warning: {msg}", file=sys.stderr)


# ------------------------------------------------------------------------------------------ environment
def import_tensorrt(flavour: str = "tensorrt"):
    """The builder module of ``flavour`` (``tensorrt``, or ``tensorrt_rtx``/``tensorrt_rtx_bindings``), else
    TensorRTUnavailable (one line, whatever the import raised)."""
    return import_flavour(flavour, builder=True)


def plugin_paths(paths: list[str] | None) -> list[Path]:
    """The FAE plugin libraries to build with: ``paths`` (``--plugin``; ``[]``: explicitly none), else
    ``$TOPROVAR_FAE_PLUGIN``, else none (the ``_entropy`` pieces are built from the function body).
    PluginError (one line) for a missing file."""
    if paths is not None:
        given, src = [Path(p) for p in paths], "--plugin"
    else:
        env = os.environ.get(PLUGIN_ENV)
        given, src = ([Path(env)] if env else []), f"${PLUGIN_ENV}"
    for p in given:
        if not p.is_file():
            raise PluginError(f"{src}: FAE TensorRT plugin library not found: {p} (build it with `cmake -S cmake -B "
                              f"build/native && cmake --build build/native`, or leave it out to build the FAE "
                              f"pieces from the ONNX function body)")
    return [p.resolve() for p in given]


_LOADED: dict[str, object] = {}


def load_plugins(trt, paths: list[Path]) -> None:
    """Load plugin libraries into the registry once per process (``IPluginRegistry.load_library``: the library
    exports getCreators/setLoggerFinder; never also dlopen it with ctypes) and check the FAE creator."""
    if not paths:
        return
    reg = trt.get_plugin_registry()
    for p in paths:
        key = f"{trt.__name__}:{p}"
        if key in _LOADED:
            continue
        try:
            handle = reg.load_library(str(p))
        except Exception as exc:
            raise PluginError(f"cannot load the FAE plugin library {p} ({_first_line(exc)})") from None
        if handle is None:
            raise PluginError(f"cannot load the FAE plugin library {p} ({trt.__name__}'s registry refused it; see "
                              f"its log with -v)")
        _LOADED[key] = handle
    if fae_creator(trt) is None:
        raise PluginError(f"no plugin creator {fae_onnx.OP_TYPE!r} (namespace {fae_onnx.PLUGIN_NAMESPACE!r}, version "
                          f"{fae_onnx.PLUGIN_VERSION}) after loading {', '.join(map(str, paths))}")


def fae_creator(trt):
    """The registered FAE plugin creator, or None."""
    reg = trt.get_plugin_registry()
    try:
        return reg.get_creator(fae_onnx.OP_TYPE, fae_onnx.PLUGIN_VERSION, fae_onnx.PLUGIN_NAMESPACE)
    except Exception:  # noqa: BLE001 - "not found" is an exception in some versions, None in others
        return None


def gpu_name(device: int = 0) -> str:
    """The GPU's marketing name (torch.cuda, else nvidia-smi), or EngineError."""
    try:
        import torch
        if torch.cuda.is_available():
            return torch.cuda.get_device_name(device)
    except Exception:  # noqa: BLE001
        pass
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader", f"--id={device}"],
                             capture_output=True, text=True, timeout=30, check=True).stdout.strip()
        if out:
            return out.splitlines()[0].strip()
    except Exception:  # noqa: BLE001
        pass
    raise EngineError("no CUDA GPU found: TensorRT engines are built on the GPU they run on (TensorRT-RTX builds "
                      "without one: --trt-flavor rtx)")


def gpu_capability(device: int = 0) -> tuple[int, int] | None:
    """The CUDA GPU's compute capability, or None without one."""
    try:
        import torch
        if torch.cuda.is_available():
            return tuple(torch.cuda.get_device_capability(device))
    except Exception:  # noqa: BLE001
        pass
    return None


def slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9.]+", "-", text).strip("-")


@dataclasses.dataclass(frozen=True)
class Target:
    """What an engine is built for: flavour, builder version, and the GPU (TensorRT) or the compute
    capabilities (TensorRT-RTX)."""
    flavour: str
    version: str
    gpu: str | None = None
    targets: tuple[str, ...] | None = None

    @property
    def label(self) -> str:
        return f"{LABELS[self.flavour]} {self.version}"

    def filename(self, piece: str) -> str:
        """``block_00.trt11.1.0.12.NVIDIA-H100-80GB-HBM3.plan`` or ``block_00.rtx1.7.1.116.sm86-sm89.plan``."""
        if self.flavour == "rtx":
            return f"{piece}.rtx{self.version}.{'-'.join(self.targets)}.plan"
        return f"{piece}.trt{self.version}.{slug(self.gpu)}.plan"

    def record(self) -> dict:
        """The manifest fields of an engine built for this target."""
        return {"flavour": self.flavour, "tensorrt": self.version, "gpu": self.gpu,
                "targets": list(self.targets) if self.targets else None}

    def matches(self, eng: dict) -> bool:
        return all(eng.get(k) == v for k, v in self.record().items())

    def runs_here(self) -> bool:
        """Whether an engine for this target deserialises on this machine (engine inspector checks)."""
        if self.flavour == "tensorrt":
            return True  # built on this GPU
        cap = gpu_capability()
        return cap is not None and f"sm{cap[0]}{cap[1]}" in self.targets


def build_target(trt, flavour: str, targets: str | list[str] | None = None) -> Target:
    """The Target of builds with module ``trt`` here (TensorRT: this GPU, else EngineError)."""
    if flavour == "rtx":
        return Target("rtx", str(trt.__version__), None, tuple(parse_targets(targets)))
    if targets:
        raise TargetError("--trt-target: only for --trt-flavor rtx (a TensorRT engine is built for the GPU it is "
                          "built on)")
    return Target("tensorrt", str(trt.__version__), gpu_name(), None)


def engine_filename(piece: str, trt_version: str, gpu: str) -> str:
    """``<piece>.trt<version>.<gpu>.plan`` of a TensorRT engine (``Target.filename``)."""
    return Target("tensorrt", trt_version, gpu).filename(piece)


# ------------------------------------------------------------------------------------------ one engine
def fae_mode(entry: dict, plugins: list[Path], dtype: str, name: str) -> str | None:
    """How the FAE nodes of piece ``name`` are built: None (none), ``plugin`` or ``function``; PluginError (one
    line) for the plugin with a float32 export (the plugin takes bfloat16/float16 q/k/v only)."""
    if not any(op.endswith(fae_onnx.OP_TYPE) for op in entry.get("custom_ops", [])):
        return None
    if not plugins:
        return "function"
    if dtype not in PLUGIN_DTYPES:
        raise PluginError(f"{name}: the FAE plugin takes bfloat16/float16 q/k/v, this export is {dtype}; export with "
                          f"--dtype bfloat16 or float16, or build without --plugin (FAE from the ONNX function body)")
    return "plugin"


def parse_model(trt, logger, network, onnx_path: Path, mode: str | None):
    """Parse ``onnx_path`` into ``network``; returns (parser, FAE node names). ``plugin``: the FAE local function
    is stripped (the node's plugin_namespace picks the creator); ``function``: the node's plugin attributes are
    dropped (the parser expands the function body). No parser flags."""
    import onnx
    model = onnx.load(str(onnx_path), load_external_data=False)
    nodes = fae_onnx.fae_nodes(model)
    if mode == "plugin":
        model = fae_onnx.strip_local_function(model)
    elif mode == "function":
        model = fae_onnx.without_plugin_attributes(model)
    parser = trt.OnnxParser(network, logger)
    ok = parser.parse(model.SerializeToString(), str(onnx_path))  # path: where external data is found
    if not ok:
        errs = [str(parser.get_error(i)) for i in range(parser.num_errors)]
        raise EngineError(f"{_label(trt)} cannot parse {onnx_path.name}: " +
                          (errs[0].splitlines()[0] if errs else "?") +
                          (f" (+{len(errs) - 1} more)" if len(errs) > 1 else ""))
    return parser, [n.name for n in nodes]


def _label(trt) -> str:
    return LABELS["rtx" if "rtx" in trt.__name__ else "tensorrt"]


def builder_config(trt, builder, target: Target, workspace: int = DEFAULT_WORKSPACE, opt_level: int | None = None):
    """The IBuilderConfig of every build: workspace, optimization level, DETAILED profiling verbosity (layer
    types in the layer report), TF32 cleared, and the compute capabilities of a TensorRT-RTX target."""
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, workspace)
    if opt_level is not None:
        config.builder_optimization_level = opt_level
    config.profiling_verbosity = trt.ProfilingVerbosity.DETAILED
    config.clear_flag(trt.BuilderFlag.TF32)
    if target.flavour == "rtx":
        set_targets(trt, config, list(target.targets))
    return config


def add_profiles(builder, config, entry: dict, what: str) -> int:
    """The manifest's optimization profiles on ``config`` (static inputs have none); returns their number."""
    static = {i["name"] for i in entry["inputs"] if all(isinstance(d, int) for d in i["shape"])}
    profiles = entry.get("profiles", [])
    for k, prof in enumerate(profiles):
        p = builder.create_optimization_profile()
        for name, s in prof.items():
            if name not in static:
                p.set_shape(name, tuple(s["min"]), tuple(s["opt"]), tuple(s["max"]))
        if config.add_optimization_profile(p) < 0:
            raise EngineError(f"{what}: optimization profile {k} is invalid for the builder: {prof}")
    return len(profiles)


def attach_timing_cache(config, path: Path | None) -> None:
    """Start ``config`` from the timing cache at ``path`` (TensorRT only). A corrupt cache or one of another
    GPU/TensorRT version is reported in one warning line and replaced by an empty one."""
    blob = path.read_bytes() if path is not None and path.is_file() else b""
    cache = config.create_timing_cache(blob)
    if cache is None and blob:
        _warn(f"timing cache {path} is not readable (corrupt?): starting an empty one, it will be replaced")
        cache, blob = config.create_timing_cache(b""), b""
    if cache is None:
        raise EngineError("TensorRT could not create a timing cache")
    if not config.set_timing_cache(cache, ignore_mismatch=False):
        if not blob:
            raise EngineError("TensorRT refused an empty timing cache")
        _warn(f"timing cache {path} was made by another GPU or TensorRT version: not used, it will be replaced")
        if not config.set_timing_cache(config.create_timing_cache(b""), ignore_mismatch=False):
            raise EngineError("TensorRT refused an empty timing cache")


def save_timing_cache(config, path: Path) -> None:
    """Write the config's timing cache to ``path`` (atomically); a warning line when TensorRT returns none."""
    from toprovar.model.checkpoint import atomic_write
    cache = config.get_timing_cache()
    if cache is None:
        _warn(f"TensorRT returned no timing cache; {path} was not updated")
        return
    blob = bytes(cache.serialize())
    atomic_write(path, lambda tmp: Path(tmp).write_bytes(blob))


def build_engine(trt, onnx_path: Path, entry: dict, engine_path: Path, target: Target, mode: str | None = None,
                 timing_cache: Path | None = None, workspace: int = DEFAULT_WORKSPACE, opt_level: int | None = None,
                 verbose: bool = False) -> dict:
    """Build one serialized engine, check it against ``entry`` (``engine_check``) and write it atomically.
    Returns {profiles, fae, plugin_layers, layers, report (EngineReport), io, bytes, build_s}. ``mode``:
    ``fae_mode`` of the piece."""
    from toprovar.model.checkpoint import atomic_write
    what = engine_path.name
    t0 = time.perf_counter()
    log = make_build_log(trt, verbose)
    builder = trt.Builder(log)
    flags = 0
    if target.flavour == "tensorrt" and int(target.version.split(".")[0]) < 11:  # TensorRT 10: opt in
        flags |= 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    network = builder.create_network(flags)
    parser, fae_nodes = parse_model(trt, log, network, onnx_path, mode)  # parser owns weights: kept until built
    try:
        io = check_network_io(trt, network, entry, what)
    except EngineCheckError as exc:
        raise EngineError(str(exc)) from None
    n_net = network_fae_plugin_layers(trt, network, fae_nodes)
    want = len(fae_nodes) if mode == "plugin" else 0
    if n_net != want:
        raise PluginError(f"{onnx_path.name}: {len(fae_nodes)} FlashAttentionEntropy node(s), {n_net} FAE plugin "
                          f"layer(s) after parsing ({mode or 'no FAE'}: {want} expected)")
    config = builder_config(trt, builder, target, workspace, opt_level)
    cache = timing_cache if target.flavour == "tensorrt" else None  # TensorRT-RTX: timing caches are no-ops
    if cache is not None:
        attach_timing_cache(config, cache)
    n_prof = add_profiles(builder, config, entry, what)
    plan = builder.build_serialized_network(network, config)
    if plan is None:
        raise EngineError(f"{_label(trt)} failed to build {onnx_path.name}: "
                          f"{log.errors[-1] if log.errors else 'see the builder log with -v'}")
    data = bytes(plan)
    del parser
    if cache is not None:
        save_timing_cache(config, cache)
    report = log.report
    if target.runs_here():  # the engine deserialises here: its inspector and tensor queries
        engine = trt.Runtime(log).deserialize_cuda_engine(data)
        if engine is None:
            raise EngineError(f"{what}: the built engine does not deserialize ({log.errors[-1] if log.errors else ''})")
        report = report_from_engine(trt, engine)
        del engine
    if report is None:
        raise EngineError(f"{what}: the builder logged no engine report (profiling verbosity DETAILED expected)")
    try:
        check_report(report, entry, what)
    except EngineCheckError as exc:
        raise EngineError(str(exc)) from None
    found = fae_layer_names(report.layers, fae_nodes)
    if len(found) != want:
        raise PluginError(f"{what}: the engine holds FAE plugin layers for {len(found)} of {len(fae_nodes)} "
                          f"FlashAttentionEntropy node(s) ({mode}: {want} expected; {report.source})")
    atomic_write(engine_path, lambda tmp: Path(tmp).write_bytes(data))
    return {"profiles": max(1, n_prof), "fae": mode, "plugin_layers": len(found), "layers": len(report.layers),
            "report": report, "io": io, "bytes": len(data), "build_s": round(time.perf_counter() - t0, 2)}


# ------------------------------------------------------------------------------------------ all engines
_WORKER: dict = {}


def _worker_init(flavour: str, targets: tuple | None, paths: list[Path], kwargs: dict) -> None:
    trt = import_tensorrt(flavour)
    target = build_target(trt, flavour, list(targets) if targets else None)
    if paths:
        load_plugins(trt, paths)
    _WORKER.update(trt=trt, target=target, kwargs=kwargs)


def _worker_build(name: str, onnx_path: str, entry: dict, engine_path: str, mode: str | None) -> tuple[str, dict]:
    w = _WORKER
    return name, build_engine(w["trt"], Path(onnx_path), entry, Path(engine_path), w["target"], mode, **w["kwargs"])


def build_engines(manifest: Manifest, engine_dir: Path | None = None, plugins: list[str] | None = None,
                  timing_cache: str | None = None, names: list[str] | None = None, workspace: int = DEFAULT_WORKSPACE,
                  opt_level: int | None = None, verbose: bool = False, progress: bool = True,
                  flavour: str = "tensorrt", targets: str | list[str] | None = None, jobs: int = 1,
                  on_engine: Callable[[str, dict, dict], None] | None = None) -> Manifest:
    """Build (or reuse, when up to date) the engine of every piece (or ``names``); updates and rewrites the
    manifest after each engine. ``jobs`` > 1: TensorRT-RTX builds in that many worker processes (each builder
    uses one thread); TensorRT builds stay in one process (one GPU, a shared timing cache).
    ``on_engine(name, manifest entry, build info)`` after each build."""
    check_flavour(flavour)
    if flavour == "rtx":
        parse_targets(targets)  # bad --trt-target before anything is imported
    paths = plugin_paths(plugins)
    todo = [n for n in manifest["pieces"] if names is None or n in names]
    modes = {n: fae_mode(manifest["pieces"][n], paths, manifest["dtype"], n) for n in todo}  # refuse before building
    root = manifest.root
    engine_dir = Path(engine_dir) if engine_dir else root / "engine"
    try:
        engine_dir.resolve().relative_to(root.resolve())
    except ValueError:
        raise EngineError(f"--engine-dir {engine_dir} must lie inside --out {root}") from None
    if timing_cache and flavour == "rtx":
        _warn("--timing-cache: TensorRT-RTX has no timing cache (its timing-cache calls are no-ops); ignored")
    trt = import_tensorrt(flavour)
    target = build_target(trt, flavour, targets)
    use_plugin = [p for p in paths] if any(m == "plugin" for m in modes.values()) else []
    if use_plugin and flavour == "rtx":
        rtx_parser_library()
    load_plugins(trt, use_plugin)
    engine_dir.mkdir(parents=True, exist_ok=True)
    cache = Path(timing_cache) if timing_cache else engine_dir / "timing.cache"
    manifest["versions"]["tensorrt" if flavour == "tensorrt" else "tensorrt_rtx"] = target.version

    def stale(name: str) -> bool:
        old, entry = manifest["engines"].get(name), manifest["pieces"][name]
        return not (old and old.get("onnx_sha256") == entry["sha256"] and target.matches(old)
                    and old.get("fae") == modes[name] and (root / old["file"]).is_file()
                    and file_entry(root / old["file"], root)["sha256"] == old["sha256"])

    def record(name: str, info: dict) -> None:
        entry, old = manifest["pieces"][name], manifest["engines"].get(name)
        path = engine_dir / target.filename(name)
        manifest["engines"][name] = {**file_entry(path, root), **target.record(), "onnx_sha256": entry["sha256"],
                                     "profiles": info["profiles"], "fae": modes[name],
                                     "plugins": [str(p) for p in paths] if modes[name] == "plugin" else [],
                                     "plugin_layers": info["plugin_layers"], "layers": info["layers"],
                                     "build_s": info["build_s"]}
        if old and old.get("file") != manifest["engines"][name]["file"] and (root / old["file"]).is_file():
            (root / old["file"]).unlink()  # the replaced engine of another flavour/target
        write_manifest(dict(manifest), root)  # after each engine: an interrupted build keeps what is done
        if on_engine:
            on_engine(name, manifest["engines"][name], info)

    from tqdm.auto import tqdm
    todo = [n for n in todo if stale(n)]
    bar = tqdm(total=len(todo), desc="engines", unit="engine", disable=not progress, file=sys.stderr)
    kwargs = {"timing_cache": cache, "workspace": workspace, "opt_level": opt_level, "verbose": verbose}
    jobs = max(1, min(jobs, len(todo))) if flavour == "rtx" else 1
    if jobs == 1:
        for name in todo:
            bar.set_postfix_str(name)
            record(name, build_engine(trt, root / manifest["pieces"][name]["file"], manifest["pieces"][name],
                                      engine_dir / target.filename(name), target, modes[name], **kwargs))
            bar.update(1)
    else:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor, as_completed
        with ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("spawn"), initializer=_worker_init,
                                 initargs=(flavour, target.targets, use_plugin, kwargs)) as pool:
            # the longest builds (blocks: one profile per scale) first
            order = sorted(todo, key=lambda n: -len(manifest["pieces"][n].get("profiles", [])))
            futs = [pool.submit(_worker_build, n, str(root / manifest["pieces"][n]["file"]), manifest["pieces"][n],
                                str(engine_dir / target.filename(n)), modes[n]) for n in order]
            try:
                for fut in as_completed(futs):
                    name, info = fut.result()
                    bar.set_postfix_str(name)
                    record(name, info)
                    bar.update(1)
            except BaseException:
                for f in futs:
                    f.cancel()
                raise
        ordered = {n: manifest["engines"][n] for n in manifest["pieces"] if n in manifest["engines"]}
        manifest["engines"] = ordered
        write_manifest(dict(manifest), root)
    bar.close()
    return manifest


__all__ = ["EngineError", "ManifestError", "PluginError", "Target", "TargetError", "TensorRTUnavailable",
           "add_profiles", "attach_timing_cache", "build_engine", "build_engines", "build_target", "builder_config",
           "engine_filename", "fae_creator", "fae_mode", "gpu_capability", "gpu_name", "import_tensorrt",
           "load_plugins", "parse_model", "plugin_paths", "save_timing_cache"]
