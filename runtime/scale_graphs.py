"""Whole-scale CUDA graphs: one graph per scale of a generation plan, replayed with no Python in the loop.

A scale runs ~32-40 layers, each a block call plus, for a pruning policy, its keep/gather/scatter/observe
work: dozens of small kernels whose launches (and Python) cost more than their GPU time at the first
scales and around every pruned layer. When a policy's decisions never depend on device values (a pinned
operating point, fixed baselines; ``Policy.plan_key`` is not None), the orchestrator's scale step issues
the same kernels on the same buffers in every generation, so each scale is captured once and replayed.

A plan is keyed by the policy's key and the shapes of the generation (batch, CFG, text length, the rows of
each CFG setting); it is
valid while every buffer the graphs read or write stays at its address (the orchestrator's workspace,
the backend's conditioning buffers: checked on every call, a moved buffer drops the plan). Life cycle
per plan: the first generation runs eagerly (warm-up: compilation, library handles, workspaces), the
second captures every scale and replays it at once (capture does not execute), later ones replay.
The capturing policy object is kept with the plan: tensors it holds (buffers, state carried from scale
to scale) are what the graphs read. A capture that fails disables graphs for that plan (the
generation reruns eagerly, with a warning), except a capture out of memory while other plans hold their
pools: those plans are dropped and the generation reruns, capturing again (a long-lived server that met
many batch sizes keeps its graphs for the current ones instead of running eagerly from then on).

All plans of one orchestrator capture into one shared CUDA-graph memory pool. That is safe because plans
never run concurrently (one orchestrator, one stream) and no value crosses from one generation to the next
through pool memory: a generation reads its inputs from the workspace and conditioning buffers (outside
the pool) and every pool tensor a scale reads was written earlier in the same generation. So a plan's
intermediates may reuse another plan's freed ones, and the pool holds the largest plan's working set
instead of the sum over plans (a server with batch buckets 1-16 held 43 GiB of separate pools on the
2B model).
"""
from __future__ import annotations

import warnings
from collections import OrderedDict
from typing import Callable

import torch

from .buffers import is_oom


class ScalePlan:
    """The captured scales of one plan: graph, the state after it and its trace entry, per scale index."""

    def __init__(self, key: tuple, policy, binding: tuple, pool):
        self.key = key
        self.policy = policy  # keeps the tensors the graphs read alive
        self.binding, self.pool = binding, pool
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.after: dict[int, tuple] = {}
        self.capturing = True  # False once a generation has captured every scale it ran: replaying

    def run(self, si: int, st, trace, step: Callable) -> object:
        """Scale ``si`` from state ``st``: replay its graph (returning the captured state after it), or
        capture ``step(st)`` into a new graph and replay it. Fills ``trace`` for the scale either way."""
        if not self.capturing:
            graph = self.graphs.get(si)
            if graph is None:
                raise RuntimeError(f"scale graphs: scale {si} was not captured for this plan")
            graph.replay()
            after, (tokens, kept, cfg_batch) = self.after[si]
            trace.tokens[si], trace.kept[si], trace.cfg_batch[si] = tokens, list(kept), cfg_batch
            return after.copy()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            step(st)
        graph.replay()
        self.graphs[si] = graph
        self.after[si] = (st.copy(), (trace.tokens[si], list(trace.kept[si]), trace.cfg_batch[si]))
        return st

    def finish(self, binding: tuple) -> None:
        """End of a generation: a capturing plan becomes a replaying one, bound to the buffers as they are
        now (a buffer first used during the capture is part of the binding)."""
        self.binding = binding
        self.capturing = False


