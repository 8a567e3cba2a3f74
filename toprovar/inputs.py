"""Input files named on the command line: what is wrong with one, in words for its one-line error."""
from __future__ import annotations

import os
from pathlib import Path


def file_problem(path: str | os.PathLike) -> str | None:
    """None for a readable regular file (or a link to one); else "file not found", "is a directory, not a file",
    "is not a regular file" or "is not readable"."""
    p = Path(path)
    if p.is_dir():
        return "is a directory, not a file"
    if not p.exists():
        return "file not found"
    if not p.is_file():
        return "is not a regular file"
    if not os.access(p, os.R_OK):
        return "is not readable"
    return None
