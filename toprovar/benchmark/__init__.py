"""Benchmarks: the end-to-end benchmark behind ``toprovar bench`` (``e2e``), its per-scale x per-piece
time breakdown (``breakdown``) and the helpers shared with the scripts of ``bench/`` (``common``)."""
