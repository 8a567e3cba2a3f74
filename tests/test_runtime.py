"""Runtime over an export directory: ONNX Runtime and PyTorch backends against each other and against the
PyTorch pipeline, buffer reuse and host reads, and the runtime's one-line errors.

The tiny model is exported once for this module (``toprovar.export``, float32, CFG pieces only) into a
temporary directory; every test reuses it.
"""
from __future__ import annotations

import collections
import shutil
import sys

import numpy as np
import pytest
import torch
from PIL import Image
from torch.overrides import TorchFunctionMode

pytest.importorskip("onnxruntime")
pytest.importorskip("onnx")

from toprovar.cli import main  # noqa: E402
from toprovar.export.manifest import ManifestError, load_manifest  # noqa: E402
from toprovar.model.text import PromptTooLongError  # noqa: E402
from toprovar.pipeline import Pipeline  # noqa: E402
from toprovar.policy import make_policy  # noqa: E402
from toprovar.runtime.buffers import OutOfMemoryAtScale  # noqa: E402
from toprovar.runtime.engine_dir import EngineDirError, EngineRuntime  # noqa: E402
from toprovar.schedule import ScheduleError  # noqa: E402

PIECES = ["text_encoder", "condition_cfg", "block_*", "head_s[0-9][0-9]", "next_input_*", "vae_decoder"]
PROMPTS = [(["a red square left of a blue circle"], 1), (["two green triangles", "a yellow cat"], 5)]


@pytest.fixture(scope="module")
def export_dir(tmp_path_factory):
    from toprovar.export.onnx_export import ExportRequest, export_model
    out = tmp_path_factory.mktemp("export") / "tiny"
    export_model(ExportRequest(model="tiny", out=str(out), weights_seed=0, progress=False, only=PIECES,
                               max_batch_size=8))
    return out


@pytest.fixture(scope="module")
def ort_rt(export_dir):
    return EngineRuntime.open(export_dir, "onnxruntime", "cpu")


@pytest.fixture(scope="module")
def torch_rt(export_dir):
    return EngineRuntime.open(export_dir, "torch", "cpu")


@pytest.fixture(scope="module")
def pipe():
    return Pipeline.load("tiny", seed=0)


def _same_bits(a, b) -> list[bool]:
    assert len(a.bits) == len(b.bits)
    return [torch.equal(x, y) for x, y in zip(a.bits, b.bits)]


# ------------------------------------------------------------------------------------------ batches
BATCH = ["a red fox", "two green triangles on a long grey road at night", "cat", "a yellow circle", "x",
         "blue sky over the sea", "a", "an orange square"]


@pytest.mark.parametrize("backend,policy", [("onnxruntime", "none"), ("onnxruntime", "pinned"), ("torch", "none")])
def test_engine_dir_row_alone_or_in_a_batch_of_8_same_bits_and_image(ort_rt, torch_rt, backend, policy):
    from toprovar.benchmark.e2e import operating_point
    from toprovar.policy import ToProVARConfig, ToProVARPolicy
    rt = ort_rt if backend == "onnxruntime" else torch_rt
    make = (lambda: ToProVARPolicy(ToProVARConfig(stage="full", **operating_point(rt.cfg.depth, len(rt.schedule))))
            ) if policy == "pinned" else (lambda: make_policy(policy))
    seeds = [int(s) for s in torch.randint(0, 2**31 - 1, (8,))]
    cfgs = [3.0] * 6 + [1.5, 3.0]
    batch = rt.generate(BATCH, seed=seeds, policy=make(), progress=False, row_cfg=cfgs)
    for b in (6, 7):
        alone = rt.generate([BATCH[b]], seed=seeds[b], policy=make(), progress=False, row_cfg=[cfgs[b]])
        assert all(torch.equal(x[b:b + 1], y) for x, y in zip(batch.bits, alone.bits)), (backend, policy, b)
        assert torch.equal(batch.images[b:b + 1], alone.images), (backend, policy, b)


def test_engine_dir_batch_over_the_export_limit_is_one_line(ort_rt):
    with pytest.raises(EngineDirError, match=r"^--prompt: a batch of 9 prompts exceeds this export's largest batch 8 "
                                             r"\(.*\); re-export with toprovar-export --max-batch-size 9$"):
        ort_rt.generate(BATCH + ["y"], seed=1, progress=False)


