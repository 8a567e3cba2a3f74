"""toprovar-export: every piece of the tiny model, onnx.checker, manifest schema + hashes, ONNX Runtime
vs PyTorch (polygraphy), the FAE node, external data, dtypes, one-line errors. Real TensorRT-RTX engine
builds: tests/test_engines.py.

The tiny model is exported once per session (CLI, into a temporary directory: the ``exported`` fixture
of conftest.py, shared with tests/test_engines.py). TensorRT comparisons
skip with the reason where TensorRT is not importable.
"""
from __future__ import annotations

import contextlib
import io
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")
pytest.importorskip("polygraphy")
jsonschema = pytest.importorskip("jsonschema")

from polygraphy.logger import G_LOGGER  # noqa: E402

from toprovar.config import get_config  # noqa: E402
from toprovar.export import cli, engine, fae_onnx  # noqa: E402
from toprovar.export.compare import TOLERANCES, block_cases, compare_piece, compare_runners, piece_feeds  # noqa: E402
from toprovar.export.manifest import SCHEMA, ManifestError, load_manifest, sha256_file, verify  # noqa: E402
from toprovar.export.onnx_export import (ExportError, ExportRequest, build_specs, export_model,  # noqa: E402
                                         export_piece, load_onnx_checked)
from toprovar.schedule import get_schedule  # noqa: E402

G_LOGGER.module_severity = G_LOGGER.ERROR

TINY = get_config("tiny")
SCHEDULE = get_schedule(TINY.default_preset)


def expected_pieces() -> list[str]:
    names = ["text_encoder", "condition_cfg", "condition"]
    names += [f"block_{l:02d}{v}" for l in range(TINY.depth) for v in ("", "_entropy")]
    for si in range(len(SCHEDULE)):
        names += [f"head_s{si:02d}", f"head_s{si:02d}_nocfg", f"next_input_s{si:02d}", f"policy_s{si:02d}"]
    return names + ["vae_decoder"]


PIECES = expected_pieces()


def run_cli(argv: list[str]) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = cli.main(argv)
    return rc, out.getvalue(), err.getvalue()


@pytest.fixture(scope="session")
def manifest(exported):
    out, rc, _, stderr = exported
    assert rc == 0, stderr
    return load_manifest(out)


@pytest.fixture(scope="session")
def specs(exported):
    """The PyTorch modules of every piece, rebuilt exactly as the export built them (same seed)."""
    _, sp = build_specs(ExportRequest(model="tiny", out=str(exported[0])))
    return {s.name: s for s in sp}


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


# ------------------------------------------------------------------------------------------ pieces / files
def test_every_piece_written(exported, manifest):
    out, rc, stdout, stderr = exported
    assert list(manifest["pieces"]) == PIECES
    for name in PIECES:
        assert (out / "onnx" / f"{name}.onnx").is_file(), name
    leftovers = [p.name for p in (out / "onnx").iterdir() if p.name.startswith(".")]
    assert leftovers == [], f"temporary files left behind: {leftovers}"
    assert not [p for p in out.iterdir() if p.name.startswith(".")]
    assert manifest["notes"] == []


def test_summary_table(exported):
    _, _, stdout, _ = exported
    lines = stdout.splitlines()
    assert lines[0].split() == ["piece", "file", "size", "inputs"]
    rows = {ln.split()[0] for ln in lines[2:2 + len(PIECES)]}
    assert rows == set(PIECES)
    assert "block_00_entropy  onnx/block_00_entropy.onnx" in stdout
    assert "x[Bp,n,128]f32" in stdout and "x[2*B,36,128]f32" in stdout
    assert f"{len(PIECES)} pieces" in stdout and "manifest: " in stdout


@pytest.mark.parametrize("name", PIECES)
def test_onnx_checker_full_check(manifest, name):
    onnx.checker.check_model(str(manifest.piece_path(name)), full_check=True)


