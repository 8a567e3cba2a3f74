"""TensorRT backend: its pure logic on CPU (profile choice, plugin search, stale-engine refusal, errors), and
engines against ONNX Runtime where TensorRT and CUDA are present (skipped with the reason elsewhere)."""
from __future__ import annotations

import hashlib
import json

import pytest
import torch

from toprovar.cli import main
from toprovar.export.manifest import FORMAT, Manifest, ManifestError
from toprovar.runtime import tensorrt_backend as tb
from toprovar.runtime.onnxruntime_backend import BackendUnavailable
from toprovar.runtime.piece_backend import PieceError


def _has_tensorrt() -> bool:
    try:
        tb.import_tensorrt()
        return True
    except BackendUnavailable:
        return False


HAS_TRT = _has_tensorrt()
HAS_CUDA = torch.cuda.is_available()
needs_trt_gpu = pytest.mark.skipif(not (HAS_TRT and HAS_CUDA),
                                   reason="needs TensorRT (" + ("importable" if HAS_TRT else "not importable here") +
                                          ") and a CUDA device (" + ("present" if HAS_CUDA else "absent") + ")")


def _sha(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def _manifest(tmp_path, engine: dict | None = None, custom_ops=("toprovar::FlashAttentionEntropy",)) -> Manifest:
    """A minimal manifest with one `block_00_entropy` piece and its engine entry (files written)."""
    onnx = tmp_path / "onnx" / "block_00_entropy.onnx"
    onnx.parent.mkdir(parents=True, exist_ok=True)
    onnx.write_bytes(b"onnx bytes")
    plan = tmp_path / "engine" / "block_00_entropy.plan"
    plan.parent.mkdir(parents=True, exist_ok=True)
    plan.write_bytes(b"plan bytes")
    piece = {"file": "onnx/block_00_entropy.onnx", "sha256": hashlib.sha256(b"onnx bytes").hexdigest(), "bytes": 10,
             "inputs": [{"name": "x", "shape": ["Bp", "n", 8], "dtype": "float32"}],
             "outputs": [{"name": "x_out", "shape": ["Bp", "n", 8], "dtype": "float32"}], "opset": 18,
             "external_data": [], "custom_ops": list(custom_ops)}
    eng = {"file": "engine/block_00_entropy.plan", "sha256": hashlib.sha256(b"plan bytes").hexdigest(), "bytes": 10,
           "flavour": "tensorrt", "tensorrt": "11.1.0", "gpu": "NVIDIA H100 80GB HBM3", "targets": None,
           "onnx_sha256": piece["sha256"], "profiles": 7, "fae": "plugin", "plugins": [], "plugin_layers": 1}
    eng.update(engine or {})
    data = {"format": FORMAT, "model": {}, "schedule": [[1, 1]], "preset": "0.06M", "h_div_w": 1.0,
            "dtype": "float32", "policy": None, "pieces": {"block_00_entropy": piece},
            "versions": {k: None for k in ("toprovar", "torch", "onnx", "onnxruntime", "tensorrt")},
            "engines": {"block_00_entropy": eng}}
    (tmp_path / "manifest.json").write_text(json.dumps(data))
    return Manifest(data, tmp_path)


# ------------------------------------------------------------------------------------------ stale engines
def test_engine_of_other_tensorrt_version_is_refused(tmp_path):
    m = _manifest(tmp_path)
    assert tb.check_engines(m, "11.1.0", "NVIDIA H100 80GB HBM3")["block_00_entropy"].name == "block_00_entropy.plan"
    with pytest.raises(ManifestError, match=r"built with TensorRT 11\.1\.0, this is 10\.13\.0; rebuild"):
        tb.check_engines(m, "10.13.0", "NVIDIA H100 80GB HBM3")
    with pytest.raises(ManifestError, match="built for GPU 'NVIDIA H100 80GB HBM3', this is 'NVIDIA H200'"):
        tb.check_engines(m, "11.1.0", "NVIDIA H200")


def test_engine_from_other_onnx_bytes_or_corrupted_is_refused(tmp_path):
    m = _manifest(tmp_path, {"onnx_sha256": _sha("older export")})
    with pytest.raises(ManifestError, match="stale, built from other ONNX bytes"):
        tb.check_engines(m, "11.1.0", "NVIDIA H100 80GB HBM3")
    m = _manifest(tmp_path)
    (tmp_path / "engine" / "block_00_entropy.plan").write_bytes(b"plan BYTES")
    with pytest.raises(ManifestError, match="sha256 mismatch"):
        tb.check_engines(m, "11.1.0", "NVIDIA H100 80GB HBM3")
    tb.check_engines(m, "11.1.0", "NVIDIA H100 80GB HBM3", verify=False)  # --no-verify skips the file hash only


def test_export_without_engines_is_refused(tmp_path):
    m = _manifest(tmp_path)
    m["engines"] = {}
    with pytest.raises(ManifestError, match="no TensorRT engines in this export; build them with toprovar-export "
                                            "--engines"):
        tb.check_engines(m, "11.1.0", "x")


# ------------------------------------------------------------------------------------------ plugin
def test_missing_plugin_library_is_one_clear_error(tmp_path, monkeypatch):
    monkeypatch.delenv(tb.PLUGIN_ENV, raising=False)
    monkeypatch.setattr(tb, "_REPO", tmp_path / "repo")
    m = _manifest(tmp_path, {"plugins": ["/nonexistent/build/libtoprovar_fae_trt.so"]})
    assert tb.engines_need_plugin(m)
    with pytest.raises(tb.PluginError) as info:
        tb.find_plugin_library(m)
    msg = str(info.value)
    assert "\n" not in msg and msg.startswith("TensorRT plugin library libtoprovar_fae_trt.so not found")
    assert "--plugin PATH" in msg
    # an absolute library path recorded by the builder is never followed: a manifest cannot make the runtime
    # load code from outside its export directory (a relative one inside it is, one leading out is refused)
    assert "/nonexistent" not in msg and all(str(c).startswith(str(tmp_path)) for c in tb.plugin_candidates(m))
    inside = _manifest(tmp_path, {"plugins": ["plugins/own/libtoprovar_fae_trt.so"]})
    assert tmp_path / "plugins/own/libtoprovar_fae_trt.so" in tb.plugin_candidates(inside)
    with pytest.raises(ManifestError, match="not a path inside the export directory"):
        tb.plugin_candidates(_manifest(tmp_path, {"plugins": ["../../evil/libtoprovar_fae_trt.so"]}))
    with pytest.raises(tb.PluginError, match="--plugin: TensorRT plugin library /no/such.so not found"):
        tb.find_plugin_library(m, "/no/such.so")
    # found in order: --plugin, $TOPROVAR_FAE_PLUGIN, the engine's recorded file, the export's plugins/
    lib = tmp_path / "plugins" / tb.PLUGIN_LIBRARY
    lib.parent.mkdir()
    lib.write_bytes(b"")
    assert tb.find_plugin_library(m) == lib
    env = tmp_path / "env.so"
    env.write_bytes(b"")
    monkeypatch.setenv(tb.PLUGIN_ENV, str(env))
    assert tb.find_plugin_library(m) == env


def test_engines_without_plugin_layers_need_no_library(tmp_path):
    m = _manifest(tmp_path, {"plugin_layers": 0, "fae": None}, custom_ops=())
    assert not tb.engines_need_plugin(m)
    # an _entropy engine built from the FAE function body needs no library either
    m = _manifest(tmp_path, {"plugin_layers": 0, "fae": "function"})
    assert not tb.engines_need_plugin(m)


def test_engines_are_checked_against_the_gpu_before_any_import(tmp_path):
    """Flavour, GPU name (TensorRT) or compute capability (TensorRT-RTX) come first, in one line."""
    m = _manifest(tmp_path)
    assert tb.check_engines_run_here(m, "NVIDIA H100 80GB HBM3", (9, 0)) == "tensorrt"
    with pytest.raises(ManifestError, match="built for GPU 'NVIDIA H100 80GB HBM3', this is 'NVIDIA H200'"):
        tb.check_engines_run_here(m, "NVIDIA H200", (9, 0))
    with pytest.raises(ManifestError, match="a TensorRT engine, not TensorRT-RTX; rebuild with toprovar-export "
                                            "--engines --trt-flavor rtx"):
        tb.check_engines_run_here(m, "NVIDIA H100 80GB HBM3", (9, 0), flavour="rtx")
    m = _manifest(tmp_path, {"flavour": "rtx", "tensorrt": "1.7.1.116", "gpu": None, "targets": ["sm86", "sm120"],
                             "fae": "function"})
    assert tb.check_engines_run_here(m, "NVIDIA GeForce RTX 5090", (12, 0)) == "rtx"
    for gpu, cap, extra in [("NVIDIA H200", (9, 0), "; not on Hopper"), ("NVIDIA GeForce RTX 4090", (8, 9), "")]:
        with pytest.raises(ManifestError) as info:
            tb.check_engines_run_here(m, gpu, cap)
        msg = str(info.value)
        assert "\n" not in msg and msg.startswith(f"engine block_00_entropy: TensorRT-RTX engines built for "
                                                   f"sm86,sm120 cannot run on this GPU ({gpu}, compute capability "
                                                   f"{cap[0]}.{cap[1]})")
        assert ("TensorRT-RTX runs on RTX GPUs" in msg) == bool(extra)


# ------------------------------------------------------------------------------------------ profiles
TABLE = [  # per scale: x (B', n, C), past_k (B', H, P, hd)
    {"x": ((1, 1, 8), (2, 1, 8)), "past_k": ((1, 2, 0, 4), (2, 2, 0, 4))},
    {"x": ((1, 1, 8), (2, 4, 8)), "past_k": ((1, 2, 0, 4), (2, 2, 1, 4))},
    {"x": ((1, 1, 8), (2, 16, 8)), "past_k": ((1, 2, 0, 4), (2, 2, 5, 4))},
]


def test_select_profile_prefers_the_scale_and_falls_back():
    assert tb.select_profile(TABLE, {"x": (2, 4, 8), "past_k": (2, 2, 1, 4)}, 1, "block_00") == 1
    # a pruned call at scale 2 (3 kept tokens, cache 5) stays on scale 2's profile
    assert tb.select_profile(TABLE, {"x": (2, 3, 8), "past_k": (2, 2, 5, 4)}, 2, "block_00") == 2
    # the preferred profile does not hold the shapes: the first one that does
    assert tb.select_profile(TABLE, {"x": (2, 3, 8), "past_k": (2, 2, 1, 4)}, 0, "block_00") == 1
    # static inputs have no range
    assert tb.select_profile([{"x": ((), ())}], {"x": (1, 1, 8)}, None, "head_s00") == 0


def test_select_profile_error_names_piece_and_range():
    with pytest.raises(PieceError) as info:
        tb.select_profile(TABLE, {"x": (4, 16, 8), "past_k": (4, 2, 5, 4)}, 2, "block_03")
    msg = str(info.value)
    assert "\n" not in msg and msg.startswith("piece block_03: input shapes")
    assert "outside every optimization profile" in msg and "--max-batch-size" in msg


# ------------------------------------------------------------------------------------------ availability
@pytest.mark.skipif(HAS_TRT, reason="TensorRT is importable here")
def test_backend_unavailable_without_tensorrt():
    """No lean-runtime fallback: without the flavour's module, one line (whatever the import raised)."""
    with pytest.raises(BackendUnavailable) as info:
        tb.import_tensorrt("tensorrt")
    msg = str(info.value)
    assert "\n" not in msg and msg.startswith("--backend trt: TensorRT is not importable (tensorrt: ")
    assert "tensorrt_lean" not in msg


def test_cli_trt_without_cuda_or_tensorrt_is_one_line(tmp_path, capsys):
    if HAS_TRT and HAS_CUDA:
        pytest.skip("TensorRT and CUDA are present: the trt backend can run")
    m = _manifest(tmp_path)
    m["model"] = {"name": "tiny", "depth": 4, "width": 128, "num_heads": 2, "text_channels": 128,
                  "codebook_dim": 16, "vae": "tiny", "text_encoder": "tiny", "spatial_patchify": False,
                  "block_chunks": 2, "text_maxlen": 64}
    (tmp_path / "manifest.json").write_text(json.dumps(dict(m)))
    argv = ["generate", "--engine-dir", str(tmp_path), "--backend", "trt", "--prompt", "x"]
    assert main(argv + (["--device", "cuda"] if HAS_CUDA else [])) == 2
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("toprovar: error:")]
    assert len(err) == 1
    assert ("needs a CUDA device" in err[0]) if not HAS_CUDA else ("TensorRT is not importable" in err[0])