# ------------------------------------------------------------------------------------------ equivalence
@pytest.mark.parametrize("policy", ["none", "toprovar"])
def test_onnxruntime_and_torch_backends_sample_the_same_bits(ort_rt, torch_rt, policy):
    pruned = 0
    for prompts, seed in PROMPTS:
        a = ort_rt.generate(prompts, seed=seed, policy=make_policy(policy), progress=False)
        b = torch_rt.generate(prompts, seed=seed, policy=make_policy(policy), progress=False)
        assert all(_same_bits(a, b)), f"{policy} seed {seed}: per-scale equality {_same_bits(a, b)}"
        assert a.trace.kept == b.trace.kept
        torch.testing.assert_close(a.images, b.images, atol=1e-4, rtol=0)  # float32 VAE decode, other kernels
        pruned += sum(k < a.trace.tokens[si] for si, ks in a.trace.kept.items() for k in ks)
    if policy == "toprovar":
        assert pruned > 0, "the ToProVAR policy pruned nothing: the comparison does not cover pruned layers"


@pytest.mark.parametrize("policy", ["none", "toprovar"])
def test_runtime_equals_pytorch_pipeline(ort_rt, torch_rt, pipe, policy):
    for prompts, seed in PROMPTS:
        ref = pipe.generate(prompts, seed=seed, policy=make_policy(policy), progress=False)
        t = torch_rt.generate(prompts, seed=seed, policy=make_policy(policy), progress=False)
        o = ort_rt.generate(prompts, seed=seed, policy=make_policy(policy), progress=False)
        assert all(_same_bits(t, ref)) and torch.equal(t.images, ref.images)  # same modules: bit for bit
        assert all(_same_bits(o, ref)) and o.trace.kept == ref.trace.kept
        np.testing.assert_allclose(o.images.numpy(), ref.images.numpy(), atol=1e-4)


def test_cli_engine_dir_writes_png_and_report(export_dir, pipe, tmp_path, capsys):
    outs = {}
    for backend in ("onnxruntime", "torch"):
        out = tmp_path / f"{backend}.png"
        assert main(["generate", "--engine-dir", str(export_dir), "--backend", backend, "--prompt", "a red fox",
                     "--seed", "3", "-o", str(out), "--profile"]) == 0
        cap = capsys.readouterr()
        assert str(out) in cap.out
        assert "kept%" in cap.err and f"backend {backend} on cpu" in cap.err
        rows = [ln.split() for ln in cap.err.splitlines() if ln.split()[:1] and ln.split()[0].isdigit()]
        assert len([r for r in rows if len(r) == 5]) == 7  # scale, tokens, kept%, cfg, ms per scale
        outs[backend] = np.asarray(Image.open(out)).astype(int)
    ref = tmp_path / "pipeline.png"
    assert main(["generate", "--model", "tiny", "--prompt", "a red fox", "--seed", "3", "-o", str(ref)]) == 0
    ref_img = np.asarray(Image.open(ref)).astype(int)
    assert np.array_equal(outs["torch"], ref_img)
    assert np.abs(outs["onnxruntime"] - ref_img).max() <= 1  # float32 decode differs by ~1e-6 before rounding


# ------------------------------------------------------------------------------------------ buffers and reads
class _CountReads(TorchFunctionMode):
    """Counts device-to-host reads (item, tolist, bool/int/float of a tensor, numpy) by calling file."""

    READS = {torch.Tensor.item, torch.Tensor.tolist, torch.Tensor.__bool__, torch.Tensor.__int__,
             torch.Tensor.__float__, torch.Tensor.__index__, torch.Tensor.numpy, torch.equal}

    def __init__(self):
        super().__init__()
        self.by_file = collections.Counter()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func in self.READS:
            f = sys._getframe(1)
            while f is not None and "/torch/" in f.f_code.co_filename:
                f = f.f_back
            self.by_file[(func.__name__, f.f_code.co_filename if f else "?")] += 1
        return func(*args, **(kwargs or {}))


