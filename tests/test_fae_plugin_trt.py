"""The FAE TensorRT plugin inside a real builder: TensorRT-RTX (``tensorrt_rtx_bindings``) on the CPU.

TensorRT-RTX builds engines ahead of time without a GPU, so here the ONNX parser maps every FlashAttentionEntropy
node to ``libtoprovar_fae_trt.so``'s IPluginV3 creator and the builder compiles the network around it (target
SM89); nothing executes (no GPU; TensorRT-RTX does not run on compute 9.0 either). Checked:

- one-node models (bf16/fp16, head_mean 0/1, head dims 64/128, symbolic token counts) build with exactly one
  PLUGIN_V3 layer (creator FlashAttentionEntropy, namespace toprovar) and one engine ``custom_layer`` per profile;
- a float32 node is refused with the plugin's one-line reason (in the builder's log for a plugin built with
  TensorRT 11 headers, on stderr for one built with 10.x headers: ILogger ABI, plugins/README.md);
- every ``block_*_entropy`` piece of the tiny model, exported in bfloat16 and float16, builds with the manifest's
  per-scale profiles and holds one plugin layer per FAE node in the network and one custom layer per FAE node and
  profile in the engine's layer report (ProfilingVerbosity.DETAILED, IEngineInspector's ONELINE format: the
  inspector itself needs a deserialised engine, i.e. a GPU TensorRT-RTX runs on);
- the TensorRT-RTX 1.7 defect behind the old abort (plugins/README.md): its ONNX parser ``dlopen``s the unversioned
  ``libtensorrt_rtx.so`` when it imports a plugin node; the wheel ships only ``libtensorrt_rtx.so.1``, the
  ``runtime_error`` escapes a noexcept frame and the process ends in ``std::terminate``. The builds here run with
  a folder holding that name first on ``LD_LIBRARY_PATH``.

The plugin: ``$TOPROVAR_FAE_PLUGIN`` if set (``.ci/run`` builds it), else built with cmake/nvcc from the TensorRT
headers at ``$TENSORRT_ROOT`` (sm_80 only: nothing runs here). Skips with the reason when a part is missing.
"""
from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import os
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

onnx = pytest.importorskip("onnx")
if importlib.util.find_spec("tensorrt_rtx_bindings") is None:
    pytest.skip("TensorRT-RTX is not installed (pip install tensorrt-rtx-cu13-libs==1.7.1.116 "
                "tensorrt-rtx-cu13-bindings==1.7.1.116)", allow_module_level=True)

from onnx import TensorProto, helper  # noqa: E402

from toprovar.config import get_config  # noqa: E402
from toprovar.export import fae_onnx  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
BUILD_SCRIPT = Path(__file__).with_name("fae_plugin_rtx_build.py")
ENTROPY_PIECES = "block_*_entropy"


def _rtx_lib_dir() -> Path:
    """The folder of the wheel's libraries (found without importing it: its __init__ loads them)."""
    return Path(importlib.util.find_spec("tensorrt_rtx_libs").submodule_search_locations[0])


@pytest.fixture(scope="module")
def plugin(tmp_path_factory) -> Path:
    env = os.environ.get("TOPROVAR_FAE_PLUGIN")
    if env:
        if not Path(env).is_file():
            pytest.fail(f"TOPROVAR_FAE_PLUGIN={env}: no such file")
        return Path(env)
    hdr = os.environ.get("TENSORRT_ROOT")
    if not hdr:
        pytest.skip("no FAE plugin: set TOPROVAR_FAE_PLUGIN to libtoprovar_fae_trt.so or TENSORRT_ROOT to the "
                    "TensorRT headers (NvInferRuntime.h)")
    if shutil.which("nvcc") is None or shutil.which("cmake") is None:
        pytest.skip("building the FAE plugin needs nvcc and cmake on PATH")
    out = tmp_path_factory.mktemp("fae_trt")
    cfg = subprocess.run(["cmake", "-S", str(ROOT / "cmake"), "-B", str(out), f"-DTENSORRT_ROOT={hdr}",
                          "-DFAE_CUDA_ARCHS=80", "-DFAE_CUDA_PTX=", "-DFAE_HOPPER=OFF"],
                         capture_output=True, text=True, timeout=300)
    assert cfg.returncode == 0, cfg.stdout[-4000:] + cfg.stderr[-4000:]
    if "TensorRT headers not found" in cfg.stdout:
        pytest.skip(f"TENSORRT_ROOT={hdr}: no NvInferRuntime.h there (nor in include/, include/tensorrt/)")
    b = subprocess.run(["cmake", "--build", str(out), "--target", "toprovar_fae_trt", "-j", str(os.cpu_count() or 2)],
                       capture_output=True, text=True, timeout=900)
    assert b.returncode == 0, b.stdout[-4000:] + b.stderr[-4000:]
    return out / "libtoprovar_fae_trt.so"