# ------------------------------------------------------------------------------------------ manifest
def test_manifest_schema_and_hashes(manifest):
    raw = json.loads(manifest.path.read_text())
    jsonschema.Draft202012Validator.check_schema(SCHEMA)
    jsonschema.validate(raw, SCHEMA)
    verify(manifest)
    for name, pc in manifest["pieces"].items():
        assert pc["sha256"] == sha256_file(manifest.piece_path(name))
        assert pc["bytes"] == manifest.piece_path(name).stat().st_size
        assert pc["opset"] == 18 and pc["external_data"] == []
    assert raw["format"] == "toprovar-export/1"
    assert raw["model"]["name"] == "tiny" and raw["spec"]["head_dim"] == TINY.head_dim
    assert [tuple(s) for s in raw["schedule"]] == SCHEDULE and raw["preset"] == TINY.default_preset
    assert raw["dtype"] == "float32" and raw["engines"] == {}
    for key in ("toprovar", "torch", "onnx", "onnxruntime"):
        assert raw["versions"][key], key
    assert raw["versions"]["torch"] == torch.__version__
    assert raw["policy"]["name"] == "toprovar" and raw["policy"]["params"]["bucket"] >= 1
    assert raw["text_encoder"]["kind"] == "tiny" and raw["vae"]["name"] == "tiny"


def test_manifest_shapes_and_profiles(manifest):
    p = manifest["pieces"]
    blk = p["block_02_entropy"]
    shapes = {i["name"]: i["shape"] for i in blk["inputs"]}
    assert shapes["x"] == ["Bp", "n", TINY.width] and shapes["past_k"] == ["Bp", TINY.num_heads, "P", TINY.head_dim]
    assert [o["name"] for o in blk["outputs"]] == ["x_out", "k", "v", "entropy"]
    assert blk["custom_ops"] == ["toprovar::FlashAttentionEntropy"] and blk["layer"] == 2
    # one TensorRT profile per scale: tokens up to n_s, cache up to the scale's cumulative tokens
    assert len(blk["profiles"]) == len(SCHEDULE)
    past = 0
    for si, (h, w) in enumerate(SCHEDULE):
        prof = blk["profiles"][si]
        assert prof["x"]["min"][1] == 1 and prof["x"]["opt"][1] == prof["x"]["max"][1] == h * w
        assert prof["past_k"]["min"][2] == 0 and prof["past_k"]["max"][2] == past
        past += h * w
    head = p["head_s03"]
    assert {i["name"]: i["shape"] for i in head["inputs"]}["x"] == ["2*B", 36, TINY.width]
    assert head["outputs"] == [{"name": "bits", "shape": ["B", 36, TINY.token_bits], "dtype": "float32"}]
    assert {i["name"]: i["shape"] for i in p["head_s03_nocfg"]["inputs"]}["x"] == ["B", 36, TINY.width]
    assert [o["name"] for o in p["next_input_s06"]["outputs"]] == ["summed_out"]
    assert [o["name"] for o in p["next_input_s05"]["outputs"]] == ["summed_out", "x_next"]
    pol = p["policy_s04"]
    assert [(i["name"], i["shape"]) for i in pol["inputs"]] == [("entropy", [64]), ("phi_r", [1])]
    assert [(o["name"], o["dtype"]) for o in pol["outputs"]] == [("p_keep", "float32"), ("k", "int64"),
                                                                  ("order", "int64")]
    cond = {o["name"]: o["shape"] for o in p["condition_cfg"]["outputs"]}
    assert cond["ca_kv"] == ["2*B", "L", TINY.width] and cond["ca_lengths"] == ["2*B"]


def test_fae_node_and_local_function(manifest):
    for layer in range(TINY.depth):
        m = onnx.load(str(manifest.piece_path(f"block_{layer:02d}_entropy")))
        nodes = fae_onnx.fae_nodes(m)
        assert len(nodes) == 1
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in nodes[0].attribute}
        assert attrs == {"scale": 1.0, "head_mean": 1, "plugin_namespace": b"toprovar", "plugin_version": b"1"}
        assert [(f.domain, f.name) for f in m.functions] == [("toprovar", "FlashAttentionEntropy")]
        assert ("toprovar", 1) in [(o.domain, o.version) for o in m.opset_import]
        stripped = fae_onnx.strip_local_function(m)
        assert len(stripped.functions) == 0 and len(fae_onnx.fae_nodes(stripped)) == 1
        plain = onnx.load(str(manifest.piece_path(f"block_{layer:02d}")))
        assert fae_onnx.fae_nodes(plain) == [] and len(plain.functions) == 0