def test_rtx_runtime_module_imports_here():
    """TensorRT-RTX (installed by .ci/run) is importable as the trt backend's rtx module; it has a Runtime."""
    try:
        trt = tb.import_tensorrt("rtx")
    except BackendUnavailable as exc:
        pytest.skip(str(exc))
    assert trt.__name__ in ("tensorrt_rtx", "tensorrt_rtx_bindings") and hasattr(trt, "Runtime")


# ------------------------------------------------------------------------------------------ engines (GPU)
@pytest.fixture(scope="module")
def trt_export(tmp_path_factory):
    """TensorRT 11 engines of the tiny model built on this GPU (FAE plugin from $TOPROVAR_FAE_PLUGIN, else the
    function body)."""
    if not (HAS_TRT and HAS_CUDA):
        pytest.skip("needs TensorRT and a CUDA device")
    from toprovar.export.engine import EngineError, build_engines
    from toprovar.export.manifest import load_manifest
    from toprovar.export.onnx_export import ExportRequest, export_model
    from toprovar.export.trt_flavour import TensorRTUnavailable
    out = tmp_path_factory.mktemp("trt") / "tiny"
    export_model(ExportRequest(model="tiny", out=str(out), progress=False))
    try:
        build_engines(load_manifest(out), progress=False)
    except (TensorRTUnavailable, EngineError) as exc:
        pytest.skip(str(exc))
    return out