class ScaleGraphs:
    """The scale plans of one orchestrator (``backend.capture_scales`` enables them); at most
    ``max_plans`` are kept (least recently used dropped: each holds its graphs' memory pool)."""

    def __init__(self, backend, max_plans: int = 2):
        self.enabled = bool(getattr(backend, "capture_scales", False))
        self.backend, self.max_plans = backend, max_plans
        self._plans: OrderedDict[tuple, ScalePlan] = OrderedDict()
        self._pool = None  # the plans' shared graph memory pool (a new one once every plan is dropped)
        self._warm: set = set()
        self._failed: dict[tuple, str] = {}  # plan key -> why its capture failed

    def plan(self, policy, st, ws) -> ScalePlan | None:
        """The plan to run this generation with (capturing or replaying), or None to run eagerly."""
        if not self.enabled:
            return None
        key = policy.plan_key()
        if key is None:
            return None
        key = (key, st.B, st.Bp, st.use_cfg, tuple(st.ca_kv.shape), str(st.ca_kv.dtype), len(st.noise),
               tuple(g[0] for g in st.groups))  # the rows of each CFG setting
        if key in self._failed:
            return None
        binding = self.binding(st, ws)
        plan = self._plans.get(key)
        if plan is not None:
            if not plan.capturing and plan.binding == binding:
                self._plans.move_to_end(key)
                return plan
            del self._plans[key]  # buffers moved (or an unfinished capture): capture again
        if key not in self._warm:
            self._warm.add(key)
            return None
        while len(self._plans) >= self.max_plans:
            self._plans.popitem(last=False)
        if not self._plans or self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        plan = self._plans[key] = ScalePlan(key, policy, binding, self._pool)
        return plan

    @staticmethod
    def binding(st, ws) -> tuple:
        """The addresses scale graphs are bound to: the workspace's buffers and the conditioning tensors."""
        return (ws.addresses(),) + tuple(t.data_ptr() for t in (st.cond, st.ada, st.ca_kv, st.ca_len))

    def fail(self, plan: ScalePlan, exc: BaseException) -> None:
        """A capture failed: drop the plan, never graph its key again, and say so once. Out of memory
        while other plans are held: drop those instead (their memory pools) and keep the key, so the rerun
        captures it again."""
        self._plans.pop(plan.key, None)
        why = f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}"
        retry = is_oom(exc) and bool(self._plans)
        if retry:
            dropped = len(self._plans)
            self._plans.clear()
        else:
            self._failed[plan.key] = why
        if torch.cuda.is_available():
            torch.cuda.synchronize()
            torch.cuda.empty_cache()
        if retry:
            warnings.warn(f"scale graphs: capture for policy {plan.key[0]!r}, batch {plan.key[1]} ran out of memory; "
                          f"dropped the {dropped} other plan(s) to capture it again", RuntimeWarning, stacklevel=3)
            return
        warnings.warn(f"scale graphs disabled for policy {plan.key[0]!r}: capture failed ({why}); running eagerly",
                      RuntimeWarning, stacklevel=3)

    def mode(self, batch: int) -> str:
        """How the last generations of batch ``batch`` ran: 'graphs' (a plan of that batch replays), 'eager
        (capture failed: why)', or 'eager' (graphs off, the policy is not graphable, or still warming up)."""
        if any(p.key[1] == batch and not p.capturing for p in self._plans.values()):
            return "graphs"
        failed = [why for key, why in self._failed.items() if key[1] == batch]
        return f"eager (capture failed: {failed[-1]})" if failed else "eager"

    def status(self, policy) -> str:
        """What the policy's generations run as now: "off" (no scale graphs on this backend), "eager" (the
        policy has no plan key), "warm-up" (one eager generation done, the next captures), "replaying",
        "capturing", or "failed: <why>" (eager from then on); "none" before any generation."""
        if not self.enabled:
            return "off"
        key = policy.plan_key()
        if key is None:
            return "eager"
        for k, why in self._failed.items():
            if k[0] == key:
                return f"failed: {why}"
        for k, plan in self._plans.items():
            if k[0] == key:
                return "capturing" if plan.capturing else "replaying"
        return "warm-up" if any(k[0] == key for k in self._warm) else "none"

    def clear(self) -> bool:
        """Drop every plan (their graphs and memory pools); whether there were any."""
        had = bool(self._plans)
        self._plans.clear()
        self._warm.clear()
        if had:
            torch.cuda.synchronize()
            torch.cuda.empty_cache()
        return had