@pytest.mark.parametrize("head_mean", [0, 1])
@pytest.mark.parametrize("scale", [1.0, 0.37])
def test_fae_function_matches_reference(head_mean, scale):
    """The local function body alone (ONNX Runtime) vs the chunked float32 reference, any attributes."""
    import onnxruntime as ort
    from onnx import TensorProto, helper
    from toprovar.ops.reference import attention_entropy_reference
    node = helper.make_node(fae_onnx.OP_TYPE, ["q", "k", "v"], ["O", "H"], domain=fae_onnx.DOMAIN,
                            **fae_onnx.node_attributes(scale, bool(head_mean)))
    vi = lambda n, r: helper.make_tensor_value_info(n, TensorProto.FLOAT, [None] * r)  # noqa: E731
    g = helper.make_graph([node], "fae", [vi("q", 4), vi("k", 4), vi("v", 4)], [vi("O", 4), vi("H", 3 - head_mean)])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 18), helper.make_opsetid(fae_onnx.DOMAIN, 1)],
                          functions=[fae_onnx.function_proto(18)])
    onnx.checker.check_model(m, full_check=True)
    sess = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"])
    g_ = torch.Generator().manual_seed(3)
    for B, H, Nq, Nk, d in [(2, 2, 5, 9, 16), (1, 3, 1, 1, 8), (2, 2, 7, 40, 32)]:
        q, k, v = (torch.randn(B, H, n, d, generator=g_) * 3 for n in (Nq, Nk, Nk))
        o, h = sess.run(None, {"q": q.numpy(), "k": k.numpy(), "v": v.numpy()})
        ro, rh = attention_entropy_reference(q, k, v, scale)
        rh = rh.mean(1) if head_mean else rh
        np.testing.assert_allclose(o, ro.numpy(), atol=1e-5, rtol=1e-5)
        np.testing.assert_allclose(h, rh.numpy(), atol=1e-5, rtol=1e-5)


# ------------------------------------------------------------------------------------------ ORT vs PyTorch
@pytest.mark.parametrize("name", PIECES)
def test_onnxruntime_matches_pytorch(manifest, specs, name):
    """polygraphy Comparator: the piece's PyTorch module vs ONNX Runtime on the exported file, float32;
    several token counts / cache lengths / batches for the dynamic pieces; tolerances: compare.TOLERANCES."""
    spec = specs[name]
    feeds = piece_feeds(spec, manifest["pieces"][name], manifest["spec"] | manifest["model"], SCHEDULE)
    if spec.kind == "block":
        assert sorted({f["x"].shape[1] for f in feeds}) == sorted({c[1] for c in block_cases(SCHEDULE)})
        assert len({f["past_k"].shape[2] for f in feeds}) >= 4 and any(f["past_k"].shape[2] == 0 for f in feeds)
    ok, results = compare_piece(manifest, name, spec, feeds)
    assert ok, f"{name}: ONNX Runtime differs from PyTorch beyond {TOLERANCES[spec.kind]}"
    assert len(results[0][1]) == len(feeds) >= 2


def test_head_cfg_mixing_equals_pytorch_bits(manifest, specs):
    """Sampling from given uniform noise: bit-identical bits at every scale, CFG and no-CFG heads."""
    import onnxruntime as ort
    for si in (0, 3, 6):
        for suffix in ("", "_nocfg"):
            name = f"head_s{si:02d}{suffix}"
            sess = ort.InferenceSession(str(manifest.piece_path(name)), providers=["CPUExecutionProvider"])
            for feed in piece_feeds(specs[name], manifest["pieces"][name], manifest["spec"] | manifest["model"],
                                    SCHEDULE):
                (bits,) = sess.run(None, feed)
                ref = specs[name].module(*[torch.from_numpy(feed[k]) for k in specs[name].inputs])
                assert np.array_equal(bits, ref.numpy()) and set(np.unique(bits)) <= {0.0, 1.0}


