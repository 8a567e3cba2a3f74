"""Split a file into parts small enough for the device tool's transfers, and join the parts back, verified.

One device call returns at most 8 files of 16 MiB (64 MiB together) and carries at most 64 MiB of working
tree, so a file larger than that (the scenes transformer: 141 MB of bfloat16 safetensors) travels in parts over
several calls on one warm machine (its ignored folders stay between calls of a lease). ``split`` writes
NAME.partNNN files of --size-mib and NAME.parts.json (the size and sha256 of the whole file and of every part);
``--parts`` picks which parts to write in this call. ``join`` checks every part against the JSON, writes the
whole file under a temporary name, checks its sha256 and renames it; a missing or changed part is one line
naming it, and nothing is written.

    python tools/carry_parts.py split runs/scenes/model.safetensors $OUT --parts 0-3   # call 1 returns 0-3
    python tools/carry_parts.py split runs/scenes/model.safetensors $OUT --parts 4-7   # call 2 ...
    python tools/carry_parts.py join .carry/scenes_parts model.safetensors -o runs/scenes/model.safetensors
"""
from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import sys
from pathlib import Path

from toprovar.export.manifest import sha256_file
from toprovar.outputs import atomic_write


def parse_parts(text: str, count: int) -> list[int]:
    """``--parts``: "all", "3", "0-3" or "0,2,5" -> part indices in 0..count-1 (ValueError naming the flag)."""
    if text == "all":
        return list(range(count))
    out: list[int] = []
    try:
        for item in text.split(","):
            lo, _, hi = item.partition("-")
            out += range(int(lo), int(hi or lo) + 1)
    except ValueError:
        raise ValueError(f"--parts: {text!r} is not all, N, N-M or a comma-separated list") from None
    bad = [i for i in out if not 0 <= i < count]
    if bad:
        raise ValueError(f"--parts: {bad[0]} is not a part (the file has {count}: 0-{count - 1})")
    return sorted(set(out))


def split(src: Path, out_dir: Path, size_mib: float, parts: str) -> list[Path]:
    """Write the chosen parts of ``src`` and its parts JSON into ``out_dir``; returns the paths written."""
    if not src.is_file():
        raise ValueError(f"split: {src} is not a file")
    part_size = int(size_mib * 2**20)
    if part_size <= 0:
        raise ValueError(f"--size-mib: must be > 0, got {size_mib}")
    total = src.stat().st_size
    count = max(1, -(-total // part_size))
    chosen = set(parse_parts(parts, count))
    meta = {"name": src.name, "bytes": total, "sha256": sha256_file(src), "part_bytes": part_size, "parts": []}
    written = []
    with open(src, "rb") as f:
        for i in range(count):  # every part's hash goes into the JSON; the chosen ones are written
            data = f.read(part_size)
            name = f"{src.name}.part{i:03d}"
            meta["parts"].append({"file": name, "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()})
            if i in chosen:
                written.append(atomic_write(out_dir / name, lambda tmp, d=data: Path(tmp).write_bytes(d), "out_dir"))
    written.append(atomic_write(out_dir / f"{src.name}.parts.json",
                                lambda tmp: Path(tmp).write_text(json.dumps(meta, indent=1)), "out_dir"))
    return written


def join(parts_dir: Path, name: str, out: Path) -> Path:
    """Reassemble ``name`` from ``parts_dir`` (its parts JSON and every part, each checked) into ``out``."""
    meta_path = parts_dir / f"{name}.parts.json"
    if not meta_path.is_file():
        raise ValueError(f"join: {meta_path} not found (split writes it next to the parts)")
    meta = json.loads(meta_path.read_text())
    for p in meta["parts"]:
        path = parts_dir / p["file"]
        if not path.is_file():
            raise ValueError(f"join: {path} is missing ({len(meta['parts'])} parts in {meta_path.name})")
        if path.stat().st_size != p["bytes"] or sha256_file(path) != p["sha256"]:
            raise ValueError(f"join: {path} does not match {meta_path.name} (size or sha256)")

    def write(tmp: str) -> None:
        with open(tmp, "wb") as f:
            for p in meta["parts"]:
                with open(parts_dir / p["file"], "rb") as part:
                    shutil.copyfileobj(part, f)
        if sha256_file(tmp) != meta["sha256"]:
            raise ValueError(f"join: the joined {name} does not match the sha256 in {meta_path.name}")
    return atomic_write(out, write, "-o")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("split", help="write parts of FILE and its parts JSON into OUT_DIR")
    s.add_argument("file", type=Path)
    s.add_argument("out_dir", type=Path)
    s.add_argument("--size-mib", type=float, default=15.0, help="part size (the device returns files of <= 16 MiB)")
    s.add_argument("--parts", default="all", help="which parts to write: all, N, N-M or N,M,...")
    j = sub.add_parser("join", help="reassemble NAME from the parts in PARTS_DIR, verified")
    j.add_argument("parts_dir", type=Path)
    j.add_argument("name")
    j.add_argument("-o", "--output", type=Path, required=True)
    args = p.parse_args(argv)
    try:
        if args.cmd == "split":
            for path in split(args.file, args.out_dir, args.size_mib, args.parts):
                print(path)
        else:
            print(join(args.parts_dir, args.name, args.output))
    except (ValueError, OSError) as exc:
        print(f"carry_parts: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