@pytest.fixture(scope="module")
def rtx_env(tmp_path_factory) -> dict:
    """Child-process environment whose loader path holds ``libtensorrt_rtx.so`` -> the wheel's ``.so.1``."""
    d = tmp_path_factory.mktemp("rtx_soname")
    (d / "libtensorrt_rtx.so").symlink_to(_rtx_lib_dir() / "libtensorrt_rtx.so.1")
    env = dict(os.environ)
    env["LD_LIBRARY_PATH"] = os.pathsep.join(filter(None, [str(d), env.get("LD_LIBRARY_PATH")]))
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    return env


def run_builds(plugin: Path, jobs: list[dict], workdir: Path, env: dict, timeout: int = 900) -> list[dict]:
    """Build ``jobs`` in one child process; its results, and its stderr under the key ``stderr`` of each."""
    jobs_path, out_path = workdir / "jobs.json", workdir / "result.json"
    jobs_path.write_text(json.dumps(jobs))
    r = subprocess.run([sys.executable, str(BUILD_SCRIPT), str(plugin), str(jobs_path), str(out_path)],
                       capture_output=True, text=True, timeout=timeout, env=env)
    assert r.returncode == 0, f"builder process exited {r.returncode}:\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    results = json.loads(out_path.read_text())
    assert [x["name"] for x in results] == [j["name"] for j in jobs]
    for x in results:
        x["stderr"] = r.stderr
    return results


# ------------------------------------------------------------------------------------------------ one-node models
def one_node_model(path: Path, dtype: int, head_dim: int, head_mean: bool, heads: int = 2) -> dict:
    """A model holding one FAE node over inputs q (B,heads,Nq,d), k, v (B,heads,Nk,d) with symbolic B, Nq, Nk;
    written to ``path``; returns a build job with one min/opt/max profile."""
    q = helper.make_tensor_value_info("q", dtype, ["B", heads, "Nq", head_dim])
    k = helper.make_tensor_value_info("k", dtype, ["B", heads, "Nk", head_dim])
    v = helper.make_tensor_value_info("v", dtype, ["B", heads, "Nk", head_dim])
    o = helper.make_tensor_value_info("O", dtype, ["B", heads, "Nq", head_dim])
    h = helper.make_tensor_value_info("H", TensorProto.FLOAT, ["B", "Nq"] if head_mean else ["B", heads, "Nq"])
    node = helper.make_node(fae_onnx.OP_TYPE, ["q", "k", "v"], ["O", "H"], name="fae0", domain=fae_onnx.DOMAIN,
                            **fae_onnx.node_attributes(head_dim ** -0.5, head_mean))
    model = helper.make_model(helper.make_graph([node], "fae_one", [q, k, v], [o, h]),
                              opset_imports=[helper.make_opsetid("", fae_onnx.MIN_OPSET)])
    assert fae_onnx.add_local_function(model, fae_onnx.MIN_OPSET) == 1
    onnx.checker.check_model(model)
    onnx.save(model, path)

    def shapes(n_min, n_opt, n_max):
        return {"min": [1, heads, n_min, head_dim], "opt": [2, heads, n_opt, head_dim],
                "max": [4, heads, n_max, head_dim]}
    prof = {"q": shapes(1, 16, 64), "k": shapes(1, 32, 128), "v": shapes(1, 32, 128)}
    return {"name": path.stem, "onnx": str(path), "profiles": [prof]}


CASES = [(TensorProto.BFLOAT16, 64, False), (TensorProto.BFLOAT16, 128, True),
         (TensorProto.FLOAT16, 64, True), (TensorProto.FLOAT16, 128, False)]


@pytest.fixture(scope="module")
def one_node_results(plugin, rtx_env, tmp_path_factory) -> dict:
    d = tmp_path_factory.mktemp("one_node")
    jobs = [one_node_model(d / f"fae_{TensorProto.DataType.Name(t).lower()}_d{hd}_mean{int(m)}.onnx", t, hd, m)
            for t, hd, m in CASES]
    jobs.append(one_node_model(d / "fae_float_d64_mean0.onnx", TensorProto.FLOAT, 64, False))
    return {r["name"]: r for r in run_builds(plugin, jobs, d, rtx_env)}


def check_plugin_build(res: dict, n_fae: int) -> None:
    """One PLUGIN_V3 layer of our creator per FAE node after parsing; one engine custom layer per node and
    profile, named after the node; the creator's name and namespace serialised in the plan."""
    assert res["ok"], res["errors"]
    assert res["fae_nodes"] == n_fae > 0
    plugins = res["network_plugins"]
    assert len(plugins) == n_fae, plugins
    assert all(p["plugin"] == fae_onnx.OP_TYPE and p["namespace"] == fae_onnx.PLUGIN_NAMESPACE for p in plugins)
    custom = [layer["name"] for layer in res["engine_layers"] if layer["type"] == "custom_layer"]
    assert len(custom) == n_fae * res["profiles"], custom
    names = {p["name"] for p in plugins}
    assert all(any(c.startswith(n) for n in names) for c in custom), (custom, names)
    assert res["plan_has_plugin"] and res["plan_bytes"] > 0


@pytest.mark.parametrize("dtype,head_dim,head_mean", CASES,
                         ids=[f"{TensorProto.DataType.Name(t).lower()}-d{hd}-mean{int(m)}" for t, hd, m in CASES])