# ------------------------------------------------------------------------------------------ formats
def test_external_data_for_large_pieces(tmp_path, specs):
    """Pieces over the threshold (2 GB by default; 0 here) keep weights in <piece>.onnx.data."""
    out, name = tmp_path / "ext", "head_s02_nocfg"
    m = export_model(ExportRequest(model="tiny", out=str(out), only=[name], external_data_threshold=0,
                                   progress=False))
    man = load_manifest(out)
    ext = man["pieces"][name]["external_data"]
    assert [e["file"] for e in ext] == [f"onnx/{name}.onnx.data"] and ext[0]["bytes"] > 100_000
    assert list(m["pieces"]) == [name]
    verify(man)
    onnx.checker.check_model(str(man.piece_path(name)), full_check=True)
    ok, _ = compare_piece(man, name, specs[name])
    assert ok
    data = out / "onnx" / f"{name}.onnx.data"
    data.write_bytes(data.read_bytes()[:-100])
    with pytest.raises(ManifestError, match=r"external data.*truncated"):
        verify(man)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_half_precision_export(tmp_path, dtype):
    """k/v and ca_kv in the export dtype, residual stream and entropy float32 (explicit casts)."""
    out = tmp_path / dtype
    export_model(ExportRequest(model="tiny", out=str(out), dtype=dtype, only=["block_00_entropy"], progress=False))
    man = load_manifest(out)
    pc = man["pieces"]["block_00_entropy"]
    dts = {t["name"]: t["dtype"] for t in pc["inputs"] + pc["outputs"]}
    assert dts == {"x": "float32", "ada": "float32", "ca_kv": dtype, "ca_lengths": "int32", "rope": "float32",
                   "past_k": dtype, "past_v": dtype, "x_out": "float32", "k": dtype, "v": dtype, "entropy": "float32"}
    assert man["dtype"] == dtype
    path = str(man.piece_path("block_00_entropy"))
    onnx.checker.check_model(path, full_check=True)
    m = onnx.load(path)
    assert any(n.op_type == "Cast" for n in m.graph.node)
    if dtype == "float16":  # ONNX Runtime's CPU provider has float16 MatMul (not bfloat16)
        _, sp = build_specs(ExportRequest(model="tiny", out=str(out), dtype=dtype, only=["block_00_entropy"]))
        feeds = piece_feeds(sp[0], pc, man["spec"] | man["model"], SCHEDULE)[:3]
        from polygraphy.backend.onnxrt import OnnxrtRunner, SessionFromOnnx
        from toprovar.export.compare import TorchRunner
        import toprovar.export.compare as cmp
        old = cmp.TOLERANCES["block"]
        cmp.TOLERANCES["block"] = {o: (5e-3, 5e-3) for o in old}
        try:
            ok, _ = compare_runners([TorchRunner(sp[0], pc), OnnxrtRunner(SessionFromOnnx(path))], sp[0], feeds)
        finally:
            cmp.TOLERANCES["block"] = old
        assert ok


def test_pieces_option_merges_into_existing_manifest(tmp_path, exported):
    out = _copy(exported[0], tmp_path / "merge")
    before = load_manifest(out)
    export_model(ExportRequest(model="tiny", out=str(out), only=["policy_s01"], progress=False))
    after = load_manifest(out)
    assert list(after["pieces"]) == list(before["pieces"])
    verify(after)


def test_interrupted_piece_leaves_nothing(tmp_path, specs, monkeypatch):
    """Files are written under a temporary directory and renamed only when complete."""
    def boom(*a, **k):
        raise RuntimeError("simulated failure")
    monkeypatch.setattr(onnx.checker, "check_model", boom)
    with pytest.raises(ExportError, match="fails onnx.checker"):
        export_piece(specs["policy_s00"], tmp_path / "onnx", tmp_path)
    assert list((tmp_path / "onnx").iterdir()) == []


# ------------------------------------------------------------------------------------------ errors
def _one_line(msg: str) -> str:
    assert "\n" not in msg.strip(), msg
    return msg


def test_corrupted_piece_is_refused(tmp_path, exported):
    out = _copy(exported[0], tmp_path / "corrupt")
    p = out / "onnx" / "block_01.onnx"
    data = bytearray(p.read_bytes())
    data[len(data) // 2] ^= 0xFF
    p.write_bytes(bytes(data))
    with pytest.raises(ManifestError) as ei:
        verify(load_manifest(out))
    assert "block_01" in _one_line(str(ei.value)) and "sha256 mismatch" in str(ei.value)
    rc, _, err = run_cli(["--skip-export", "--out", str(out)])
    assert rc == cli.EXIT_INPUT and err.startswith("toprovar-export: error: piece block_01") and err.count("\n") == 1
    p.write_bytes(b"\x08\x07garbage")
    with pytest.raises(ExportError, match="not a readable ONNX model"):
        load_onnx_checked(p)


def test_truncated_piece_is_refused(tmp_path, exported):
    out = _copy(exported[0], tmp_path / "trunc")
    p = out / "onnx" / "head_s02.onnx"
    p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])
    with pytest.raises(ManifestError, match=r"piece head_s02: .* is truncated") as ei:
        verify(load_manifest(out))
    _one_line(str(ei.value))
    with pytest.raises(ExportError) as ei:
        load_onnx_checked(p)
    _one_line(str(ei.value))