def test_no_host_reads_in_the_runtime(ort_rt):
    text, lengths = ort_rt.encode(["a red square", "a blue circle"])
    with _CountReads() as none_reads:
        ort_rt.generate_from_features(text, lengths, seed=2, policy=make_policy("none"), progress=False)
    assert not none_reads.by_file, dict(none_reads.by_file)  # unpruned: no read at all
    with _CountReads() as reads:
        res = ort_rt.generate_from_features(text, lengths, seed=2, policy=make_policy("toprovar"), progress=False)
    runtime = {k: v for k, v in reads.by_file.items() if "/runtime/" in k[1]}
    assert not runtime, runtime  # the orchestrator and backends never read; the policy reads its kept count
    pruned = sum(k < res.trace.tokens[si] for si, ks in res.trace.kept.items() for k in ks)
    items = sum(v for (fn, _), v in reads.by_file.items() if fn == "item")
    assert 0 < pruned and items <= pruned


def test_buffers_reused_across_scales_and_calls(ort_rt):
    orch, be = ort_rt.orchestrator, ort_rt.backend
    text, lengths = ort_rt.encode(["a red square"])
    ort_rt.generate_from_features(text, lengths, seed=1, progress=False)  # warm-up: buffers sized
    seen = {}
    begin = be.begin_scale

    def spy(si):
        if si == 1:
            seen["grows"] = (orch.ws.grows, be.ws.grows)
        begin(si)

    be.begin_scale = spy
    try:
        ptrs = [orch.ws.view(name, (1,), be.dtype).data_ptr() for name in ("cache_k", "cache_v")]
        before = (orch.ws.grows, be.ws.grows)
        ort_rt.generate_from_features(text, lengths, seed=1, policy=make_policy("toprovar"), progress=False)
        assert (orch.ws.grows, be.ws.grows) == before  # second call: no new device buffer at all
        assert ptrs == [orch.ws.view(name, (1,), be.dtype).data_ptr() for name in ("cache_k", "cache_v")]
        # a fresh runtime: after the first scale nothing is allocated in the loop (sizes reserved up front)
        fresh = EngineRuntime.open(ort_rt.manifest.root, "onnxruntime", "cpu")
        seen.clear()
        b2 = fresh.backend
        begin2 = b2.begin_scale

        def spy2(si):
            if si == 1:
                seen["grows"] = (fresh.orchestrator.ws.grows, b2.ws.grows)
            begin2(si)

        b2.begin_scale = spy2
        fresh.generate_from_features(text, lengths, seed=1, policy=make_policy("toprovar"), progress=False)
        assert seen["grows"] == (fresh.orchestrator.ws.grows, b2.ws.grows)
    finally:
        be.begin_scale = begin


# ------------------------------------------------------------------------------------------ errors
def _one_line_cli_error(capsys, argv) -> str:
    assert main(argv) == 2
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("toprovar: error:")]
    assert len(err) == 1, err
    return err[0]


def test_error_unknown_backend(export_dir, capsys):
    with pytest.raises(EngineDirError, match="unknown backend 'tensorflow'; choose from trt, onnxruntime, torch"):
        EngineRuntime.open(export_dir, "tensorflow")
    msg = _one_line_cli_error(capsys, ["generate", "--engine-dir", str(export_dir), "--backend", "nope",
                                       "--prompt", "x"])
    assert "unknown backend 'nope'" in msg
    assert "needs --engine-dir" in _one_line_cli_error(capsys, ["generate", "--backend", "onnxruntime",
                                                               "--prompt", "x"])


def test_error_prompt_too_long_and_resolution(ort_rt, export_dir, capsys):
    with pytest.raises(PromptTooLongError, match="exceed the tiny .* limit of 64"):
        ort_rt.generate(["x" * 100], progress=False)
    with pytest.raises(ScheduleError, match=r"--resolution: 1024 is not in this export's schedule \(exported for 64px"):
        ort_rt.generate(["x"], resolution=1024, progress=False)
    with pytest.raises(ScheduleError, match="--h-div-w: 2 is not in this export's schedule"):
        ort_rt.generate(["x"], h_div_w=2.0, progress=False)
    assert "exceed" in _one_line_cli_error(capsys, ["generate", "--engine-dir", str(export_dir), "--backend",
                                                    "onnxruntime", "--prompt", "y" * 100])
    assert "--resolution: 512 is not in this export's schedule" in _one_line_cli_error(
        capsys, ["generate", "--engine-dir", str(export_dir), "--backend", "onnxruntime", "--prompt", "x",
                 "--resolution", "512"])


