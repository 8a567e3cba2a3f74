"""TensorRT backend: the engines of an export directory, run with ``execute_async_v3`` on torch buffers.

Follows the TensorRT 11 Python API (and NVIDIA demo/Diffusion's runtime layout):

- the FAE plugin library (the file the engine was built with, ``--plugin``, $TOPROVAR_FAE_PLUGIN or
  ``build/native/``) is loaded with ``trt.get_plugin_registry().load_library`` (it exports
  ``getCreators``/``setLoggerFinder``) before any engine is deserialised, and its creator is checked;
- every engine of the manifest is checked (TensorRT version, GPU, sha256, built from the current ONNX
  bytes: ``toprovar.export.manifest.check_engine``) and deserialised with ``trt.Runtime``;
- one execution context per engine, created with ``ExecutionContextAllocationStrategy.USER_MANAGED`` and
  given one device-memory block shared by all contexts (``set_device_memory``; sized by the largest
  ``device_memory_size_v2``): the pieces run one after another on one stream, so they never overlap;
- per call: ``set_optimization_profile_async`` (the block engines hold one profile per scale; a context
  switches only when the scale changes), ``set_input_shape`` and ``set_tensor_address`` for every I/O
  tensor on preallocated torch CUDA buffers (256-byte aligned), ``execute_async_v3(stream)``;
- optional CUDA-graph capture (``cuda_graph=True``) of the calls whose shapes are fixed: unpruned block
  calls, heads and next-input pieces; a graph is keyed by the piece, profile, shapes and addresses, so it
  is replayed only where the very same buffers are bound (the orchestrator's and backend's buffers keep
  their addresses across scales and generations).

Everything runs on ``self.stream`` (a torch CUDA stream); ``EngineRuntime`` makes it the current torch
stream for the generation, so the orchestrator's gathers, scatters and copies are ordered with it.
"""
from __future__ import annotations

import os
from pathlib import Path

import torch

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


def import_tensorrt():
    """The ``tensorrt`` module (or the lean runtime ``tensorrt_lean``), else BackendUnavailable."""
    try:
        import tensorrt as trt
        return trt
    except ImportError:
        pass
    try:
        import tensorrt_lean as trt  # the lean runtime runs version-compatible engines only
        return trt
    except ImportError:
        raise BackendUnavailable("--backend trt: TensorRT is not importable here (pip install tensorrt, or use "
                                 "--backend onnxruntime / torch)") from None


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
def check_engines(manifest, tensorrt_version: str, gpu: str, verify: bool = True) -> dict[str, Path]:
    """{piece: engine file} of every engine in the manifest, each checked by ``check_engine`` (built by this
    TensorRT version, for this GPU, from the current ONNX bytes; file sha256 when ``verify``).

    ManifestError (one line) for the first stale engine, or when the export has no engines."""
    from toprovar.export.manifest import ManifestError, check_engine
    if not manifest.get("engines"):
        raise ManifestError(f"{manifest.path}: no TensorRT engines in this export; build them with "
                            f"toprovar-export --engines")
    return {name: check_engine(manifest, name, str(tensorrt_version), gpu, hash_file=verify)
            for name in manifest["engines"]}


# ------------------------------------------------------------------------------------------------ plugin
def engines_need_plugin(manifest) -> bool:
    """Whether any engine of the manifest holds a plugin layer (FAE in the ``_entropy`` blocks)."""
    for name, eng in manifest.get("engines", {}).items():
        piece = manifest["pieces"].get(name, {})
        if eng.get("plugin_layers") or eng.get("plugins") or piece.get("custom_ops"):
            return True
    return False


def plugin_candidates(manifest, explicit: str | None = None) -> list[Path]:
    """Where the plugin library is looked for, in order: ``--plugin``, $TOPROVAR_FAE_PLUGIN, the files the
    manifest's engines name (relative to the export directory), the export's ``plugins/``, the repository's
    ``build/native/``."""
    if explicit:
        return [Path(explicit)]
    out: list[Path] = []
    if os.environ.get(PLUGIN_ENV):
        out.append(Path(os.environ[PLUGIN_ENV]))
    root = Path(getattr(manifest, "root", "."))
    for eng in manifest.get("engines", {}).values():
        for p in eng.get("plugins", []) or []:
            if p.endswith(".so") or "/" in p:
                q = Path(p)
                out.append(q if q.is_absolute() else root / q)
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


class _Engine:
    """One deserialised engine with its execution context and I/O description."""

    def __init__(self, trt, name: str, engine, context):
        self.name, self.engine, self.context = name, engine, context
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
        self.active_profile: int | None = None
        self.shapes: dict[str, tuple] = {}