def test_manifest_hash_mismatch_and_schema_errors(tmp_path, exported):
    out = _copy(exported[0], tmp_path / "badmanifest")
    mp = out / "manifest.json"
    raw = json.loads(mp.read_text())
    raw["pieces"]["condition"]["sha256"] = "0" * 64
    mp.write_text(json.dumps(raw))
    with pytest.raises(ManifestError, match="piece condition: .* sha256 mismatch") as ei:
        verify(load_manifest(out))
    _one_line(str(ei.value))
    raw["pieces"]["condition"]["sha256"] = "not-a-hash"
    mp.write_text(json.dumps(raw))
    with pytest.raises(ManifestError, match="schema violation at pieces/condition/sha256") as ei:
        load_manifest(out)
    _one_line(str(ei.value))
    mp.write_text("{ truncated")
    with pytest.raises(ManifestError, match="not valid JSON"):
        load_manifest(out)
    with pytest.raises(ManifestError, match="no such export directory"):
        load_manifest(tmp_path / "nowhere")


def test_missing_plugin_library(tmp_path, manifest, monkeypatch):
    missing = tmp_path / "libnothere.so"
    with pytest.raises(engine.PluginError) as ei:
        engine.plugin_paths([str(missing)])
    assert _one_line(str(ei.value)).startswith(f"--plugin: FAE TensorRT plugin library not found: {missing}")
    monkeypatch.setenv(engine.PLUGIN_ENV, str(missing))
    with pytest.raises(engine.PluginError, match=r"\$TOPROVAR_FAE_PLUGIN: FAE TensorRT plugin library not found"):
        engine.build_engines(manifest, plugins=None, progress=False)  # checked before TensorRT is imported
    monkeypatch.delenv(engine.PLUGIN_ENV)
    assert engine.plugin_paths(None) == []  # no library: the FAE pieces are built from the function body


def test_cli_without_tensorrt_says_so_in_one_line(exported):
    try:
        engine.import_tensorrt()
        pytest.skip("TensorRT is importable here")
    except engine.TensorRTUnavailable:
        pass
    rc, stdout, err = run_cli(["--skip-export", "--engines", "--out", str(exported[0]), "--no-progress"])
    assert rc == cli.EXIT_NO_TENSORRT and rc != 0
    assert err.count("\n") == 1
    assert err.startswith("toprovar-export: error: TensorRT is not importable (tensorrt: ")
    assert err.rstrip().endswith("; ONNX export is done, engines were not built")
    assert "block_00_entropy" in stdout  # the ONNX side was reported first


@pytest.mark.parametrize("argv,match", [(["--opset", "17"], "--opset"), (["--resolution", "1000"], "resolution"),
                                        (["--calibration", "/nonexistent.json"], "--calibration")])
def test_cli_bad_input_one_line(tmp_path, argv, match):
    rc, _, err = run_cli(["--model", "tiny", "--out", str(tmp_path / "x"), "--no-progress", *argv])
    assert rc == cli.EXIT_INPUT and err.count("\n") == 1 and match in err


# ------------------------------------------------------------------------------------------ engines
# Real TensorRT-RTX builds of every piece: tests/test_engines.py. TensorRT 11 engines against ONNX Runtime
# (below) need TensorRT and the GPU the engines are built on.
TRT_PIECES = ["block_00", "block_00_entropy", "condition_cfg", "head_s03", "head_s03_nocfg", "next_input_s03",
              "policy_s03", "text_encoder", "vae_decoder"]


@pytest.fixture(scope="session")
def trt_export(exported, tmp_path_factory):
    """TensorRT 11 engines for TRT_PIECES (real TensorRT and a CUDA GPU; the FAE plugin when
    $TOPROVAR_FAE_PLUGIN names one, else the function body; else skip with why)."""
    try:
        engine.import_tensorrt("tensorrt")
        plugins = engine.plugin_paths(None)
        engine.gpu_name()
    except engine.EngineError as exc:
        pytest.skip(str(exc))
    except engine.TensorRTUnavailable as exc:
        pytest.skip(str(exc))
    out = _copy(exported[0], tmp_path_factory.mktemp("trt") / "tiny")
    engine.build_engines(load_manifest(out), plugins=[str(p) for p in plugins] or None, names=TRT_PIECES,
                         progress=False)
    return load_manifest(out), plugins


