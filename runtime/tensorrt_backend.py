"""TensorRT backend: the engines of an export directory, run with ``execute_async_v3`` on torch buffers.

One code path for both flavours of the manifest's engines (``toprovar.export.trt_flavour``): TensorRT 11
(``tensorrt``) and TensorRT-RTX (``tensorrt_rtx``); only the module and the compatibility checks differ.
Follows the TensorRT Python API (and NVIDIA demo/Diffusion's runtime layout):

- before anything is imported or deserialised, every engine is checked against this GPU
  (``check_engine_target``): a TensorRT engine must have been built on a GPU of this name, a TensorRT-RTX
  engine for this GPU's compute capability (``torch.cuda.get_device_capability``; an H100/H200, compute
  9.0, runs none: one line says so, even where TensorRT-RTX is not installed);
- then the flavour's module is imported (any import failure: one line), every engine is checked (version,
  sha256, built from the current ONNX bytes: ``check_engine``), the FAE plugin library is loaded when an
  engine holds the plugin (``--plugin``, $TOPROVAR_FAE_PLUGIN, the file the engine was built with, the
  export's ``plugins/``, ``build/native/``) with ``get_plugin_registry().load_library``, and the engines
  are deserialised with ``trt.Runtime``; each one's I/O and per-profile shapes must be the manifest's;
- one execution context per engine, created with ``ExecutionContextAllocationStrategy.USER_MANAGED`` and
  given one device-memory block shared by all contexts (``set_device_memory``; sized by the largest
  ``device_memory_size_v2``): the pieces run one after another on one stream, so they never overlap;
- per call: ``set_optimization_profile_async`` (the block engines hold one profile per scale),
  ``set_input_shape`` and ``set_tensor_address`` for every I/O tensor on preallocated torch CUDA buffers
  (256-byte aligned), ``execute_async_v3(stream)``;
- optional CUDA graphs (``cuda_graph=True``) of the calls whose shapes are fixed (unpruned block calls,
  heads, next-input pieces), demo/Diffusion style: each graph key (piece, profile, shapes, addresses) has
  its own execution context, whose shapes and addresses are set once and never change afterwards, so a
  replay never runs on a context whose state moved on.

Everything runs on ``self.stream`` (a torch CUDA stream); ``EngineRuntime`` makes it the current torch
stream for the generation, so the orchestrator's gathers, scatters and copies are ordered with it.
"""
from __future__ import annotations

import os
from pathlib import Path

import torch

from toprovar.export.manifest import confined

from .buffers import TORCH_DTYPES, is_oom, oom_error
from .onnxruntime_backend import BackendUnavailable
from .piece_backend import PieceBackend, PieceError

PLUGIN_LIBRARY = "libtoprovar_fae_trt.so"
PLUGIN_CREATOR = ("FlashAttentionEntropy", "1", "toprovar")  # name, version, namespace
PLUGIN_ENV = "TOPROVAR_FAE_PLUGIN"  # the same variable as toprovar-export --engines
_REPO = Path(__file__).resolve().parents[2]


class PluginError(RuntimeError):
    """The FAE TensorRT plugin library is missing or does not register its creator (one line)."""


class EngineError(RuntimeError):
    """An engine that cannot be deserialised or run (one line)."""


def import_tensorrt(flavour: str = "tensorrt"):
    """The runtime module of ``flavour`` (``tensorrt`` or ``tensorrt_rtx``), else BackendUnavailable (one line,
    whatever the import raised: a missing wheel, a stub, a shared library that does not load)."""
    from toprovar.export.trt_flavour import TensorRTUnavailable, import_flavour
    try:
        return import_flavour(flavour)
    except TensorRTUnavailable as exc:
        raise BackendUnavailable(f"--backend trt: {exc}, or use --backend onnxruntime / torch") from None


def torch_dtype(trt, dt) -> torch.dtype:
    table = {trt.DataType.FLOAT: torch.float32, trt.DataType.HALF: torch.float16, trt.DataType.INT32: torch.int32,
             trt.DataType.INT8: torch.int8, trt.DataType.BOOL: torch.bool}
    for name, tdt in (("BF16", torch.bfloat16), ("INT64", torch.int64), ("UINT8", torch.uint8)):
        if hasattr(trt.DataType, name):
            table[getattr(trt.DataType, name)] = tdt
    if dt not in table:
        raise EngineError(f"TensorRT tensor type {dt} has no torch equivalent here")
    return table[dt]


