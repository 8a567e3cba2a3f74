"""Real TensorRT-RTX engines (``toprovar-export --engines --trt-flavor rtx``) on a machine without a GPU.

Every piece of the tiny model (bfloat16, float16, float32) and of the packaged ``shapes`` model (bfloat16;
its float16 export differs from tiny's only in size, and CI time is kept for the rest) is exported and built by the real TensorRT-RTX builder for sm89, with the manifest's per-scale
optimization profiles, once per session (builder optimization level 0, two build processes); the checks
then run on what was built: engine I/O names, dtypes and each profile's min/opt/max against the manifest
(the builder's engine report), the layer list, the FAE pieces built from the function body (no plugin
layer), manifest entries, names and refusals. The terminal summary counts the engines per model and dtype.
Skips with the reason where TensorRT-RTX is not installed.
"""
from __future__ import annotations

import json
import os
import resource
import shutil
import time
from pathlib import Path

import pytest

from toprovar.export import engine
from toprovar.export.engine_check import PLUGIN_LAYER_TYPES, check_report, fae_layer_names
from toprovar.export.manifest import ManifestError, check_engine, load_manifest, verify
from toprovar.export.trt_flavour import TensorRTUnavailable, import_flavour

try:
    trt = import_flavour("rtx", builder=True)
except TensorRTUnavailable as exc:  # pragma: no cover - CI installs it (.ci/run)
    pytest.skip(str(exc), allow_module_level=True)

TARGET = "sm89"
CASES = [("tiny", "bfloat16"), ("tiny", "float16"), ("tiny", "float32"), ("shapes", "bfloat16")]
JOBS = 2 if (os.cpu_count() or 1) >= 2 else 1


def _cpu() -> float:
    return sum(getattr(resource.getrusage(w), a) for w in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)
               for a in ("ru_utime", "ru_stime"))


@pytest.fixture(scope="session", params=CASES, ids=[f"{m}-{d}" for m, d in CASES])
def build(request, tmp_path_factory):
    """(manifest, {piece: build info}, summary row) of one model/dtype: exported, then every engine built (the
    engine files are removed at the end of the session)."""
    from toprovar.export.onnx_export import ExportRequest, export_model
    model, dtype = request.param
    out = tmp_path_factory.mktemp("engines") / f"{model}-{dtype}"
    if (model, dtype) == ("tiny", "float32"):  # the session's float32 export (conftest), copied
        src, rc, _, err = request.getfixturevalue("exported")
        assert rc == 0, err
        shutil.copytree(src, out)
    else:
        export_model(ExportRequest(model=model, out=str(out), dtype=dtype, jobs=JOBS, progress=False))
    infos = {}
    t0, c0 = time.perf_counter(), _cpu()
    man = engine.build_engines(load_manifest(out), plugins=[], flavour="rtx", targets=TARGET, opt_level=0, jobs=JOBS,
                               progress=False, on_engine=lambda n, e, info: infos.__setitem__(n, info))
    wall, cpu = time.perf_counter() - t0, _cpu() - c0
    slow = max(infos, key=lambda n: infos[n]["build_s"])
    row = {"model": model, "dtype": dtype, "engines": len(infos), "checked": 0,
           "fae": "function body" if any(i["fae"] for i in infos.values()) else "-", "wall_s": wall, "cpu_s": cpu,
           "mb": sum(i["bytes"] for i in infos.values()) / 1e6, "slowest": f"{slow} {infos[slow]['build_s']:.1f} s"}
    request.config.toprovar_engine_builds.append(row)
    print(f"\n{model} {dtype}: {len(infos)} engines in {wall:.1f} s ({cpu:.1f} s CPU), {row['mb']:.1f} MB")
    for n, i in infos.items():
        print(f"  {n:<20} {i['build_s']:6.2f} s {i['bytes'] / 1e6:6.2f} MB {i['layers']:4d} layers {i['profiles']} "
              f"profile(s) fae={i['fae']}")
    yield load_manifest(out), infos, row
    shutil.rmtree(out / "engine", ignore_errors=True)  # 0.1-0.4 GB per case: not kept in pytest's basetemp


def test_every_piece_has_a_real_engine(build):
    man, infos, _ = build
    assert set(infos) == set(man["pieces"]) == set(man["engines"])
    verify(man, engines=True)  # engine files' sha256, built from the current ONNX bytes
    for name, e in man["engines"].items():
        assert e["file"] == f"engine/{name}.rtx{trt.__version__}.{TARGET}.plan"
        assert (e["flavour"], e["tensorrt"], e["targets"], e["gpu"]) == ("rtx", trt.__version__, [TARGET], None)
        assert (man.root / e["file"]).stat().st_size == e["bytes"] > 100_000
        assert e["fae"] == ("function" if name.endswith("_entropy") else None) and e["plugins"] == []
    assert man["versions"]["tensorrt_rtx"] == trt.__version__


