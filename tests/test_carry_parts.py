"""tools/carry_parts.py: a file split into parts over several "calls" (subsets of parts) joins back bit for bit;
a missing or changed part, or bad arguments, is one line and writes nothing."""
from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("carry_parts", ROOT / "tools" / "carry_parts.py")
cp = importlib.util.module_from_spec(spec)
spec.loader.exec_module(cp)


@pytest.fixture()
def blob(tmp_path) -> Path:
    path = tmp_path / "model.safetensors"
    path.write_bytes(os.urandom(int.from_bytes(os.urandom(2), "little") % 4096 + 5 * 1024))  # 5-9 KiB
    return path


def test_split_in_calls_then_join(blob, tmp_path):
    size_mib = 2048 / 2**20  # 2 KiB parts
    n = -(-blob.stat().st_size // 2048)
    calls = [f"0-{n // 2 - 1}", ",".join(str(i) for i in range(n // 2, n))]
    parts_dir = tmp_path / "parts"
    for c in calls:  # each call writes its parts and the JSON
        assert cp.main(["split", str(blob), str(parts_dir), "--size-mib", str(size_mib), "--parts", c]) == 0
    assert len(list(parts_dir.glob("*.part[0-9]*"))) == n
    out = tmp_path / "joined" / "model.safetensors"
    assert cp.main(["join", str(parts_dir), "model.safetensors", "-o", str(out)]) == 0
    assert out.read_bytes() == blob.read_bytes()
    assert [p.name for p in out.parent.iterdir()] == ["model.safetensors"]  # no temporary left


def test_missing_or_changed_part_is_one_line_and_writes_nothing(blob, tmp_path, capsys):
    parts_dir = tmp_path / "parts"
    assert cp.main(["split", str(blob), str(parts_dir), "--size-mib", str(2048 / 2**20), "--parts", "0"]) == 0
    out = tmp_path / "out.safetensors"
    assert cp.main(["join", str(parts_dir), "model.safetensors", "-o", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("carry_parts: join: ") and "model.safetensors.part001 is missing" in err and "\n" not in err
    assert cp.main(["split", str(blob), str(parts_dir), "--size-mib", str(2048 / 2**20)]) == 0
    part = parts_dir / "model.safetensors.part001"
    data = bytearray(part.read_bytes())
    data[7] ^= 0xFF
    part.write_bytes(bytes(data))
    assert cp.main(["join", str(parts_dir), "model.safetensors", "-o", str(out)]) == 2
    assert "part001 does not match model.safetensors.parts.json" in capsys.readouterr().err
    assert not out.exists() and not list(tmp_path.glob(".out.safetensors.tmp*"))
    for argv, message in [(["split", str(blob), str(parts_dir), "--parts", "3"], "--parts: 3 is not a part"),
                          (["split", str(blob), str(parts_dir), "--parts", "x"], "--parts: 'x' is not all"),
                          (["split", str(tmp_path / "nope"), str(parts_dir)], "split: "),
                          (["join", str(tmp_path), "model.safetensors", "-o", str(out)], "join: ")]:
        assert cp.main(argv) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith(f"carry_parts: {message}") and "\n" not in err, (argv, err)
