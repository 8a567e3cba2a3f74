"""Scale-by-scale generation, written once for every backend.

The orchestrator owns the buffers (torch tensors on the backend's device: KV caches preallocated for the
whole schedule, the summed codes, the residual stream) and the control flow (policy decisions, kept-token
gather/scatter, CFG batch, sampling noise); a ``Backend`` only runs the pieces of
``toprovar.model.pieces``.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field, replace
from typing import Protocol, Sequence

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from toprovar.policy.base import GenerationInfo, Policy, PolicyTrace
from .buffers import OutOfMemoryAtScale, Workspace, is_oom, oom_error, tensor_bytes
from .scale_graphs import ScaleGraphs


class Backend(Protocol):
    """Runs the graph pieces; all tensors are torch tensors on ``device``."""
    name: str
    device: torch.device
    dtype: torch.dtype  # dtype of k/v and ca_kv

    def condition(self, text: torch.Tensor, lengths: torch.Tensor, cfg: bool) -> tuple[torch.Tensor, ...]: ...
    def block(self, layer: int, x, ada, ca_kv, ca_lengths, rope, past_k, past_v, entropy: bool
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]: ...
    def head(self, si: int, x, cond, uniform, cfg, tau, top_p) -> torch.Tensor: ...
    def next_input(self, si: int, bits, summed) -> tuple[torch.Tensor, torch.Tensor | None]: ...
    def decode(self, summed: torch.Tensor) -> torch.Tensor: ...
    def synchronize(self) -> None: ...
    # Optional: ``owns_outputs`` (bool: outputs live in the backend's buffers until its next call; the
    # orchestrator copies them out), ``block_in_cache(layer, x, ada, ca_kv, ca_lengths, rope, cache_k,
    # cache_v, past, entropy) -> (x, entropy | None)`` (the block with its new keys/values written into the
    # layer's cache, a (B', H, total, hd) view, at [past, past + n) in place; used instead of ``block``),
    # ``prepare(schedule, batch, cfg, text_len)`` (size buffers once per generation), ``begin_scale(si)``
    # (e.g. select the TensorRT optimization profile of the scale),
    # ``head_logits(si, x, cond)`` + ``head_sample(si, logits, uniform, cfg, tau, top_p)`` (the head piece
    # in two calls, the same ops: used by profiled runs to time the head and the sampling apart).


# Piece kinds of the per-scale breakdown (``GenerationResult.piece_ms``), in report order:
#   dense / pruned  transformer layers on all tokens / on a kept subset (incl. their KV-cache write and, for
#                   layers asked for it, the FAE entropy; a policy's BlockRunner layer counts by its k/v count)
#   policy          the policy's work: keep() (entropy statistics, TokenKeepPiece, selection), observe(),
#                   wants_entropy/block_runner (a skipped layer's decision too)
#   gather_scatter  index_select of the kept tokens and their RoPE rows, index_copy_ of the outputs back
#   head            logits (with a backend that has no head_logits: the whole head piece, sampling included)
#   sampling        the CPU noise draw and its copy to the device, bit sampling, the copy into the bits buffer
#   next_input      summed codes + next scale's embedded input (and its CFG broadcast)
#   other           begin_scale, CFG-batch switch and bookkeeping at the start of a scale
PIECES = ("dense", "pruned", "policy", "gather_scatter", "head", "sampling", "next_input", "other")


@dataclass
class ModelSpec:
    """What the orchestrator must know of the model (from a config or an export manifest)."""
    depth: int
    num_heads: int
    head_dim: int
    width: int
    token_bits: int
    codebook_dim: int
    spatial_patchify: bool
    # sampling uniforms per token at each scale when they differ from token_bits (HART: categorical draw, Gumbel
    # and diffusion noise; the head's output is token_bits wide)
    noise_widths: tuple[int, ...] | None = None
    # columns [a, b) of every scale's noise drawn on a CUDA device from per-row device generators instead of the
    # CPU stream (HART's more_smooth Gumbel uniforms: V per token, too many to draw on the host and copy)
    device_noise: tuple[int, int] | None = None
    family: str = "infinity"  # ``ModelConfig.family``, for the policies whose settings differ per family

    def noise_width(self, si: int) -> int:
        return self.token_bits if self.noise_widths is None else int(self.noise_widths[si])

    @classmethod
    def from_config(cls, cfg) -> "ModelSpec":
        """The orchestrator's view of a ``ModelConfig`` (HART: token_bits = the codebook width Cvae, the head's
        output per token; its sampling noise per scale from the family)."""
        from toprovar.model.families import device_noise, noise_widths
        bits = cfg.codebook_dim if cfg.is_hart else cfg.token_bits
        return cls(cfg.depth, cfg.num_heads, cfg.head_dim, cfg.width, bits, cfg.codebook_dim, cfg.spatial_patchify,
                   noise_widths(cfg, len(cfg.patch_nums)), device_noise(cfg), cfg.family)


@dataclass
class ScaleState:
    """What one scale hands the next: the residual stream and conditioning (CFG batch Bp rows, shrinking to
    B when a policy drops the unconditional branch), the summed codes, the KV caches and their fill, the
    sampled bits so far; noise and per-scale scalars (device tensors) are set once per generation."""
    B: int
    Bp: int
    x: torch.Tensor
    cond: torch.Tensor
    ada: torch.Tensor
    ca_kv: torch.Tensor
    ca_len: torch.Tensor
    summed: torch.Tensor
    bits_all: torch.Tensor
    cache_k: list
    cache_v: list
    cache_len: list
    updates: list  # with a restore policy: each layer's last update (Bp', n, C) and its grid
    bits_out: list = field(default_factory=list)
    off: int = 0
    noise: list = field(default_factory=list)
    cfg_t: torch.Tensor | None = None  # (G, S): per CFG group (rows sharing a CFG scale), per scale
    # with several CFG settings, per setting: (its rows, rows (k,) int64 and CFG rows (2k,) int64 on the device)
    groups: list = field(default_factory=list)
    tau_t: torch.Tensor | None = None
    top_p_t: torch.Tensor | None = None
    use_cfg: bool = True

    def copy(self) -> "ScaleState":
        """A snapshot: the same tensors, copies of the mutable lists."""
        return replace(self, cache_len=list(self.cache_len), updates=list(self.updates),
                       bits_out=list(self.bits_out))


@dataclass
class GenerationResult:
    """images (B, 3, H, W) float32 in [-1, 1]; bits per scale (B, n, token_bits); per-scale report."""
    images: torch.Tensor
    bits: list[torch.Tensor]
    trace: PolicyTrace
    scale_ms: list[float] = field(default_factory=list)
    stage_ms: dict[str, float] = field(default_factory=dict)  # with profile: "condition", "decode"
    # with profile: per scale index, milliseconds per piece kind (``PIECES``; kinds that did not run are absent)
    piece_ms: dict[int, dict[str, float]] = field(default_factory=dict)


def per_scale(value: float | Sequence[float], n: int, name: str) -> list[float]:
    """A scalar or a per-scale list -> a list of n floats (one clear error on a wrong length)."""
    if isinstance(value, (int, float)):
        return [float(value)] * n
    vals = [float(v) for v in value]
    if len(vals) < n:
        raise ValueError(f"--{name}: {len(vals)} values given for {n} scales")
    return vals[:n]


def uniform_noise(gen: torch.Generator | Sequence[torch.Generator], batch: int, counts: Sequence[int],
                  bits: int | Sequence[int], device: torch.device, out: torch.Tensor | None = None,
                  device_cols: tuple[int, int] | None = None,
                  device_gens: Sequence[torch.Generator] | None = None) -> list[torch.Tensor]:
    """Sampling noise of every scale, (B, n_s, bits) float32 each, drawn on the CPU scale after scale (the same
    stream for every backend and device) and moved in ONE copy before any scale runs: a host-to-device copy
    from pageable memory synchronises the stream, so a copy per scale would stall the launch queue.
    ``gen``: one generator per row (row b's noise depends on its own generator only: a request's image does
    not depend on its batch-mates), or one generator drawing (B, n_s, bits) per scale.
    ``out``: a flat float32 device buffer of B * sum(counts * bits) elements to copy into (stable address).
    ``bits``: one width for every scale or one per scale (HART).
    ``device_cols`` (a, b) with ``device_gens`` (one generator per row, on ``device``): columns [a, b) of every
    scale are drawn on the device, row r's (n, b - a) per scale from device_gens[r]; the host draws the other
    columns only (so the host stream differs from a draw without them)."""
    widths = [bits] * len(counts) if isinstance(bits, int) else list(bits)
    cut = 0 if device_cols is None else device_cols[1] - device_cols[0]
    host_w = [w - cut for w in widths]
    if isinstance(gen, torch.Generator):
        parts = [torch.rand(batch, n, b, generator=gen).reshape(-1) for n, b in zip(counts, host_w)]
    else:
        if len(gen) != batch:
            raise ValueError(f"{len(gen)} generators for a batch of {batch}")
        parts = [torch.cat([torch.rand(1, n, b, generator=g) for g in gen]).reshape(-1)
                 for n, b in zip(counts, host_w)]
    flat = torch.cat(parts)
    if out is None:
        out = torch.empty(batch * sum(n * w for n, w in zip(counts, widths)), dtype=torch.float32, device=device)
    full = [t.view(batch, n, w) for t, n, w in
            zip(out.split([batch * n * w for n, w in zip(counts, widths)]), counts, widths)]
    if not cut:
        out.copy_(flat)
        return full
    a, b = device_cols
    host = flat.to(device).split([batch * n * w for n, w in zip(counts, host_w)])
    for t, h, n, w in zip(full, host, counts, host_w):
        h = h.view(batch, n, w)
        t[..., :a], t[..., b:] = h[..., :a], h[..., a:]
        for r, g in enumerate(device_gens):
            t[r, :, a:b] = torch.rand(n, cut, generator=g, device=device)
    return full


def row_seeds(seed: int | Sequence[int], batch: int) -> list[int]:
    """One seed per row: a list as given (its length must be the batch), an int s -> s, s+1, ..., s+B-1 (row b
    of a batch draws what a generation of that prompt alone with seed s+b draws)."""
    if isinstance(seed, int):
        return [seed + b for b in range(batch)]
    seeds = [int(v) for v in seed]
    if len(seeds) != batch:
        raise ValueError(f"--seed: {len(seeds)} seeds given for {batch} prompts")
    return seeds


def cfg_groups(cfg: float | Sequence[float], row_cfg: Sequence[float] | None, batch: int, n_scales: int
               ) -> tuple[list[list[float]], list[list[int]]]:
    """Per-scale CFG scales of each distinct CFG setting and the rows that use it: ([per-scale cfg], [rows]).
    ``row_cfg``: one CFG scale per row (constant over scales), else ``cfg`` (scalar or per scale) for all."""
    if row_cfg is None:
        return [per_scale(cfg, n_scales, "cfg")], [list(range(batch))]
    vals = [float(v) for v in row_cfg]
    if len(vals) != batch:
        raise ValueError(f"--cfg: {len(vals)} per-prompt CFG scales given for {batch} prompts")
    distinct = list(dict.fromkeys(vals))
    return [[v] * n_scales for v in distinct], [[b for b, v in enumerate(vals) if v == d] for d in distinct]


def rows_view(t: torch.Tensor, b: int | None, B: int) -> torch.Tensor:
    """Rows of sample ``b`` of a (B', ...) tensor, B' in {B, 2B} (its conditional row and, with CFG, its
    unconditional row B + b: a strided view, no copy); all rows when b is None."""
    return t if b is None else t[b::B]


def kv_layout(depth: int, total: int, last: int) -> tuple[list[int], int]:
    """Where each layer's KV cache lies in one shared buffer: (token offset per layer, buffer length in tokens).

    Layer l's cache is the window [off_l, off_l + total) of the buffer; windows are stacked in reverse order
    with a stride of ``total - last`` tokens (what the scales before the last one fill). Before the last scale
    no two layers' filled parts overlap. At the last scale (``last`` tokens), layer l writes its new keys/values
    over the start of layer l-1's window, after layer l-1 has run the last scale: nothing reads a layer's cache
    after its last attention. So the caches take depth * (total - last) + last tokens instead of
    depth * total (the 2B at 1024px: 39% less), with no copy.
    """
    if not 0 < last <= total:
        raise ValueError(f"kv_layout: last scale of {last} tokens in a cache of {total}")
    past = total - last
    return [(depth - 1 - layer) * past for layer in range(depth)], depth * past + last


def heads_view(cache_k: list, cache_v: list, layer: int, Bp: int, P: int | None, rows: int | None = None,
               B: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """The layer's caches (B', total, H, hd) token-major, as (B', H, P, hd) views of their first P tokens
    (all of them when P is None): the blocks' (B, H, N, hd) convention, no copy. ``rows``: only sample
    ``rows``'s rows (``rows_view``)."""
    return tuple(rows_view(c[layer][:Bp], rows, B)[:, :P].transpose(1, 2) for c in (cache_k, cache_v))


def resized_update(update: tuple[torch.Tensor, tuple[int, int]], hw: tuple[int, int], batch: int) -> torch.Tensor:
    """A layer's update (B', h'w', C) float32 on grid (h', w') -> (batch, h*w, C) on grid hw (bilinear, the
    first ``batch`` rows: the CFG batch only shrinks)."""
    u, (ph, pw) = update
    u = u[:batch]
    if (ph, pw) == tuple(hw):
        return u.clone()
    t = u.transpose(1, 2).reshape(batch, u.shape[-1], ph, pw)
    t = F.interpolate(t, size=tuple(hw), mode="bilinear", align_corners=False)
    return t.flatten(2).transpose(1, 2).contiguous()


class Orchestrator:
    """Generates images from text features through a backend, a policy and a scale schedule."""

    def __init__(self, backend: Backend, spec: ModelSpec, schedule: list[tuple[int, int]],
                 ropes: list[torch.Tensor]):
        self.backend, self.spec, self.schedule = backend, spec, schedule
        self.ropes = [r.to(backend.device).contiguous() for r in ropes]
        self.ws = Workspace(backend.device)  # KV caches, residual stream, gathers: reused across calls
        self.graphs = ScaleGraphs(backend)  # whole-scale CUDA graphs per generation plan

    @torch.no_grad()
    def generate(self, text: torch.Tensor, lengths: torch.Tensor, *, seed: int | Sequence[int],
                 cfg: float | Sequence[float] = 3.0, tau: float | Sequence[float] = 1.0, top_p: float = 0.97,
                 policy: Policy | None = None, profile: bool = False, progress: bool = True,
                 row_cfg: Sequence[float] | None = None) -> GenerationResult:
        """text (B, L, C_text) float32, lengths (B,) int32 -> GenerationResult.

        Batches: every row has its own seed (``seed``: one per row, or an int s for rows s, s+1, ...; see
        ``row_seeds``) and, with ``row_cfg``, its own CFG scale (else ``cfg``, a scalar or one per scale, for
        every row); the CFG batch is 2B rows (conditional rows, then unconditional ones). The head runs once
        per distinct CFG setting on that setting's rows. Row b's image does not depend on the other rows for
        policies whose decisions are per row (no pruning, fixed rules, ToProVAR's per-row kept sets at a
        pinned operating point); see docs/runtime.md "Batches".

        Buffers (KV caches for the whole schedule, the residual stream, gathered kept tokens, the sampling
        noise and per-scale scalars) live in ``self.ws`` and are reused across scales and calls. A backend
        whose outputs live in its own buffers (``owns_outputs``: ONNX Runtime, TensorRT) has them copied out
        before its next call. No device-to-host read happens here: a pruning policy reads its kept count
        itself (one small read per pruned layer), unpruned layers read nothing.

        Whole-scale CUDA graphs (backend attribute ``capture_scales``, e.g. the PyTorch backend with CUDA
        graphs): when the policy's decisions never depend on device values (``Policy.plan_key`` is not
        None), the first generation of a plan runs eagerly (warm-up), the second captures each scale into
        a CUDA graph (and replays it), later ones replay the scales' graphs with no Python in the loop.
        See ``toprovar.runtime.scale_graphs``.

        profile=True also times each scale, the condition and decode stages, and per scale the pieces of
        ``PIECES`` (CUDA events on CUDA, recorded between the pieces with no synchronisation until the end;
        perf_counter on CPU); the images and bits are the same as without it. Profiled runs never replay
        scale graphs (their pieces are timed one by one).

        Out of device memory while CUDA graphs (scale or block graphs) hold memory, the graphs are freed and
        the generation runs once more before the error is raised.
        """
        kw = dict(seed=seed, cfg=cfg, tau=tau, top_p=top_p, policy=policy, profile=profile, progress=progress,
                  row_cfg=row_cfg)
        try:
            return self._generate(text, lengths, **kw)
        except OutOfMemoryAtScale:
            if not self.release_graphs():
                raise
        return self._generate(text, lengths, **kw)

    def release_graphs(self) -> bool:
        """Free the scale graphs and the backend's block graphs; whether any were held."""
        had = self.graphs.clear()
        if hasattr(self.backend, "drop_graphs"):
            had = self.backend.drop_graphs() or had
        return had

    def _generate(self, text: torch.Tensor, lengths: torch.Tensor, *, seed, cfg, tau, top_p: float,
                  policy: Policy | None, profile: bool, progress: bool, row_cfg) -> GenerationResult:
        be, sp, S = self.backend, self.spec, len(self.schedule)
        dev = be.device
        policy = policy or Policy()
        B = text.shape[0]
        seeds = row_seeds(seed, B)
        group_cfgs, group_rows = cfg_groups(cfg, row_cfg, B, S)
        taus = per_scale(tau, S, "tau")
        use_cfg = any(c != 1.0 for cs in group_cfgs for c in cs)
        timer = _Timer(dev, profile)
        if hasattr(be, "prepare"):
            with _oom_guard(f"preparing the backend's buffers for {S} scales (batch {B})", dev):
                be.prepare(self.schedule, B, use_cfg, text.shape[1])
        timer.start("condition")
        with _oom_guard("in text conditioning", dev):
            cond, ada, ca_kv, ca_len, x0 = be.condition(text.to(dev), lengths.to(dev), use_cfg)
        timer.stop("condition")
        st = self._allocate(B, x0, cond, ada, ca_kv, ca_len)
        gens = [torch.Generator().manual_seed(s) for s in seeds]
        # noise of every scale and the per-scale scalars: one host-to-device copy each, into stable buffers
        # (a pageable copy synchronises the stream; stable addresses let scale graphs read them)
        counts = [h * w for h, w in self.schedule]
        widths = [sp.noise_width(si) for si in range(S)]
        cols = sp.device_noise if dev.type == "cuda" else None  # CUDA: Gumbel uniforms from device generators
        dgens = [torch.Generator(device=dev).manual_seed(s) for s in seeds] if cols else None
        st.noise = uniform_noise(gens, B, counts, widths, dev, out=self.ws.view(
            "noise", (B * sum(n * b for n, b in zip(counts, widths)),), torch.float32), device_cols=cols,
            device_gens=dgens)
        G = len(group_cfgs)
        scalars = self.ws.view("scalars", (G * S + S + 1,), torch.float32)
        scalars.copy_(torch.tensor(sum(group_cfgs, []) + taus + [float(top_p)], dtype=torch.float32))
        st.cfg_t, st.tau_t, st.top_p_t = scalars[:G * S].view(G, S), scalars[G * S:G * S + S], scalars[G * S + S:]
        if G > 1:  # rows of each CFG group (and their CFG rows): one copy, a stable buffer
            flat = [r for rows in group_rows for r in rows + rows + [B + r for r in rows]]
            index = self.ws.view("cfg_rows", (len(flat),), torch.int64)
            index.copy_(torch.tensor(flat, dtype=torch.int64))
            parts = index.split([3 * len(rows) for rows in group_rows])
            st.groups = [(tuple(rows), p[:len(rows)], p[len(rows):]) for p, rows in zip(parts, group_rows)]
        st.use_cfg = use_cfg
        trace = PolicyTrace(schedule=list(self.schedule), batch=B, cfg=st.Bp > B, text_len=int(ca_kv.shape[1]))
        policy.start(GenerationInfo(self.schedule, sp.depth, B, dev, compile=getattr(be, "compiled", False),
                                    family=sp.family))
        plan = None if profile else self.graphs.plan(policy, st, self.ws)
        bar = tqdm(range(S), desc=f"scales [{be.name}]", disable=not progress, leave=False)
        rerun = False
        for si in bar:
            if not policy.run_scale(si):
                break
            h, w = self.schedule[si]
            timer.start(si)
            try:
                if plan is not None:
                    st = plan.run(si, st, trace, lambda s: self._scale(s, si, policy, trace, _no_lap))
                else:
                    self._scale(st, si, policy, trace, timer.lap if profile else _no_lap)
            except Exception as exc:
                if plan is not None and plan.capturing:  # graphs are an optimisation: rerun (below)
                    self.graphs.fail(plan, exc)
                    rerun = True
                    break
                if is_oom(exc):
                    raise oom_error(f"at scale {si} ({h}x{w}, {h * w} tokens, batch {st.Bp})", exc, dev) from None
                raise
            timer.stop(si)
        if rerun:  # without the failed plan's graphs and state alive: they hold the shared graph memory pool
            del plan, st
            if dev.type == "cuda":
                torch.cuda.empty_cache()
            return self._generate(text, lengths, seed=seed, cfg=cfg, tau=tau, top_p=top_p, policy=policy,
                                  profile=profile, progress=progress, row_cfg=row_cfg)
        if plan is not None:
            plan.finish(self.graphs.binding(st, self.ws))
        timer.start("decode")
        with _oom_guard("in the VAE decoder", dev):  # row by row: a row's pixels do not depend on the batch
            if B == 1:
                images = be.decode(st.summed)
                if getattr(be, "owns_outputs", False):
                    images = images.clone()
            else:
                images = torch.cat([be.decode(st.summed[b:b + 1]).clone() for b in range(B)])
        timer.stop("decode")
        if profile:
            be.synchronize()
        scale_ms = [timer.ms(si) for si in range(len(st.bits_out))] if profile else []
        stage_ms = {k: timer.ms(k) for k in ("condition", "decode")} if profile else {}
        piece_ms = timer.piece_ms() if profile else {}
        bits = st.bits_all[:, :st.off].clone().split([b.shape[1] for b in st.bits_out], dim=1)  # own the result
        return GenerationResult(images, list(bits), trace, scale_ms, stage_ms, piece_ms)

    def _allocate(self, B: int, x0, cond, ada, ca_kv, ca_len) -> "ScaleState":
        """Buffers of one generation in ``self.ws`` (KV caches for the whole schedule, laid out by
        ``kv_layout``; the residual stream, gathers, summed codes, sampled bits) -> the state before scale 0."""
        sp, dev, dt = self.spec, self.backend.device, self.backend.dtype
        Bp = x0.shape[0]
        # scale 0 runs x0's tokens (Infinity: the one start token; HART: the text's context tokens)
        n0 = x0.shape[1] - self.schedule[0][0] * self.schedule[0][1]
        total = sum(h * w for h, w in self.schedule) + n0
        n_max = max(max(h * w for h, w in self.schedule), x0.shape[1])
        fh, fw = self.schedule[-1]
        offsets, length = kv_layout(sp.depth, total, fh * fw + (n0 if len(self.schedule) == 1 else 0))
        shape = (Bp, length, sp.num_heads, sp.head_dim)  # token-major: the layout of a block's new k/v
        f = 2 if sp.spatial_patchify else 1
        need = 2 * tensor_bytes(shape, dt)
        try:
            kbuf, vbuf = self.ws.view("cache_k", shape, dt), self.ws.view("cache_v", shape, dt)
            cache_k, cache_v = [kbuf[:, o:o + total] for o in offsets], [vbuf[:, o:o + total] for o in offsets]
            for name, numel in (("x", Bp * n_max * sp.width), ("xin", Bp * n_max * sp.width),
                                ("rope_in", n_max * sp.head_dim)):
                self.ws.reserve(name, numel, torch.float32)
            summed = self.ws.view("summed", (B, sp.codebook_dim, fh * f, fw * f), torch.float32).zero_()
            bits_all = self.ws.view("bits_all", (B, total, sp.token_bits), torch.float32)
        except Exception as exc:
            if is_oom(exc):
                raise oom_error(f"preallocating the KV cache for {len(self.schedule)} scales ({total} tokens, "
                                f"batch {Bp})", exc, dev, need) from None
            raise
        x = self.ws.view("x", x0.shape, torch.float32)
        x.copy_(x0)
        return ScaleState(B=B, Bp=Bp, x=x, cond=cond, ada=ada, ca_kv=ca_kv, ca_len=ca_len, summed=summed,
                          bits_all=bits_all, cache_k=cache_k, cache_v=cache_v, cache_len=[0] * sp.depth,
                          updates=[None] * sp.depth)

    def _scale(self, st: "ScaleState", si: int, policy: Policy, trace: PolicyTrace, lap) -> None:
        """Run scale ``si`` on ``st`` (updated in place): every layer with the policy's decisions, the
        head and sampling, the summed codes and the next scale's input. ``lap(si, piece)`` marks pieces."""
        be, sp = self.backend, self.spec
        dev = be.device
        owns = getattr(be, "owns_outputs", False)
        split_head = lap is not _no_lap and hasattr(be, "head_logits") and hasattr(be, "head_sample")
        in_cache = hasattr(be, "block_in_cache")
        restore = policy.restore_pruned
        B, cache_k, cache_v, cache_len, updates = st.B, st.cache_k, st.cache_v, st.cache_len, st.updates
        h, w = self.schedule[si]
        n = h * w
        if hasattr(be, "begin_scale"):
            be.begin_scale(si)
        if st.Bp > B and not (st.use_cfg and policy.use_cfg(si)):
            st.Bp, st.x, st.cond, st.ada, st.ca_kv, st.ca_len = (B, st.x[:B], st.cond[:B], st.ada[:B],
                                                                  st.ca_kv[:B], st.ca_len[:B])
        Bp, x, ada, ca_kv, ca_len = st.Bp, st.x, st.ada, st.ca_kv, st.ca_len
        n_out, n = n, x.shape[1]  # tokens sampled / run through the blocks (HART's scale 0: the context tokens)
        rope = self.ropes[si] if self.ropes[si].shape[1] == n else self.ropes[si][:, :n]
        trace.tokens[si], trace.kept[si], trace.cfg_batch[si] = n, [], Bp > B
        lap(si, "other")
        for layer in range(sp.depth):
            runner = policy.block_runner(si, layer)
            if runner is not None:  # the policy runs this layer itself (FastVAR's sub-layer pruning)
                lap(si, "policy")
                P = cache_len[layer]
                xo, k, v = runner(be, layer, x, ada, ca_kv, ca_len, rope, *heads_view(cache_k, cache_v, layer, Bp, P))
                m = k.shape[2]
                cache_k[layer][:Bp, P:P + m] = k.transpose(1, 2)
                cache_v[layer][:Bp, P:P + m] = v.transpose(1, 2)
                cache_len[layer] = P + m
                if owns:
                    x.copy_(xo)
                else:
                    x = xo
                trace.kept[si].append(m)
                lap(si, "pruned" if m < n else "dense")
                continue
            idx = policy.keep(si, layer, n)
            if idx is not None and idx.numel() == 0:
                trace.kept[si].append(0)
                if restore and updates[layer] is not None:  # the skipped layer's last update, resized
                    u = resized_update(updates[layer], (h, w), Bp)
                    x, updates[layer] = x + u, (u, (h, w))
                lap(si, "policy")
                continue
            want = policy.wants_entropy(si, layer)
            lap(si, "policy")
            P = cache_len[layer]
            if idx is None:
                xo, ent = self._block(st, layer, x, rope, None, want, in_cache)
                m = n
                if restore:
                    updates[layer] = (xo.float() - x, (h, w))
                if owns:
                    x.copy_(xo)
                else:
                    x = xo
                lap(si, "dense")
                ent = None if not want else (ent[:B].clone() if owns else ent[:B])
            else:  # kept tokens: one set for the batch (k,), or one per sample (B, k) run sample by sample
                idx = idx.to(dev)
                per_row = idx.dim() == 2
                m = idx.shape[-1]
                u = None
                if restore:  # kept tokens: their update; pruned ones: the previous scale's, resized
                    u = (resized_update(updates[layer], (h, w), Bp) if updates[layer] is not None
                         else torch.zeros_like(x))
                ents = []
                for b in (range(B) if per_row else (None,)):
                    ib = idx[b] if per_row else idx
                    xr = rows_view(x, b, B)
                    xin = torch.index_select(xr, 1, ib, out=self.ws.view("xin", (xr.shape[0], m, sp.width), x.dtype))
                    rin = torch.index_select(rope, 1, ib,
                                             out=self.ws.view("rope_in", (2, m, rope.shape[-1]), rope.dtype))
                    lap(si, "gather_scatter")
                    xo, ent = self._block(st, layer, xin, rin, b, want, in_cache)
                    lap(si, "pruned")
                    if restore:
                        rows_view(u, b, B).index_copy_(1, ib, xo.float() - xin)
                    else:
                        xr.index_copy_(1, ib, xo)
                    if want:  # the conditional row(s)
                        ent = ent[:1] if per_row else ent[:B]
                        ents.append(ent.clone() if owns or per_row else ent)
                    lap(si, "gather_scatter")
                if restore:
                    x, updates[layer] = x + u, (u, (h, w))
                ent = (ents[0] if len(ents) == 1 else torch.cat(ents)) if want else None
            cache_len[layer] = P + m
            trace.kept[si].append(m)
            if want:
                policy.observe(si, layer, ent, idx)
                lap(si, "policy")
        lap(si, "sampling")
        dst = st.bits_all[:, st.off:st.off + n_out]
        tau_t = st.tau_t[si:si + 1]
        if not st.groups:  # one CFG setting for every row
            bits = self._head(si, x, st.cond, st.noise[si], st.cfg_t[0, si:si + 1], tau_t, st, split_head, lap)
        else:  # the head on each CFG setting's rows
            bits = self.ws.view("bits_rows", (B, n_out, sp.token_bits), torch.float32)
            for g, (_, rows, cfg_rows) in enumerate(st.groups):
                xr = cfg_rows if Bp > B else rows
                bits.index_copy_(0, rows, self._head(si, x.index_select(0, xr), st.cond.index_select(0, xr),
                                                     st.noise[si].index_select(0, rows), st.cfg_t[g, si:si + 1],
                                                     tau_t, st, split_head, lap))
        dst.copy_(bits)
        st.bits_out.append(dst)
        st.off += n_out
        lap(si, "sampling")
        summed_new, x_next = be.next_input(si, bits, st.summed)
        if owns:
            st.summed.copy_(summed_new)
        else:
            st.summed = summed_new
        if x_next is not None:
            h2, w2 = self.schedule[si + 1]
            x = self.ws.view("x", (Bp, h2 * w2, sp.width), torch.float32)
            x.view(Bp // B, B, h2 * w2, sp.width).copy_(x_next.unsqueeze(0).expand(Bp // B, -1, -1, -1))
        st.x = x
        lap(si, "next_input")

    def _block(self, st: "ScaleState", layer: int, xin, rin, b: int | None, want: bool, in_cache: bool):
        """Block ``layer`` on xin (B' rows, or sample b's rows (``rows_view``)) with RoPE rows rin, its new
        keys/values written into the layer's cache at its fill -> (x_out, entropy | None)."""
        be, B, Bp = self.backend, st.B, st.Bp
        P, m = st.cache_len[layer], xin.shape[1]
        ada, ca_kv, ca_len = (rows_view(t, b, B) for t in (st.ada, st.ca_kv, st.ca_len))
        if in_cache:
            return be.block_in_cache(layer, xin, ada, ca_kv, ca_len, rin,
                                     *heads_view(st.cache_k, st.cache_v, layer, Bp, None, b, B), P, want)
        xo, k, v, ent = be.block(layer, xin, ada, ca_kv, ca_len, rin,
                                 *heads_view(st.cache_k, st.cache_v, layer, Bp, P, b, B), want)
        rows_view(st.cache_k[layer][:Bp], b, B)[:, P:P + m] = k.transpose(1, 2)
        rows_view(st.cache_v[layer][:Bp], b, B)[:, P:P + m] = v.transpose(1, 2)
        return xo, ent

    def _head(self, si: int, x, cond, uniform, cfg_t, tau_t, st: "ScaleState", split_head: bool, lap):
        """The head (logits + bit sampling) of scale ``si`` on x (B', n, C) -> bits (B, n, bits)."""
        be = self.backend
        if split_head:
            logits = be.head_logits(si, x, cond)
            lap(si, "head")
            bits = be.head_sample(si, logits, uniform, cfg_t, tau_t, st.top_p_t)
            lap(si, "sampling")
        else:
            bits = be.head(si, x, cond, uniform, cfg_t, tau_t, st.top_p_t)
            lap(si, "head")
        return bits

    def release(self) -> None:
        """Free the preallocated buffers, the scale graphs and the backend's block graphs (they are otherwise
        kept for the next call)."""
        self.release_graphs()
        self.ws.clear()


class _oom_guard:
    """Turns an allocation failure inside the block into a one-line OutOfMemoryAtScale naming ``where``."""

    def __init__(self, where: str, device: torch.device):
        self.where, self.device = where, device

    def __enter__(self):
        return self

    def __exit__(self, typ, exc, tb):
        if exc is not None and not isinstance(exc, OutOfMemoryAtScale) and is_oom(exc):
            raise oom_error(self.where, exc, self.device) from None
        return False


def _no_lap(si: int, piece: str) -> None:
    """``_Timer.lap`` of an unprofiled run."""


class _Timer:
    """Per-stage timing: CUDA events on a CUDA device (no synchronisation until the end), else
    ``time.perf_counter`` (CPU work is synchronous). Inactive unless ``enabled``.

    ``start``/``stop`` time a key (a scale index or a stage name); ``lap(si, piece)`` attributes the time
    since the previous mark (the scale's ``start`` or the previous lap) to ``piece`` of scale ``si``, so the
    laps of a scale tile its start..stop interval; ``piece_ms`` sums them per scale and piece.
    """

    def __init__(self, device: torch.device, enabled: bool):
        self.enabled, self.cuda = enabled, device.type == "cuda"
        self._t: dict = {}
        self._laps: list[tuple[int, str, object, object]] = []
        self._last = None

    def _now(self):
        if self.cuda:
            ev = torch.cuda.Event(enable_timing=True)
            ev.record()
            return ev
        return time.perf_counter()

    def _elapsed(self, a, b) -> float:
        return a.elapsed_time(b) if self.cuda else (b - a) * 1e3

    def start(self, key) -> None:
        if not self.enabled:
            return
        self._last = self._now()
        self._t[key] = [self._last, None]

    def stop(self, key) -> None:
        if not self.enabled:
            return
        self._t[key][1] = self._now()

    def lap(self, si: int, piece: str) -> None:
        if not self.enabled:
            return
        now = self._now()
        self._laps.append((si, piece, self._last, now))
        self._last = now

    def ms(self, key) -> float:
        a, b = self._t.get(key, (None, None))
        if a is None or b is None:
            return float("nan")
        return self._elapsed(a, b)

    def piece_ms(self) -> dict[int, dict[str, float]]:
        """{scale: {piece: ms}} in ``PIECES`` order (call after the device is synchronised)."""
        acc: dict[int, dict[str, float]] = {}
        for si, piece, a, b in self._laps:
            d = acc.setdefault(si, {})
            d[piece] = d.get(piece, 0.0) + self._elapsed(a, b)
        return {si: {p: d[p] for p in PIECES if p in d} for si, d in acc.items()}
