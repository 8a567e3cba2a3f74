"""What a built engine holds, checked against the manifest: I/O tensors, per-profile shapes, layers, FAE layers.

One ``EngineReport`` (layers [(name, type)], I/O {name: Tensor}) from either source:

- ``report_from_engine``: a deserialised engine (engine inspector JSON, ``get_tensor_dtype``,
  ``get_tensor_profile_shape``): where the engine runs (TensorRT on its GPU; TensorRT-RTX on an RTX GPU
  of one of its targets);
- ``BuildLog.report``: the report the builder itself logs at the end of a build with DETAILED profiling
  verbosity (a VERBOSE "Layers:" message: one "Name: ..., LayerType: ..." line per layer, then "I/O
  Tensors:" with data types, dimensions and each profile's Min/Opt/MaxShape): the same facts about the
  built engine, on any machine, also without a GPU (TensorRT-RTX builds ahead of time there but cannot
  deserialise).

FAE layers are counted by name: a plugin layer (``PLUGIN_V3`` in the network; ``PluginV3`` in TensorRT's
inspector, ``custom_layer`` in TensorRT-RTX's report, one per optimization profile) named after a
FlashAttentionEntropy node. Other plugin layers (e.g. a standard plugin that ``init_libnvinfer_plugins``
registered) do not count.
"""
from __future__ import annotations

import dataclasses
import json
import re
import sys

_LAYER = re.compile(r"^Name: (.*?), LayerType: ([^,]*)", re.M)
_IO = re.compile(r"^ Name: (.*?), IOMode: (\w+), DataType: (\w+), Dimensions: \[([^\]]*)\](.*)$", re.M)
_PROFILE = re.compile(r"MinShape: \[([^\]]*)\], OptShape: \[([^\]]*)\], MaxShape: \[([^\]]*)\]")
# data type names: trt.DataType members and the builder report's spelling
_DTYPES = {"FLOAT": "float32", "HALF": "float16", "BF16": "bfloat16", "INT32": "int32", "INT64": "int64",
           "INT8": "int8", "UINT8": "uint8", "BOOL": "bool", "Float": "float32", "Half": "float16",
           "BFloat16": "bfloat16", "Int32": "int32", "Int64": "int64", "Int8": "int8", "UInt8": "uint8",
           "Bool": "bool"}


class EngineCheckError(RuntimeError):
    """A network or engine that differs from its manifest entry (message: one line)."""


@dataclasses.dataclass
class Tensor:
    mode: str  # "input" | "output"
    dtype: str  # manifest spelling: float32, bfloat16, ...
    dims: list[int]  # -1 for dynamic
    profiles: list[list[list[int]]]  # inputs: per profile [min, opt, max]