@pytest.mark.parametrize("name", TRT_PIECES)
def test_tensorrt_matches_onnxruntime(trt_export, specs, name):
    from toprovar.export.compare import compare_trt_ort
    man, plugins = trt_export
    if name.endswith("_entropy"):
        assert man["engines"][name]["plugin_layers"] == (1 if plugins else 0)
    ok, _ = compare_trt_ort(man, name, specs[name], plugins)
    assert ok, f"{name}: TensorRT differs from ONNX Runtime"


def test_calibration_sets_policy_and_token_minimum(tmp_path):
    """--calibration: the policy pieces use its parameters; the block profiles start at its minimum."""
    from toprovar.policy.base import CALIBRATION_FORMAT
    from toprovar.policy.stats import min_kept
    cal = tmp_path / "cal.json"
    cal.write_text(json.dumps({"format": CALIBRATION_FORMAT, "model": "tiny", "depth": TINY.depth,
                               "policy": {"a_max": 0.8, "k_min": 0.25, "bucket": 4}}))
    header, sp = build_specs(ExportRequest(model="tiny", out=str(tmp_path / "x"), calibration=str(cal),
                                           only=["block_00", "policy_s03"]))
    assert [s.name for s in sp] == ["block_00", "policy_s03"]
    mins = [min_kept(h * w, 0.25, 4) for h, w in SCHEDULE]
    assert header["min_tokens"] == mins and header["policy"]["params"]["a_max"] == 0.8
    assert header["policy"]["calibration"]["sha256"] == sha256_file(cal)
    assert [p["x"][0][1] for p in sp[0].profiles] == mins  # (min, opt, max) shapes
    jsonschema.validate({**header, "pieces": {}}, SCHEMA)
    pol = sp[1].module
    assert float(pol.a_max) == pytest.approx(0.8) and pol.bucket == 4


def test_scenes_model_exports_and_matches_pytorch(tmp_path):
    """The 256 px scenes model (16 layers of width 512, 10 scales up to 32x32) exports from a weights directory
    (fresh random weights saved as tools/train_small.py saves them, bfloat16): its first block with and without
    entropy, the last scale's head / next input / policy pieces and the 256 px VAE decoder, each equal to its
    PyTorch module on ONNX Runtime within compare.TOLERANCES (block cases up to the 32x32 scale's 1024 tokens)."""
    from toprovar.model.checkpoint import save_state_dict
    from toprovar.model.infinity import build_model
    from toprovar.model.text import tiny_text_encoder
    from toprovar.model.vae import BSQAutoencoder
    cfg = get_config("scenes")
    seed = int(np.random.SeedSequence().entropy % 2**31)
    weights = tmp_path / "weights"
    weights.mkdir()
    torch.manual_seed(seed)
    save_state_dict(build_model(cfg, seed=seed), weights / "model.safetensors", dtype=torch.bfloat16)
    save_state_dict(BSQAutoencoder(cfg.vae), weights / "vae.safetensors", dtype=torch.bfloat16)
    save_state_dict(tiny_text_encoder(cfg.text_channels, cfg.text_maxlen, seed=seed).encoder,
                    weights / "text_encoder.safetensors", dtype=torch.bfloat16)
    schedule = get_schedule(cfg.default_preset)
    last = len(schedule) - 1
    only = ["block_00", "block_00_entropy", f"head_s{last:02d}", f"next_input_s{last:02d}", f"policy_s{last:02d}",
            "vae_decoder"]
    out = tmp_path / "export"
    req = dict(model="scenes", weights=str(weights), out=str(out))
    export_model(ExportRequest(**req, only=only, progress=False))
    manifest = load_manifest(out)
    assert sorted(manifest["pieces"]) == sorted(only)
    _, sp = build_specs(ExportRequest(**req))
    specs = {s.name: s for s in sp}
    for name in only:
        feeds = piece_feeds(specs[name], manifest["pieces"][name], manifest["spec"] | manifest["model"], schedule)
        ok, _ = compare_piece(manifest, name, specs[name], feeds)
        assert ok, f"seed {seed}: {name}: ONNX Runtime differs from PyTorch beyond {TOLERANCES[specs[name].kind]}"