def test_engine_io_profiles_and_layers_match_the_manifest(build):
    """Independent re-check of each engine's report (I/O names/dtypes, every profile's min/opt/max) against
    the manifest, and what the layer lists hold."""
    man, infos, row = build
    n_scales = len(man["schedule"])
    for name, info in infos.items():
        entry, report = man["pieces"][name], info["report"]
        check_report(report, entry, name)
        assert report.source == "builder log"
        assert {k: t.dtype for k, t in report.io.items()} == {t["name"]: t["dtype"]
                                                               for t in entry["inputs"] + entry["outputs"]}
        assert len(report.layers) == info["layers"] == man["engines"][name]["layers"] >= 1
        if name.startswith("block_"):
            assert info["profiles"] == n_scales == len(report.io["x"].profiles)
            for si, (h, w) in enumerate(man["schedule"]):
                mn, opt, mx = report.io["x"].profiles[si]
                assert mn[1] == man["min_tokens"][si] and opt[1] == mx[1] == h * w
            kv = "float32" if man["dtype"] == "float32" else man["dtype"]
            assert report.io["k"].dtype == report.io["past_k"].dtype == kv and report.io["x"].dtype == "float32"
        if name.endswith("_entropy"):  # function body: no plugin layer, more layers than the plain block
            assert fae_layer_names(report.layers, ["node_attention_with_entropy__1"]) == set()
            assert not any(k in kind.lower() for _, kind in report.layers for k in PLUGIN_LAYER_TYPES)
            assert report.io["entropy"].dtype == "float32"
        row["checked"] += 1


def test_engine_refusals_are_one_line(build):
    man, _, _ = build
    name = "block_00_entropy"
    assert check_engine(man, name, trt.__version__, flavour="rtx", capability=(8, 9)) == man.engine_path(name)
    cases = [(dict(tensorrt_version=trt.__version__, flavour="rtx", capability=(9, 0)),
              "compute capability 9.0) (TensorRT-RTX runs on RTX GPUs"),
             (dict(tensorrt_version=trt.__version__, flavour="rtx", capability=(8, 6)), "built for sm89 cannot run"),
             (dict(tensorrt_version="1.8.0.1", flavour="rtx", capability=(8, 9)), "built with TensorRT-RTX 1.7"),
             (dict(tensorrt_version="11.1.0", gpu="NVIDIA H200", flavour="tensorrt"),
              "a TensorRT-RTX engine, not TensorRT")]
    for kw, match in cases:
        with pytest.raises(ManifestError, match=match.replace("(", r"\(").replace(")", r"\)")) as ei:
            check_engine(man, name, **kw)
        assert "\n" not in str(ei.value)


# ------------------------------------------------------------------------------------------ the review's defects
@pytest.fixture(scope="session")
def tiny_float32(tmp_path_factory):
    """A float32 export of two tiny pieces (one with the FAE node)."""
    from toprovar.export.onnx_export import ExportRequest, export_model
    out = tmp_path_factory.mktemp("fp32") / "tiny"
    export_model(ExportRequest(model="tiny", out=str(out), only=["block_01_entropy", "policy_s02"], progress=False))
    return load_manifest(out)