@dataclasses.dataclass
class EngineReport:
    layers: list[tuple[str, str]]
    io: dict[str, Tensor]
    source: str  # "builder log" | "engine inspector"

    def layer_types(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for _, kind in self.layers:
            out[kind] = out.get(kind, 0) + 1
        return out


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def parse_layer_report(msg: str) -> EngineReport:
    """The builder's "Layers:" message -> EngineReport."""
    layers = [(m.group(1), m.group(2).strip()) for m in _LAYER.finditer(msg)]
    io = {}
    for m in _IO.finditer(msg):
        profiles = [[_ints(a), _ints(b), _ints(c)] for a, b, c in _PROFILE.findall(m.group(5))]
        io[m.group(1)] = Tensor(m.group(2).lower(), _DTYPES.get(m.group(3), m.group(3)), _ints(m.group(4)), profiles)
    return EngineReport(layers, io, "builder log")


def make_build_log(trt, verbose: bool = False):
    """An ``ILogger`` of module ``trt`` that keeps the builder's engine report (``.report``, an EngineReport or
    None) and the error lines (``.errors``), and prints errors (everything with ``verbose``) as
    ``[TRT] ...`` lines on stderr."""
    sev = trt.ILogger.Severity

    class BuildLog(trt.ILogger):
        def __init__(self):
            trt.ILogger.__init__(self)
            self.min_severity = sev.VERBOSE  # the engine report is a VERBOSE message
            self.report: EngineReport | None = None
            self.errors: list[str] = []
            self._shown = int(sev.VERBOSE if verbose else sev.ERROR)

        def log(self, severity, msg):
            if msg.startswith("Layers:"):
                self.report = parse_layer_report(msg)
            if int(severity) <= int(sev.ERROR) and msg.strip():
                self.errors.append(msg.strip().splitlines()[0])
            if int(severity) <= self._shown:
                print(f"[TRT] {msg}", file=sys.stderr)

    return BuildLog()


def dtype_name(trt, dt) -> str:
    for key in ("FLOAT", "HALF", "BF16", "INT32", "INT64", "INT8", "UINT8", "BOOL"):
        if hasattr(trt.DataType, key) and dt == getattr(trt.DataType, key):
            return _DTYPES[key]
    return str(dt)


def report_from_engine(trt, engine) -> EngineReport:
    """EngineReport of a deserialised engine (inspector layers; I/O dtypes, dims and profile shapes)."""
    info = json.loads(engine.create_engine_inspector().get_engine_information(trt.LayerInformationFormat.JSON))
    layers = [(str(la.get("Name", "")), str(la.get("LayerType", "")))
              for la in (info.get("Layers", []) if isinstance(info, dict) else []) if isinstance(la, dict)]
    io = {}
    for i in range(engine.num_io_tensors):
        t = engine.get_tensor_name(i)
        inp = engine.get_tensor_mode(t) == trt.TensorIOMode.INPUT
        profiles = ([[list(map(int, s)) for s in engine.get_tensor_profile_shape(t, p)]
                     for p in range(engine.num_optimization_profiles)] if inp else [])
        io[t] = Tensor("input" if inp else "output", dtype_name(trt, engine.get_tensor_dtype(t)),
                       [int(d) for d in engine.get_tensor_shape(t)], profiles)
    return EngineReport(layers, io, "engine inspector")


PLUGIN_LAYER_TYPES = ("plugin", "custom_layer")  # substrings of a plugin layer's type in the layer reports


def fae_layer_names(layers: list[tuple[str, str]], fae_nodes: list[str]) -> set[str]:
    """The FAE node names that some plugin layer of ``layers`` is named after."""
    plugins = [name for name, kind in layers if any(k in kind.lower() for k in PLUGIN_LAYER_TYPES)]
    return {n for n in fae_nodes if any(n in name for name in plugins)}


def network_fae_plugin_layers(trt, network, fae_nodes: list[str]) -> int:
    """IPluginV3 layers of a parsed network that are FAE nodes (named after one); other plugins do not count."""
    names = set(fae_nodes)
    return sum(1 for i in range(network.num_layers)
               if network.get_layer(i).type == trt.LayerType.PLUGIN_V3 and network.get_layer(i).name in names)


def check_network_io(trt, network, entry: dict, what: str) -> dict[str, str]:
    """The parsed network's I/O names and dtypes are the manifest's; returns {name: dtype}."""
    got = {}
    for t in [network.get_input(i) for i in range(network.num_inputs)] + \
             [network.get_output(i) for i in range(network.num_outputs)]:
        got[t.name] = dtype_name(trt, t.dtype)
    want = {t["name"]: t["dtype"] for t in entry["inputs"] + entry["outputs"]}
    if got != want:
        diff = sorted(set(got.items()) ^ set(want.items()))
        raise EngineCheckError(f"{what}: the parsed network's I/O tensors differ from the manifest ({diff[:4]})")
    return got


def check_report(report: EngineReport, entry: dict, what: str) -> None:
    """The engine's I/O names, modes and dtypes are the manifest's; each optimization profile's min/opt/max of
    each dynamic input is the manifest's; static inputs have their fixed shape. EngineCheckError (one line)."""
    want = {t["name"]: ("input", t["dtype"]) for t in entry["inputs"]}
    want.update({t["name"]: ("output", t["dtype"]) for t in entry["outputs"]})
    got = {k: (t.mode, t.dtype) for k, t in report.io.items()}
    if got != want:
        diff = sorted(set(got.items()) ^ set(want.items()))
        raise EngineCheckError(f"{what}: the engine's I/O tensors differ from the manifest ({diff[:4]}; "
                               f"{report.source})")
    if not report.layers:
        raise EngineCheckError(f"{what}: no layers in the {report.source} (profiling verbosity DETAILED expected)")
    profiles = entry.get("profiles") or []
    for t in entry["inputs"]:
        got_t = report.io[t["name"]]
        if len(got_t.profiles) != max(1, len(profiles)):
            raise EngineCheckError(f"{what}: input {t['name']} has {len(got_t.profiles)} optimization profile(s), "
                                   f"the manifest {len(profiles)} ({report.source})")
        static = all(isinstance(d, int) for d in t["shape"])
        for p, shapes in enumerate(got_t.profiles):
            rng = profiles[p].get(t["name"]) if profiles else None
            ref = [t["shape"]] * 3 if static or rng is None else [rng["min"], rng["opt"], rng["max"]]
            if shapes != ref:
                raise EngineCheckError(f"{what}: profile {p} input {t['name']}: engine min/opt/max {shapes}, manifest "
                                       f"{ref} ({report.source})")


__all__ = ["PLUGIN_LAYER_TYPES", "EngineCheckError", "EngineReport", "Tensor", "check_network_io", "check_report", "dtype_name",
           "fae_layer_names", "make_build_log", "network_fae_plugin_layers", "parse_layer_report",
           "report_from_engine"]