# ------------------------------------------------------------------------------------------------ engines
def check_engines(manifest, tensorrt_version: str, gpu: str | None = None, verify: bool = True,
                  flavour: str = "tensorrt", capability: tuple[int, int] | None = None) -> dict[str, Path]:
    """{piece: engine file} of every engine in the manifest, each checked by ``check_engine`` (this flavour,
    built by this version, for this GPU or compute capability, from the current ONNX bytes; file sha256
    when ``verify``). ManifestError (one line) for the first unusable engine, or when there are none."""
    from toprovar.export.manifest import check_engine, engine_flavour
    engine_flavour(manifest)  # none, or both flavours: one line
    return {name: check_engine(manifest, name, str(tensorrt_version), gpu, hash_file=verify, flavour=flavour,
                               capability=capability)
            for name in manifest["engines"]}


def check_engines_run_here(manifest, gpu: str, capability: tuple[int, int], flavour: str | None = None) -> str:
    """The flavour of the manifest's engines if every engine can run on this GPU, else ManifestError (one line):
    another flavour than ``flavour`` (when given), a TensorRT engine of another GPU, a TensorRT-RTX engine
    without this compute capability among its targets. Imports no TensorRT module."""
    from toprovar.export.manifest import check_engine_target, engine_flavour
    kind = engine_flavour(manifest)
    for name in manifest["engines"]:
        check_engine_target(manifest, name, flavour or kind, gpu, capability)
    return kind


# ------------------------------------------------------------------------------------------------ plugin
def engines_need_plugin(manifest) -> bool:
    """Whether any engine of the manifest holds the FAE plugin (``fae: plugin``; built from the function body
    an ``_entropy`` engine needs no library)."""
    return any(eng.get("fae") == "plugin" or eng.get("plugin_layers") for eng in manifest.get("engines", {}).values())


def plugin_candidates(manifest, explicit: str | None = None) -> list[Path]:
    """Where the plugin library is looked for, in order: ``--plugin``, $TOPROVAR_FAE_PLUGIN, the files the
    manifest's engines name inside the export directory (absolute paths recorded at build time are not
    followed: pass --plugin), the export's ``plugins/``, the repository's ``build/native/``."""
    if explicit:
        return [Path(explicit)]
    out: list[Path] = []
    if os.environ.get(PLUGIN_ENV):
        out.append(Path(os.environ[PLUGIN_ENV]))
    root = Path(getattr(manifest, "root", "."))
    for eng in manifest.get("engines", {}).values():  # a manifest names libraries inside its directory only:
        for p in eng.get("plugins", []) or []:          # it never makes the runtime load code from elsewhere
            if p.endswith(".so") and not Path(p).is_absolute():
                out.append(confined(root, p, "plugin"))
    out += [root / "plugins" / PLUGIN_LIBRARY, _REPO / "build" / "native" / PLUGIN_LIBRARY]
    seen, uniq = set(), []
    for p in out:
        if str(p) not in seen:
            seen.add(str(p))
            uniq.append(p)
    return uniq


def find_plugin_library(manifest, explicit: str | None = None) -> Path:
    """The first existing plugin library of ``plugin_candidates``, else PluginError (one line)."""
    cands = plugin_candidates(manifest, explicit)
    for p in cands:
        if p.is_file():
            return p
    looked = ", ".join(str(p) for p in cands)
    if explicit:
        raise PluginError(f"--plugin: TensorRT plugin library {explicit} not found")
    raise PluginError(f"TensorRT plugin library {PLUGIN_LIBRARY} not found (looked in: {looked}); the engines hold "
                      f"the FlashAttentionEntropy plugin: build it (cmake -S cmake -B build/native "
                      f"-DTENSORRT_ROOT=... && cmake --build build/native) or pass --plugin PATH")


def load_plugin_library(trt, path: Path) -> None:
    """Load the library into TensorRT's plugin registry and check its creator: the export package's
    ``load_plugins`` (``IPluginRegistry.load_library``, once per process, shared with the engine builder
    so one library is never loaded twice or both ways)."""
    from toprovar.export.engine import PluginError as ExportPluginError, load_plugins
    try:
        load_plugins(trt, [Path(path).resolve()])
    except ExportPluginError as exc:
        raise PluginError(str(exc)) from None


# ------------------------------------------------------------------------------------------------ profiles
def select_profile(table: list[dict[str, tuple[tuple, tuple]]], shapes: dict[str, tuple], preferred: int | None,
                   piece: str) -> int:
    """The optimization profile whose [min, max] holds every input shape, ``preferred`` first.

    table: per profile, {input name: (min shape, max shape)}; PieceError (one line) when none fits.
    """
    def fits(p: int) -> bool:
        for name, shape in shapes.items():
            if name not in table[p]:
                continue
            lo, hi = table[p][name]
            if not lo:  # no range reported (static input)
                continue
            if len(lo) != len(shape) or any(not (a <= s <= b) for a, s, b in zip(lo, shape, hi)):
                return False
        return True

    order = ([preferred] if preferred is not None and 0 <= preferred < len(table) else []) + \
        [p for p in range(len(table)) if p != preferred]
    for p in order:
        if fits(p):
            return p
    want = {k: list(v) for k, v in shapes.items()}
    prof = preferred if preferred is not None and 0 <= preferred < len(table) else 0
    rng = {k: [list(a), list(b)] for k, (a, b) in table[prof].items()} if table else {}
    raise PieceError(f"piece {piece}: input shapes {want} are outside every optimization profile of its engine "
                     f"(profile {prof}: {rng}); rebuild the engines for this batch/text length "
                     f"(toprovar-export --engines --max-batch-size ...)")


