"""The PyTorch backend's block options (``text_kv_once``, ``cache_writes_inside``) against the old path
(both off), through the orchestrator on the tiny model (CPU, float32): the same math in the same order, so
the same bits and images, bit for bit; the precomputed text K/V rows follow the ``ca_kv`` views the
orchestrator hands the blocks; ``bench/small_scales.py`` runs on the CPU."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from toprovar.benchmark.e2e import build_policy
from toprovar.config import get_config
from toprovar.model import families
from toprovar.model.loading import load_parts
from toprovar.pipeline import model_spec, resolve_schedule
from toprovar.runtime.orchestrator import Orchestrator
from toprovar.runtime.torch_backend import TorchBackend

ROOT = Path(__file__).resolve().parents[1]
OPTIONS = {"old": dict(text_kv_once=False, cache_writes_inside=False),
           "kv-once": dict(text_kv_once=True, cache_writes_inside=False),
           "writes-inside": dict(text_kv_once=False, cache_writes_inside=True),
           "both (default)": {}}


@pytest.fixture(scope="module")
def tiny():
    cfg = get_config("tiny")
    parts = load_parts("tiny", seed=int(torch.randint(0, 2**31 - 1, ()).item()), text_encoder=False)
    sched = resolve_schedule(cfg, None, 1.0)
    return cfg, parts, sched


def _orchestrator(tiny, **opts):
    cfg, parts, sched = tiny
    return Orchestrator(TorchBackend(parts.model, parts.decoder, sched, **opts), model_spec(cfg), sched,
                        families.ropes_for(cfg, sched))


# none: every layer on all rows; toprovar (pinned): per-prompt kept sets, each prompt's rows a strided view
# (rows b, B + b) of ca_kv; skipvar: the unconditional rows dropped at the last scales (ca_kv[:B])
@pytest.mark.parametrize("policy", ["none", "toprovar", "skipvar"])
def test_options_same_bits_and_images_as_the_old_path(tiny, policy):
    cfg, _, sched = tiny
    g = torch.Generator().manual_seed(int(torch.randint(0, 2**31 - 1, ()).item()))
    B = 2
    text = torch.randn(B, 6, cfg.text_channels, generator=g)
    lengths = torch.tensor([6, 3], dtype=torch.int32)
    results = {}
    for name, opts in OPTIONS.items():
        orch = _orchestrator(tiny, **opts)
        results[name] = orch.generate(text, lengths, seed=[3, 11], cfg=3.0, tau=0.5, progress=False,
                                      policy=build_policy(policy, cfg.depth, None, len(sched)))
    ref = results["old"]
    if policy == "toprovar":
        assert any(k < ref.trace.tokens[si] for si, ks in ref.trace.kept.items() for k in ks)
    if policy == "skipvar":
        assert not all(ref.trace.cfg_batch.values())
    for name, got in results.items():
        assert got.trace.kept == ref.trace.kept, name
        assert all(torch.equal(a, b) for a, b in zip(got.bits, ref.bits)), name
        assert torch.equal(got.images, ref.images), name


def test_text_kv_rows_follow_the_ca_kv_views(tiny):
    """Rows of the precomputed projection for every view the orchestrator makes of ca_kv, float64 reference
    of ``ca.kv_proj`` on those rows; a tensor that is not a view of the condition's ca_kv gets None."""
    cfg, parts, sched = tiny
    be = TorchBackend(parts.model, parts.decoder, sched)
    B = 3
    text = torch.randn(B, 5, cfg.text_channels)
    _, _, ca_kv, _, _ = be.condition(text, torch.tensor([5, 2, 4], dtype=torch.int32), True)
    views = {"all": ca_kv, "cond rows": ca_kv[:B], "prompt 1": ca_kv[1::B], "prompt 2 cond": ca_kv[2:3]}
    for layer in (0, cfg.depth - 1):
        ca = parts.model.blocks[layer].ca
        ref_ca = type(ca)(cfg.width, cfg.width, cfg.num_heads).double()
        ref_ca.load_state_dict(ca.state_dict())
        for name, view in views.items():
            got = be._text_kv_rows(layer, view)
            assert got is not None and got.shape == (view.shape[0], view.shape[1], 2 * cfg.width), name
            torch.testing.assert_close(got.double(), ref_ca.kv_proj(view.double()), atol=1e-5, rtol=1e-5,
                                       msg=lambda m: f"{name} layer {layer}: {m}")
    assert be._text_kv_rows(0, ca_kv.clone()) is None


def test_small_scales_bench_runs_on_cpu(tmp_path):
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "small_scales.py"), "--model", "tiny", "--device",
                           "cpu", "--runs", "1", "--scales", "0,2", "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    data = json.loads((tmp_path / "small_scales_tiny.json").read_text())
    assert [e["scale"] for e in data["scales"]] == [0, 2] and not data["skipped"]
    for e in data["scales"]:
        assert set(e["ms"]) == {"baseline", "+kv-once", "+compiled-writes", "+one-graph"}
        assert e["floor_w_ms"] > 0 and e["floor_bytes_ms"] > e["floor_w_ms"] and e["floor_flop_ms"] > 0
    assert "| 2 |" in (tmp_path / "small_scales_tiny.md").read_text()
    bad = subprocess.run([sys.executable, str(ROOT / "bench" / "small_scales.py"), "--model", "tiny", "--device",
                          "cpu", "--scales", "99", "--out", str(tmp_path / "bad")], capture_output=True, text=True,
                         timeout=300)
    assert bad.returncode != 0 and "--scales" in bad.stderr and not (tmp_path / "bad").exists()
