"""Real TensorRT-RTX engines of hart-tiny's export pieces, built on this machine's CPU for sm89 (optimization
level 0, like tests/test_engines.py does for the Infinity pieces): a block, a head of the first and of the last
scale (with its ``hard`` output), a next-scale input and the diffusion head; each engine's I/O names, dtypes and
every optimization profile's min/opt/max are checked against the manifest (the builder's report), the manifest
records each engine with its sha256. Uses the session's hart-tiny export (tests/conftest.py), copied. Skips with
the reason where TensorRT-RTX is not installed."""
from __future__ import annotations

import shutil

import pytest

from toprovar.export import engine
from toprovar.export.engine_check import check_report
from toprovar.export.manifest import load_manifest, verify
from toprovar.export.trt_flavour import TensorRTUnavailable, import_flavour

try:
    trt = import_flavour("rtx", builder=True)
except TensorRTUnavailable as exc:  # pragma: no cover - CI installs it (.ci/run)
    pytest.skip(str(exc), allow_module_level=True)

TARGET = "sm89"
PIECES = ["block_01", "head_s00", "head_s05", "next_input_s02", "diffusion_head"]


def test_hart_tiny_pieces_build_real_engines(hart_exported, tmp_path):
    out = tmp_path / "hart-tiny"
    shutil.copytree(hart_exported, out)
    infos = {}
    man = engine.build_engines(load_manifest(out), names=PIECES, plugins=[], flavour="rtx", targets=TARGET,
                               opt_level=0, progress=False, on_engine=lambda n, e, i: infos.__setitem__(n, i))
    assert sorted(infos) == sorted(man["engines"]) == sorted(PIECES)
    verify(man, engines=True)
    for name, info in infos.items():
        entry = man["pieces"][name]
        check_report(info["report"], entry, name)
        assert [t for t in info["report"].io] and info["layers"] >= 1 and info["plugin_layers"] == 0
        assert man["engines"][name]["file"] == f"engine/{name}.rtx{trt.__version__}.{TARGET}.plan"
    assert [t for t in infos["head_s05"]["report"].io if infos["head_s05"]["report"].io[t].mode == "output"] == \
        [t["name"] for t in man["pieces"]["head_s05"]["outputs"]] == ["bits", "hard"]
    assert infos["block_01"]["profiles"] == len(man["schedule"])