def _dims(d) -> tuple[int, ...]:
    """A trt.Dims as a tuple (empty for the invalid Dims{-1})."""
    try:
        return tuple(int(x) for x in d)
    except (TypeError, ValueError):
        return ()


class _Context:
    """An execution context with the profile and input shapes it was last given."""

    def __init__(self, context):
        self.context, self.profile, self.shapes = context, None, {}


class _Engine:
    """One deserialised engine: its main execution context, the contexts of its CUDA graphs, I/O description."""

    def __init__(self, trt, name: str, engine, new_context):
        self.name, self.engine, self.new_context = name, engine, new_context
        self.main = _Context(new_context())
        self.graphs: dict[tuple, tuple[_Context, torch.cuda.CUDAGraph]] = {}
        self.inputs, self.outputs, self.dtypes = [], [], {}
        for i in range(engine.num_io_tensors):
            t = engine.get_tensor_name(i)
            (self.inputs if engine.get_tensor_mode(t) == trt.TensorIOMode.INPUT else self.outputs).append(t)
            self.dtypes[t] = torch_dtype(trt, engine.get_tensor_dtype(t))
        # inputs with a -1 in the engine's shape take set_input_shape and have profile ranges
        self.dynamic = [t for t in self.inputs if any(d < 0 for d in _dims(engine.get_tensor_shape(t)))]
        self.profiles: list[dict[str, tuple[tuple, tuple]]] = []
        for p in range(engine.num_optimization_profiles):
            prof = {}
            for t in self.dynamic:
                mn, _, mx = engine.get_tensor_profile_shape(t, p)
                prof[t] = (_dims(mn), _dims(mx))
            self.profiles.append(prof)


