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
import os
import sys
from pathlib import Path

CHUNK = 1 << 20


def sha256(path: Path, start: int = 0, size: int | None = None) -> str:
    """sha256 hex of ``size`` bytes of ``path`` from ``start`` (to the end when None)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        f.seek(start)
        left = size
        while left is None or left > 0:
            block = f.read(CHUNK if left is None else min(CHUNK, left))
            if not block:
                break
            h.update(block)
            if left is not None:
                left -= len(block)
    return h.hexdigest()


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
    chosen = parse_parts(parts, count)
    out_dir.mkdir(parents=True, exist_ok=True)
    meta = {"name": src.name, "bytes": total, "sha256": sha256(src), "part_bytes": part_size,
            "parts": [{"file": f"{src.name}.part{i:03d}", "bytes": min(part_size, total - i * part_size),
                       "sha256": sha256(src, i * part_size, part_size)} for i in range(count)]}
    written = []
    with open(src, "rb") as f:
        for i in chosen:
            f.seek(i * part_size)
            written.append(_atomic(out_dir / meta["parts"][i]["file"], f.read(part_size)))
    written.append(_atomic(out_dir / f"{src.name}.parts.json", json.dumps(meta, indent=1).encode()))
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
        if path.stat().st_size != p["bytes"] or sha256(path) != p["sha256"]:
            raise ValueError(f"join: {path} does not match {meta_path.name} (size or sha256)")
    if out.exists() and not out.is_file():
        raise ValueError(f"-o: {out} exists and is not a regular file")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            for p in meta["parts"]:
                f.write((parts_dir / p["file"]).read_bytes())
        if sha256(tmp) != meta["sha256"]:
            raise ValueError(f"join: the joined {name} does not match the sha256 in {meta_path.name}")
        tmp.replace(out)
    finally:
        tmp.unlink(missing_ok=True)
    return out


def _atomic(path: Path, data: bytes) -> Path:
    if path.exists() and not path.is_file():
        raise ValueError(f"split: {path} exists and is not a regular file")
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_bytes(data)
    tmp.replace(path)
    return path


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