def test_one_node_builds_with_plugin(one_node_results, dtype, head_dim, head_mean):
    res = one_node_results[f"fae_{TensorProto.DataType.Name(dtype).lower()}_d{head_dim}_mean{int(head_mean)}"]
    check_plugin_build(res, 1)


def test_float32_node_refused_in_one_line(one_node_results):
    """The plugin's reason reaches the builder's logger (ILoggerFinder::findLogger in the failing method) when the
    library was built with headers of the host's ABI (TensorRT >= 11 for TensorRT-RTX 1.7), else stderr."""
    res = one_node_results["fae_float_d64_mean0"]
    assert not res["ok"]
    msg = ("FlashAttentionEntropy: q, k, v must be float16 or bfloat16 (export the pieces with --dtype bfloat16 "
           "or float16)")
    assert msg in res["errors"] or f"[toprovar FAE plugin] {msg}" in res["stderr"], (res["errors"], res["stderr"])


# --------------------------------------------------------------------------------------- the exported tiny model
@pytest.fixture(scope="module")
def entropy_exports(tmp_path_factory) -> dict[str, Path]:
    """The tiny model's block_*_entropy pieces exported in bfloat16 and float16 (two exporter processes)."""
    base = tmp_path_factory.mktemp("tiny_entropy")
    exe = Path(sys.executable).with_name("toprovar-export")

    def export(dtype: str) -> Path:
        out = base / dtype
        cmd = ([str(exe)] if exe.exists() else [sys.executable, "-m", "toprovar.export.cli"])
        r = subprocess.run(cmd + ["--model", "tiny", "--dtype", dtype, "--out", str(out), "--pieces", ENTROPY_PIECES,
                                  "--no-progress"], capture_output=True, text=True, timeout=900)
        assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
        return out

    with ThreadPoolExecutor(2) as pool:
        return dict(zip(("bfloat16", "float16"), pool.map(export, ("bfloat16", "float16"))))


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_exported_entropy_pieces_build_with_plugin(plugin, rtx_env, entropy_exports, dtype, capsys):
    out = entropy_exports[dtype]
    manifest = json.loads((out / "manifest.json").read_text())
    pieces = {n: e for n, e in manifest["pieces"].items() if e.get("custom_ops")}
    assert len(pieces) == get_config("tiny").depth, sorted(pieces)
    jobs = [{"name": n, "onnx": str(out / e["file"]), "profiles": e["profiles"]} for n, e in sorted(pieces.items())]
    results = run_builds(plugin, jobs, out, rtx_env)
    lines = []
    for res, job in zip(results, jobs):
        n_fae = len(fae_onnx.fae_nodes(onnx.load(job["onnx"], load_external_data=False)))
        check_plugin_build(res, n_fae)
        assert res["profiles"] == len(job["profiles"])
        lines.append(f"{res['name']}: {len(res['network_plugins'])} plugin layer(s), "
                     f"{sum(1 for x in res['engine_layers'] if x['type'] == 'custom_layer')} custom layer(s) over "
                     f"{res['profiles']} profiles, {res['plan_bytes'] / 2**20:.1f} MiB, {res['build_s']:.1f} s")
    with capsys.disabled():
        print(f"\nTensorRT-RTX {dtype} FAE engines (SM89): {len(results)} built\n  " + "\n  ".join(lines))


# ------------------------------------------------------------------------------- the parser defect (evidence)
def test_rtx_parser_aborts_without_unversioned_library(plugin, rtx_env, one_node_results, tmp_path):
    """TensorRT-RTX 1.7: importing a plugin node makes the ONNX parser dlopen("libtensorrt_rtx.so") (to look up
    getPrivateApi_INTERNAL); the wheel ships only libtensorrt_rtx.so.1, so the parser throws inside a noexcept
    function and the process aborts. With the name on the loader path the same model builds (one_node_results)."""
    v = importlib.metadata.version("tensorrt-rtx-cu13-libs")
    if not v.startswith("1.7."):
        pytest.skip(f"checked against TensorRT-RTX 1.7 (installed: {v})")
    if (_rtx_lib_dir() / "libtensorrt_rtx.so").exists():
        pytest.skip(f"{_rtx_lib_dir()} already holds libtensorrt_rtx.so (the parser finds it there)")
    job = one_node_model(tmp_path / "fae_abort.onnx", TensorProto.BFLOAT16, 64, False)
    (tmp_path / "jobs.json").write_text(json.dumps([job]))
    env = dict(rtx_env)
    env["LD_LIBRARY_PATH"] = os.pathsep.join(d for d in os.environ.get("LD_LIBRARY_PATH", "").split(os.pathsep)
                                             if d and not (Path(d) / "libtensorrt_rtx.so").exists())
    r = subprocess.run([sys.executable, str(BUILD_SCRIPT), str(plugin), str(tmp_path / "jobs.json"),
                        str(tmp_path / "result.json")], capture_output=True, text=True, timeout=300, env=env)
    assert r.returncode == -6 and "terminate called" in r.stderr, (r.returncode, r.stderr[-2000:])
    assert not (tmp_path / "result.json").exists()