def test_error_stale_piece_refused(export_dir, tmp_path, capsys):
    bad = tmp_path / "bad"
    shutil.copytree(export_dir, bad)
    piece = load_manifest(bad).piece_path("block_02")
    data = bytearray(piece.read_bytes())
    data[len(data) // 2] ^= 0xFF  # same size, other bytes
    piece.write_bytes(bytes(data))
    rt = EngineRuntime.open(bad, "onnxruntime", "cpu")
    with pytest.raises(ManifestError, match="block_02.*sha256 mismatch"):
        rt.generate(["x"], progress=False)
    msg = _one_line_cli_error(capsys, ["generate", "--engine-dir", str(bad), "--backend", "onnxruntime",
                                       "--prompt", "x", "-o", str(tmp_path / "x.png")])
    assert "sha256 mismatch" in msg
    (bad / "manifest.json").write_text((bad / "manifest.json").read_text().replace('"toprovar-export/1"',
                                                                                   '"toprovar-export/0"'))
    assert "is not 'toprovar-export/1'" in _one_line_cli_error(
        capsys, ["generate", "--engine-dir", str(bad), "--backend", "onnxruntime", "--prompt", "x"])


class _OOMAt:
    """Wraps a backend; raises the given out-of-memory exception in the first block call at scale ``si``."""

    def __init__(self, be, si, exc):
        self.be, self.si, self.exc, self.cur = be, si, exc, 0

    def __getattr__(self, k):
        return getattr(self.be, k)

    def begin_scale(self, si):
        self.cur = si
        if hasattr(self.be, "begin_scale"):
            self.be.begin_scale(si)

    def block(self, *a, **kw):
        if self.cur == self.si:
            raise self.exc
        return self.be.block(*a, **kw)


@pytest.mark.parametrize("exc,nbytes", [
    (torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has a total capacity of "
                            "79.19 GiB of which 1.00 GiB is free."), 2 * 2 ** 30),
    (RuntimeError("[enforce fail at alloc_cpu.cpp:117] data. DefaultCPUAllocator: not enough memory: you tried "
                  "to allocate 123456789 bytes."), 123456789),
    (RuntimeError("[ONNXRuntimeError] : 6 : RUNTIME_EXCEPTION : Failed to allocate memory for requested buffer "
                  "of size 987654"), 987654),
])
def test_error_out_of_memory_names_scale_and_bytes(ort_rt, exc, nbytes):
    orch = ort_rt.orchestrator
    be = orch.backend
    orch.backend = _OOMAt(be, 5, exc)
    try:
        with pytest.raises(OutOfMemoryAtScale) as info:
            ort_rt.generate(["x"], progress=False)
    finally:
        orch.backend = be
    msg = str(info.value)
    assert "\n" not in msg and msg.startswith("out of memory at scale 5 (12x12, 144 tokens, batch 2)")
    assert f"({nbytes} bytes) asked" in msg and info.value.nbytes == nbytes


def test_error_out_of_memory_preallocating_cache(ort_rt, monkeypatch):
    from toprovar.runtime import buffers

    class NoMemory(buffers.Workspace):
        def reserve(self, name, numel, dtype):
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 64.00 MiB.")

    orch = ort_rt.orchestrator
    monkeypatch.setattr(orch, "ws", NoMemory(orch.ws.device))
    with pytest.raises(OutOfMemoryAtScale, match=r"preallocating the KV cache for 7 scales \(521 tokens, batch 2\)"
                                                 r": .* \(\d+ bytes\) asked"):
        ort_rt.generate(["x"], progress=False)


def test_error_torch_backend_needs_checkpoint(export_dir, tmp_path):
    import json
    d = tmp_path / "ck"
    shutil.copytree(export_dir, d)
    m = json.loads((d / "manifest.json").read_text())
    m["checkpoint"] = {"file": "infinity_2b_reg.pth"}
    m["random_weights"] = False
    (d / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(EngineDirError, match="made from checkpoint 'infinity_2b_reg.pth'; pass --checkpoint"):
        EngineRuntime.open(d, "torch", "cpu")


def test_error_missing_piece(export_dir, ort_rt):
    # the module's export has no CFG-free pieces (`condition`, `head_sXX_nocfg`): cfg=1 needs them
    with pytest.raises(ValueError, match=r"piece 'condition' is not in this export .*re-run toprovar-export"):
        ort_rt.generate(["x"], cfg=1.0, progress=False)