@needs_trt_gpu
@pytest.mark.parametrize("policy", ["none", "toprovar"])
@pytest.mark.parametrize("cuda_graph", [False, True])
def test_tensorrt_matches_onnxruntime(trt_export, policy, cuda_graph):
    from toprovar.policy import make_policy
    from toprovar.runtime.engine_dir import EngineRuntime
    trt_rt = EngineRuntime.open(trt_export, "trt", "cuda", cuda_graph=cuda_graph)
    ort_rt = EngineRuntime.open(trt_export, "onnxruntime", "cpu")
    for prompts, seed in ((["a red square"], 1), (["two blue circles", "a cat"], 5)):
        runs = [trt_rt.generate(prompts, seed=seed, policy=make_policy(policy), progress=False) for _ in range(2)]
        ref = ort_rt.generate(prompts, seed=seed, policy=make_policy(policy), progress=False)
        a = runs[-1]  # the second run replays the captured graphs
        assert all(torch.equal(x.cpu(), y.cpu()) for x, y in zip(runs[0].bits, runs[1].bits))
        # float32 engines (TF32 cleared at build) agree with ONNX Runtime on all but borderline bits
        same = sum(int((x.cpu() == y).sum()) for x, y in zip(a.bits, ref.bits))
        total = sum(y.numel() for y in ref.bits)
        assert same / total > 0.99, f"{same}/{total} bits agree"
        assert torch.equal(a.bits[0].cpu(), ref.bits[0])


@needs_trt_gpu
def test_tensorrt_backend_binds_aligned_preallocated_buffers(trt_export):
    from toprovar.runtime.engine_dir import EngineRuntime
    rt = EngineRuntime.open(trt_export, "trt", "cuda")
    be = rt.backend
    rt.generate(["a red square"], seed=1, progress=False)
    grows = (be.ws.grows, rt.orchestrator.ws.grows)
    rt.generate(["a red square"], seed=2, progress=False)
    assert grows == (be.ws.grows, rt.orchestrator.ws.grows)
    blocks = [e for n, e in be.engines.items() if n.startswith("block_")]
    assert blocks and all(len(e.profiles) == len(rt.schedule) for e in blocks)
    for e in be.engines.values():
        for t in e.inputs + e.outputs:
            assert e.context.get_tensor_address(t) % 256 == 0
