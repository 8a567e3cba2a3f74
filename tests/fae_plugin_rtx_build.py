"""Build ONNX models that hold FlashAttentionEntropy nodes with the real TensorRT-RTX builder and the FAE plugin.

Run by tests/test_fae_plugin_trt.py in a child process (an abort inside TensorRT must not take pytest down, and
the dynamic loader's search path is read at process start):

    python tests/fae_plugin_rtx_build.py PLUGIN.so JOBS.json RESULT.json

JOBS.json: ``[{"name", "onnx", "profiles": [{input: {"min", "opt", "max"}}] (manifest form), "sm": "SM89"}]``.
RESULT.json, per job: ``ok``, ``errors`` (the logger's errors, then the parser's), ``fae_nodes``, ``network_plugins`` (name, plugin
name, namespace of every PLUGIN_V3 layer after parsing), ``engine_layers`` (name, LayerType of every engine layer
as the builder reports them with ProfilingVerbosity.DETAILED: IEngineInspector's ONELINE format), ``profiles``,
``plan_bytes``, ``plan_has_plugin`` (the creator name and namespace are serialised in the plan), ``build_s``.
The FAE local function is stripped (``strip_local_function``) so that the parser maps each node to the plugin.
"""
from __future__ import annotations

import json
import re
import sys
import time

import onnx
import tensorrt_rtx_bindings as trt

from toprovar.export import fae_onnx

_LAYER = re.compile(r"^Name: (.*?), LayerType: ([A-Za-z0-9_]+),", re.M)


class _Log(trt.ILogger):
    """Keeps every message; the builder's per-layer report comes at VERBOSE after the build."""

    def __init__(self):
        trt.ILogger.__init__(self)
        self.messages: list[tuple[trt.ILogger.Severity, str]] = []

    def log(self, severity, msg):
        self.messages.append((severity, msg))

    def errors(self) -> list[str]:
        return [m for s, m in self.messages if s in (trt.ILogger.ERROR, trt.ILogger.INTERNAL_ERROR)]


def _network_plugins(network) -> list[dict]:
    out = []
    for i in range(network.num_layers):
        layer = network.get_layer(i)
        if layer.type != trt.LayerType.PLUGIN_V3:
            continue
        layer.__class__ = trt.IPluginV3Layer
        core = layer.plugin.get_capability_interface(trt.PluginCapabilityType.CORE)
        out.append({"name": layer.name, "plugin": core.plugin_name, "namespace": core.plugin_namespace})
    return out


def build(job: dict) -> dict:
    log = _Log()
    model = onnx.load(job["onnx"])
    res: dict = {"name": job["name"], "fae_nodes": len(fae_onnx.fae_nodes(model)), "ok": False, "errors": []}
    builder = trt.Builder(log)
    network = builder.create_network(0)
    parser = trt.OnnxParser(network, log)
    if not parser.parse(fae_onnx.strip_local_function(model).SerializeToString()):
        res["errors"] = log.errors() + [str(parser.get_error(i)) for i in range(parser.num_errors)]
        return res
    res["network_plugins"] = _network_plugins(network)
    config = builder.create_builder_config()
    config.num_compute_capabilities = 1
    config.set_compute_capability(getattr(trt.ComputeCapability, job.get("sm", "SM89")), 0)
    config.profiling_verbosity = trt.ProfilingVerbosity.DETAILED
    for prof in job["profiles"]:
        p = builder.create_optimization_profile()
        for name, s in prof.items():
            p.set_shape(name, s["min"], s["opt"], s["max"])
        config.add_optimization_profile(p)
    res["profiles"] = len(job["profiles"])
    t0 = time.perf_counter()
    plan = builder.build_serialized_network(network, config)
    res["build_s"] = round(time.perf_counter() - t0, 2)
    if plan is None:
        res["errors"] = log.errors() or ["build_serialized_network returned None"]
        return res
    data = bytes(memoryview(plan))
    res["plan_bytes"] = len(data)
    res["plan_has_plugin"] = fae_onnx.OP_TYPE.encode() in data and fae_onnx.PLUGIN_NAMESPACE.encode() in data
    report = next((m for _, m in log.messages if m.startswith("Layers:")), "")
    res["engine_layers"] = [{"name": n, "type": t} for n, t in _LAYER.findall(report)]
    res["ok"] = True
    return res


def main(argv: list[str]) -> int:
    plugin, jobs_path, out_path = argv
    if not trt.get_plugin_registry().load_library(plugin):
        raise SystemExit(f"{plugin}: TensorRT-RTX's plugin registry refused the library")
    with open(jobs_path) as f:
        jobs = json.load(f)
    results = []
    for job in jobs:
        results.append(build(job))
        with open(out_path, "w") as f:  # after each job: what was done survives a later abort
            json.dump(results, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
