"""Before/after table of two end-to-end benchmark JSONs, per policy and piece, and per change its predicted
vs measured saving (``toprovar.benchmark.compare``).

    python bench/compare_e2e.py BEFORE.json AFTER.json -o bench/results --name e2e_compare \\
        --change "vae-bf16-subpixel:decode:30"
"""
from __future__ import annotations

import argparse
import sys

from common import RESULTS, markdown_table, write_results

from toprovar.benchmark.compare import Change, compare, load_run


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("before")
    ap.add_argument("after")
    ap.add_argument("-o", "--out", default=str(RESULTS), help="output directory of NAME.{json,md}")
    ap.add_argument("--name", default="e2e_compare")
    ap.add_argument("--change", action="append", default=[], help="NAME:PIECE:PREDICTED_MS (repeatable)")
    args = ap.parse_args()
    try:
        changes = [Change.parse(c) for c in args.change]
        before, after = load_run(args.before), load_run(args.after)
        rows, crows = compare(before, after, changes)
    except ValueError as exc:
        sys.exit(f"bench/compare_e2e.py: {exc}")
    sections = ["## Changes: predicted vs measured saving", "", *markdown_table(crows)] if crows else []
    payload = {"before": args.before, "after": args.after, "rows": rows, "changes": crows,
               "environment": after.get("environment", {}),
               "settings": {k: (before.get(k), after.get(k)) for k in ("model", "resolution", "dtype", "vae_dtype",
                                                                      "compile", "cuda_graphs")}}
    path = write_results(args.name, payload, rows, f"End to end before/after ({args.before} -> {args.after})",
                         args.out, ["\n".join(sections)] if sections else [])
    print(path)


if __name__ == "__main__":
    main()