def test_fae_plugin_inside_the_rtx_builder(tmp_path_factory):
    """With a plugin library ($TOPROVAR_FAE_PLUGIN: .ci/run builds plugins/ into build/native), a bfloat16
    block_00_entropy builds through toprovar-export (a child process: a parser failure cannot take pytest down)
    with one FAE plugin layer, checked in the engine's layer report, and the manifest says ``fae: plugin``."""
    import subprocess
    import sys
    lib = os.environ.get(engine.PLUGIN_ENV)
    if not lib or not Path(lib).is_file():
        pytest.skip(f"no FAE plugin library (${engine.PLUGIN_ENV} unset or missing): the plugin path is not built")
    from toprovar.export.onnx_export import ExportRequest, export_model
    out = tmp_path_factory.mktemp("plugin") / "tiny"
    export_model(ExportRequest(model="tiny", out=str(out), dtype="bfloat16", only=["block_00_entropy"],
                               progress=False))
    res = subprocess.run([sys.executable, "-m", "toprovar.export.cli", "--skip-export", "--out", str(out), "--engines",
                          "--trt-flavor", "rtx", "--trt-target", TARGET, "--optimization-level", "0", "--plugin", lib,
                          "--no-progress"], capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, (res.stdout + res.stderr)[-3000:]
    e = load_manifest(out)["engines"]["block_00_entropy"]
    assert (e["fae"], e["plugin_layers"], e["plugins"]) == ("plugin", 1, [str(Path(lib).resolve())])
    print(f"\nFAE plugin engine: block_00_entropy {e['bytes'] / 1e6:.1f} MB, {e['layers']} layers, {e['build_s']} s")


def test_float32_export_with_the_plugin_is_refused_in_one_line(tiny_float32, tmp_path):
    """Defect 1: the plugin takes bfloat16/float16 q/k/v; a float32 export's _entropy piece is refused before
    any library is loaded or engine built (without --plugin it builds from the function body: see above)."""
    lib = tmp_path / "libtoprovar_fae_trt.so"
    lib.write_bytes(b"")  # never loaded: the dtype is checked first
    with pytest.raises(engine.PluginError) as ei:
        engine.build_engines(tiny_float32, plugins=[str(lib)], flavour="rtx", targets=TARGET, progress=False)
    msg = str(ei.value)
    assert "\n" not in msg and msg.startswith("block_01_entropy: the FAE plugin takes bfloat16/float16") and \
        "this export is float32" in msg
    assert not (tiny_float32.root / "engine").exists()


def test_parser_has_no_plugin_override_and_standard_plugins_do_not_count(tiny_float32, tmp_path):
    """Defect 2: no ENABLE_PLUGIN_OVERRIDE on the real parser; after init_libnvinfer_plugins a piece without FAE
    builds with 0 FAE plugin layers (only IPluginV3 layers named after an FAE node count)."""
    assert trt.init_libnvinfer_plugins(None, "") in (None, True)
    log = trt.Logger(trt.Logger.ERROR)
    builder = trt.Builder(log)
    network = builder.create_network(0)
    parser, nodes = engine.parse_model(trt, log, network, tiny_float32.piece_path("block_01_entropy"), "function")
    assert not parser.get_flag(trt.OnnxParserFlag.ENABLE_PLUGIN_OVERRIDE)
    assert nodes == ["node_attention_with_entropy__1"]
    assert engine.network_fae_plugin_layers(trt, network, nodes) == 0  # the function body was expanded
    target = engine.build_target(trt, "rtx", TARGET)
    info = engine.build_engine(trt, tiny_float32.piece_path("policy_s02"), tiny_float32["pieces"]["policy_s02"],
                               tmp_path / "policy_s02.plan", target, None, opt_level=0)
    assert info["plugin_layers"] == 0 and (tmp_path / "policy_s02.plan").stat().st_size == info["bytes"]


def test_builder_config_clears_tf32_and_sets_targets():
    """Defect 4: TF32 is on in a fresh config (the builder's default) and off in ours; RTX targets are set."""
    builder = trt.Builder(trt.Logger(trt.Logger.ERROR))
    assert builder.create_builder_config().get_flag(trt.BuilderFlag.TF32)
    target = engine.build_target(trt, "rtx", "sm86,sm120")
    config = engine.builder_config(trt, builder, target, opt_level=0)
    assert not config.get_flag(trt.BuilderFlag.TF32)
    assert config.num_compute_capabilities == 2
    assert [config.get_compute_capability(i) for i in range(2)] == [trt.ComputeCapability.SM86,
                                                                   trt.ComputeCapability.SM120]
    assert config.profiling_verbosity == trt.ProfilingVerbosity.DETAILED and config.builder_optimization_level == 0


def test_timing_cache_is_ignored_for_rtx_with_one_warning(tiny_float32, tmp_path, capfd):
    """Defect 6 on TensorRT-RTX: its timing cache calls are no-ops (a corrupt cache is 'accepted'), so a given
    --timing-cache is reported in one warning line and never read or written."""
    cache = tmp_path / "foreign.cache"
    cache.write_bytes(b"not a timing cache")
    engine.build_engines(tiny_float32, names=["policy_s02"], timing_cache=str(cache), flavour="rtx", targets=TARGET,
                         opt_level=0, progress=False)
    err = [ln for ln in capfd.readouterr().err.splitlines() if "warning" in ln]
    assert err == ["toprovar-export: warning: --timing-cache: TensorRT-RTX has no timing cache (its timing-cache "
                   "calls are no-ops); ignored"]
    assert cache.read_bytes() == b"not a timing cache"


def test_bad_targets_and_flavour_are_one_line(tiny_float32):
    from toprovar.export.trt_flavour import TargetError
    for kw, match in [(dict(flavour="rtx", targets="sm90"), "--trt-target: sm90 not a TensorRT-RTX target"),
                      (dict(flavour="cuda"), "--trt-flavor: unknown flavour 'cuda'")]:
        with pytest.raises(TargetError, match=match) as ei:
            engine.build_engines(tiny_float32, progress=False, **kw)
        assert "\n" not in str(ei.value)


def test_cli_rtx_engines_and_summary(tiny_float32, tmp_path, monkeypatch):
    """toprovar-export --skip-export --engines --trt-flavor rtx: engines for the export's pieces, a summary line
    (no plugin library: the float32 FAE piece from the function body)."""
    monkeypatch.delenv(engine.PLUGIN_ENV, raising=False)
    import contextlib
    import io
    from toprovar.export import cli
    out = tmp_path / "cli"
    shutil.copytree(tiny_float32.root, out)
    buf, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(buf), contextlib.redirect_stderr(err):
        rc = cli.main(["--skip-export", "--out", str(out), "--engines", "--trt-flavor", "rtx", "--trt-target",
                       "sm89,sm120", "--optimization-level", "0", "--no-progress"])
    assert rc == 0, err.getvalue()
    man = load_manifest(out)
    assert sorted(man["engines"]) == ["block_01_entropy", "policy_s02"]
    assert man["engines"]["block_01_entropy"]["file"].endswith(f".rtx{trt.__version__}.sm89-sm120.plan")
    assert f"2 engines (TensorRT-RTX {trt.__version__} for sm89,sm120" in buf.getvalue() and "FAE: function" in \
        buf.getvalue()
    raw = json.loads(man.path.read_text())
    assert raw["engines"]["block_01_entropy"]["fae"] == "function" and raw["engines"]["policy_s02"]["fae"] is None
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(err := io.StringIO()):
        rc = cli.main(["--skip-export", "--out", str(out), "--engines", "--trt-flavor", "tensorrt", "--trt-target",
                       "sm89"])
    assert rc == cli.EXIT_INPUT and err.getvalue().count("\n") == 1 and "--trt-target: only with" in err.getvalue()


def test_polygraphy_inspects_the_onnx_pieces(tiny_float32):
    """`polygraphy inspect model` on an exported piece lists its I/O and the FAE node."""
    import subprocess
    import sys
    cmd = "import sys; from polygraphy.tools import main; sys.exit(main())"  # the `polygraphy` console script
    res = subprocess.run([sys.executable, "-c", cmd, "inspect", "model",
                          str(tiny_float32.piece_path("block_01_entropy")), "--show", "layers"],
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    text = res.stdout
    assert "FlashAttentionEntropy" in text and "past_k" in text and "entropy" in text


def test_polygraphy_builds_a_piece_with_tensorrt_rtx(tiny_float32, tmp_path):
    """polygraphy's own TensorRT loaders on TensorRT-RTX (POLYGRAPHY_USE_TENSORRT_RTX=1; needs the `tensorrt_rtx`
    module name of the tensorrt-rtx meta package) convert an exported piece for sm89 on this CPU machine."""
    import importlib.util
    import subprocess
    import sys
    if importlib.util.find_spec("tensorrt_rtx") is None:
        pytest.skip("polygraphy imports TensorRT-RTX as `tensorrt_rtx`: pip install tensorrt-rtx==1.7.1.116")
    plan = tmp_path / "policy_s02.plan"
    cmd = "import sys; from polygraphy.tools import main; sys.exit(main())"
    res = subprocess.run([sys.executable, "-c", cmd, "convert", str(tiny_float32.piece_path("policy_s02")),
                          "--convert-to", "trt", "-o", str(plan), "--compute-capabilities", "8.9",
                          "--builder-optimization-level", "0"], capture_output=True, text=True, timeout=300,
                         env={**os.environ, "POLYGRAPHY_USE_TENSORRT_RTX": "1"})
    assert res.returncode == 0, (res.stdout + res.stderr)[-2000:]
    assert "Finished engine building" in res.stdout + res.stderr and plan.stat().st_size > 100_000


def test_runtime_refuses_rtx_engines_by_compute_capability_before_import(tiny_float32, tmp_path):
    """The trt backend's first check (no TensorRT import, no deserialisation): an H200 (compute 9.0) is refused
    in one line naming the compute capability; an RTX 4090 (8.9) passes."""
    from toprovar.runtime.tensorrt_backend import check_engines_run_here
    out = tmp_path / "rt"
    shutil.copytree(tiny_float32.root, out)
    man = engine.build_engines(load_manifest(out), names=["policy_s02"], flavour="rtx", targets="sm86,sm89",
                               opt_level=0, progress=False)
    assert check_engines_run_here(man, "NVIDIA GeForce RTX 4090", (8, 9)) == "rtx"
    with pytest.raises(ManifestError) as ei:
        check_engines_run_here(man, "NVIDIA H200", (9, 0))
    msg = str(ei.value)
    assert "\n" not in msg and "engine policy_s02: TensorRT-RTX engines built for sm86,sm89 cannot run on this GPU " \
                               "(NVIDIA H200, compute capability 9.0)" in msg
    with pytest.raises(ManifestError, match="a TensorRT-RTX engine, not TensorRT"):
        check_engines_run_here(man, "NVIDIA H200", (9, 0), flavour="tensorrt")