class TensorRTBackend(PieceBackend):
    """Backend protocol over TensorRT engines (one execution context each, shared device memory)."""

    name = "trt"
    alignment = 256  # set_tensor_address wants 256-byte aligned addresses

    def __init__(self, manifest, device: torch.device | str = "cuda", plugin: str | None = None,
                 verify: bool = True, cuda_graph: bool = False, log_level: str = "ERROR"):
        super().__init__(manifest, device)
        if self.device.type != "cuda" or not torch.cuda.is_available():
            raise BackendUnavailable(f"--backend trt needs a CUDA device (got {self.device}, CUDA available: "
                                     f"{torch.cuda.is_available()})")
        trt = import_tensorrt()
        self.trt = trt
        gpu = torch.cuda.get_device_name(self.device)
        paths = check_engines(manifest, trt.__version__, gpu, verify)  # stale engines refused before loading
        self.logger = trt.Logger(getattr(trt.Logger, log_level))
        self.stream = torch.cuda.Stream(self.device)
        self.cuda_graph = cuda_graph
        self._graphs: dict[tuple, torch.cuda.CUDAGraph] = {}
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
                    raise EngineError(f"engine {name}: TensorRT could not deserialise {path} (see the TensorRT log "
                                      f"above); rebuild with toprovar-export --engines")
                loaded.append((name, engine))
            size = max(int(e.device_memory_size_v2) for _, e in loaded)
            try:
                self.device_memory = torch.empty(max(size, 256), dtype=torch.uint8, device=self.device)
            except Exception as exc:
                if is_oom(exc):
                    raise oom_error("allocating TensorRT's shared activation memory", exc, self.device, size) from None
                raise
            for name, engine in loaded:
                ctx = engine.create_execution_context(trt.ExecutionContextAllocationStrategy.USER_MANAGED)
                if ctx is None:
                    raise EngineError(f"engine {name}: TensorRT could not create an execution context")
                ctx.set_device_memory(self.device_memory.data_ptr(), self.device_memory.numel())
                self.engines[name] = _Engine(trt, name, engine, ctx)
        self._check_io()

    def _check_io(self) -> None:
        """Every engine's I/O names and dtypes are those of its ONNX piece in the manifest."""
        for name, e in self.engines.items():
            spec = self.require(name)
            want = {t["name"]: TORCH_DTYPES[t["dtype"]] for t in spec["inputs"] + spec["outputs"]}
            got = e.dtypes
            if set(want) != set(got) or any(want[k] != got[k] for k in want):
                raise EngineError(f"engine {name}: I/O tensors {sorted((k, str(v)) for k, v in got.items())} differ "
                                  f"from its ONNX piece; rebuild with toprovar-export --engines")

    # ------------------------------------------------------------------ execution
    def _static_call(self, name: str, inputs: dict[str, torch.Tensor]) -> bool:
        """Calls whose shapes repeat every generation: unpruned blocks, heads, next-input pieces."""
        if name.startswith(("head_s", "next_input_s")):
            return True
        if name.startswith("block_"):
            h, w = self.schedule[self.si]
            return inputs["x"].shape[1] == h * w
        return False

    def _execute(self, name, inputs, outputs):
        e = self.engines.get(name)
        if e is None:
            raise PieceError(f"piece {name}: no TensorRT engine in this export; rebuild with toprovar-export --engines")
        ctx, sh = e.context, self.stream.cuda_stream
        cur = torch.cuda.current_stream(self.device)
        other = cur.cuda_stream != sh
        if other:
            self.stream.wait_stream(cur)
        shapes = {k: tuple(t.shape) for k, t in inputs.items()}
        if len(e.profiles) > 1:
            prof = select_profile(e.profiles, shapes, self.si if name.startswith("block_") else None, name)
            if prof != e.active_profile:
                ctx.set_optimization_profile_async(prof, sh)
                e.active_profile, e.shapes = prof, {}
        else:
            prof = 0
        for k, t in inputs.items():
            if k in e.dynamic and e.shapes.get(k) != shapes[k]:
                if not ctx.set_input_shape(k, shapes[k]):
                    raise PieceError(f"piece {name}: TensorRT rejects input {k} of shape {list(shapes[k])} "
                                     f"(profile {prof}: {e.profiles[prof].get(k) if e.profiles else None})")
                e.shapes[k] = shapes[k]
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
        key = None
        if self.cuda_graph and self._static_call(name, inputs):
            key = (name, prof, tuple(shapes.items()), tuple(t.data_ptr() for t in inputs.values()),
                   tuple(t.data_ptr() for t in out.values()))
        graph = self._graphs.get(key) if key is not None else None
        if graph is not None:
            with torch.cuda.stream(self.stream):
                graph.replay()
        else:
            if not ctx.execute_async_v3(sh):
                raise EngineError(f"piece {name}: TensorRT execute_async_v3 failed (see the TensorRT log above)")
            if key is not None:  # captured after one normal run (lazy initialisation happens outside capture)
                g = torch.cuda.CUDAGraph()
                with torch.cuda.graph(g, stream=self.stream):
                    ctx.execute_async_v3(self.stream.cuda_stream)
                self._graphs[key] = g
        if other:
            cur.wait_stream(self.stream)
        return out

    def synchronize(self):
        self.stream.synchronize()


__all__ = ["PLUGIN_CREATOR", "PLUGIN_LIBRARY", "EngineError", "PluginError", "TensorRTBackend", "check_engines",
           "engines_need_plugin", "find_plugin_library", "import_tensorrt", "load_plugin_library",
           "plugin_candidates", "select_profile"]