class TensorRTBackend(PieceBackend):
    """Backend protocol over TensorRT or TensorRT-RTX engines (shared device memory, one stream)."""

    name = "trt"
    alignment = 256  # set_tensor_address wants 256-byte aligned addresses

    def __init__(self, manifest, device: torch.device | str = "cuda", plugin: str | None = None,
                 verify: bool = True, cuda_graph: bool = False, log_level: str = "ERROR", flavour: str | None = None):
        super().__init__(manifest, device)
        if self.device.type != "cuda" or not torch.cuda.is_available():
            raise BackendUnavailable(f"--backend trt needs a CUDA device (got {self.device}, CUDA available: "
                                     f"{torch.cuda.is_available()})")
        gpu = torch.cuda.get_device_name(self.device)
        capability = tuple(torch.cuda.get_device_capability(self.device))
        # flavour, GPU and compute capability first: no import, no deserialisation of an engine that cannot run
        self.flavour = check_engines_run_here(manifest, gpu, capability, flavour)
        trt = import_tensorrt(self.flavour)
        self.trt = trt
        paths = check_engines(manifest, trt.__version__, gpu, verify, self.flavour, capability)
        self.logger = trt.Logger(getattr(trt.Logger, log_level))
        self.stream = torch.cuda.Stream(self.device)
        self.cuda_graph = cuda_graph
        self.plugin_path = None
        if engines_need_plugin(manifest):  # before any deserialisation
            self.plugin_path = find_plugin_library(manifest, plugin)
            load_plugin_library(trt, self.plugin_path)
        self.runtime = trt.Runtime(self.logger)
        self.engines: dict[str, _Engine] = {}
        loaded = []
        with torch.cuda.device(self.device):
            for name, path in paths.items():
                engine = self.runtime.deserialize_cuda_engine(path.read_bytes())
                if engine is None:
                    raise EngineError(f"engine {name}: {self.flavour_label} could not deserialise {path} (see its "
                                      f"log above); rebuild with toprovar-export --engines")
                loaded.append((name, engine))
            size = max(int(e.device_memory_size_v2) for _, e in loaded)
            try:
                self.device_memory = torch.empty(max(size, 256), dtype=torch.uint8, device=self.device)
            except Exception as exc:
                if is_oom(exc):
                    raise oom_error("allocating TensorRT's shared activation memory", exc, self.device, size) from None
                raise
            for name, engine in loaded:
                self.engines[name] = _Engine(trt, name, engine, lambda engine=engine, name=name: self._context(engine,
                                                                                                              name))
        self._check_io()

    @property
    def flavour_label(self) -> str:
        from toprovar.export.trt_flavour import LABELS
        return LABELS[self.flavour]

    def _context(self, engine, name: str):
        """A new execution context on the shared device memory."""
        ctx = engine.create_execution_context(self.trt.ExecutionContextAllocationStrategy.USER_MANAGED)
        if ctx is None:
            raise EngineError(f"engine {name}: {self.flavour_label} could not create an execution context")
        ctx.set_device_memory(self.device_memory.data_ptr(), self.device_memory.numel())
        return ctx

    def _check_io(self) -> None:
        """Every engine's I/O names, dtypes and per-profile shapes are those of its ONNX piece in the manifest."""
        from toprovar.export.engine_check import EngineCheckError, check_report, report_from_engine
        for name, e in self.engines.items():
            try:
                check_report(report_from_engine(self.trt, e.engine), self.require(name), f"engine {name}")
            except EngineCheckError as exc:
                raise EngineError(f"{exc}; rebuild with toprovar-export --engines") from None

    # ------------------------------------------------------------------ execution
    def _static_call(self, name: str, inputs: dict[str, torch.Tensor]) -> bool:
        """Calls whose shapes repeat every generation: unpruned blocks, heads, next-input pieces."""
        if name.startswith(("head_s", "next_input_s")):
            return True
        if name.startswith("block_"):
            h, w = self.schedule[self.si]
            return inputs["x"].shape[1] == h * w
        return False

    def _bind(self, e: _Engine, c: _Context, prof: int, shapes: dict, inputs: dict, outputs: dict) -> dict:
        """Profile, input shapes and every tensor address on context ``c``; returns the output tensors."""
        ctx, name = c.context, e.name
        if len(e.profiles) > 1 and prof != c.profile:
            ctx.set_optimization_profile_async(prof, self.stream.cuda_stream)
            c.profile, c.shapes = prof, {}
        for k, t in inputs.items():
            if k in e.dynamic and c.shapes.get(k) != shapes[k]:
                if not ctx.set_input_shape(k, shapes[k]):
                    raise PieceError(f"piece {name}: TensorRT rejects input {k} of shape {list(shapes[k])} "
                                     f"(profile {prof}: {e.profiles[prof].get(k) if e.profiles else None})")
                c.shapes[k] = shapes[k]
            ctx.set_tensor_address(k, t.data_ptr())
        out = {}
        for k, t in outputs.items():
            shape = _dims(ctx.get_tensor_shape(k))
            if any(d < 0 for d in shape):
                raise EngineError(f"piece {name}: output {k} has an undetermined shape {list(shape)}")
            if t is None or tuple(t.shape) != shape:
                t = self.ws.view(f"out:trt:{name.split('_')[0]}:{k}", shape, e.dtypes[k])
            ctx.set_tensor_address(k, t.data_ptr())
            out[k] = t
        return out

    def _run(self, e: _Engine, c: _Context) -> None:
        if not c.context.execute_async_v3(self.stream.cuda_stream):
            raise EngineError(f"piece {e.name}: execute_async_v3 failed (see the {self.flavour_label} log above)")

    def _execute(self, name, inputs, outputs):
        e = self.engines.get(name)
        if e is None:
            raise PieceError(f"piece {name}: no TensorRT engine in this export; rebuild with toprovar-export --engines")
        cur = torch.cuda.current_stream(self.device)
        other = cur.cuda_stream != self.stream.cuda_stream
        if other:
            self.stream.wait_stream(cur)
        shapes = {k: tuple(t.shape) for k, t in inputs.items()}
        prof = (select_profile(e.profiles, shapes, self.si if name.startswith("block_") else None, name)
                if len(e.profiles) > 1 else 0)
        out = self._bind(e, e.main, prof, shapes, inputs, outputs)
        key = None
        if self.cuda_graph and self._static_call(name, inputs):
            key = (prof, tuple(shapes.items()), tuple(t.data_ptr() for t in inputs.values()),
                   tuple(t.data_ptr() for t in out.values()))
        if key is None:
            self._run(e, e.main)
        elif key in e.graphs:
            with torch.cuda.stream(self.stream):
                e.graphs[key][1].replay()
        else:  # a context of its own for this key: bound once, run once (lazy initialisation), then captured
            c = _Context(e.new_context())
            self._bind(e, c, prof, shapes, inputs, out)
            self._run(e, c)
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g, stream=self.stream):
                self._run(e, c)
            e.graphs[key] = (c, g)
        if other:
            cur.wait_stream(self.stream)
        return out

    def synchronize(self):
        self.stream.synchronize()


__all__ = ["PLUGIN_CREATOR", "PLUGIN_LIBRARY", "EngineError", "PluginError", "TensorRTBackend", "check_engines",
           "check_engines_run_here", "engines_need_plugin", "find_plugin_library", "import_tensorrt",
           "load_plugin_library", "plugin_candidates", "select_profile"]
