"""End-to-end benchmark, kept for old command lines: it is ``toprovar bench`` (toprovar/benchmark/e2e.py).

    python bench/e2e.py --model infinity-2b --runs 5
    # = toprovar bench --model infinity-2b --runs 5 --out bench/results

Takes the options of ``toprovar bench`` (``toprovar bench --help``), except that ``--out NAME`` keeps its
old meaning here: the stem of the result files in bench/results (``toprovar bench`` calls it ``--name``
and takes ``--out DIR``).
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS  # noqa: E402  (also puts the repository root on sys.path)

from toprovar.benchmark.e2e import (POLICY_NAMES, ReplayPolicy, Recorder, build_policy,  # noqa: E402,F401
                                    operating_point)
from toprovar.cli import main as toprovar_main  # noqa: E402

__all__ = ["POLICY_NAMES", "ReplayPolicy", "Recorder", "build_policy", "operating_point", "translate", "main"]


def translate(argv: list[str]) -> list[str]:
    """This script's arguments -> ``toprovar bench`` arguments (``--out NAME`` -> ``--name NAME``)."""
    out = []
    for a in argv:
        if a == "--out":
            a = "--name"
        elif a.startswith("--out="):
            a = "--name=" + a[len("--out="):]
        out.append(a)
    return ["bench", "--out", str(RESULTS), *out]


def main(argv: list[str] | None = None) -> int:
    return toprovar_main(translate(sys.argv[1:] if argv is None else list(argv)))


if __name__ == "__main__":
    sys.exit(main())
