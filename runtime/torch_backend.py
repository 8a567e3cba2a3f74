"""PyTorch backend: runs the pieces of ``toprovar.model.pieces`` directly (CPU or CUDA).

On CUDA, with ``cuda_graphs=True``, the orchestrator captures whole scales when the policy's decisions
are static (``toprovar.runtime.scale_graphs``). Otherwise block calls are replayed from CUDA graphs: a
block call is captured the first time its (layer, entropy, shapes, input addresses) are seen and replayed
afterwards. The orchestrator's workspace keeps the KV caches, the residual stream and the gathered kept
tokens at stable addresses, and this backend copies the per-prompt conditioning into its own stable
buffers, so block calls replay with no input copies.

Blocks run as ``CachedBlockPiece``: the new keys/values are written into the orchestrator's KV cache in
place and attention reads the cache prefix, instead of the exported piece's concatenation (a copy of the
whole prefix per layer). Two options, on by default (``bench/small_scales.py`` measures them):

- ``text_kv_once``: the cross-attention's text keys/values (``CrossAttention.kv_proj`` of ``ca_kv``, one
  (B', L, C) x (C, 2C) product per block and scale) depend on the prompt only; ``condition`` computes them
  for every block once per generation and the blocks read the rows of them that match the ``ca_kv`` rows
  they are given (a strided view of the condition's ``ca_kv``: CFG rows, one prompt's rows). Infinity only
  (HART blocks have no cross-attention).
- ``cache_writes_inside``: the new keys/values are written into the cache by the first half of the block
  (``CachedBlockPiece.inputs_to_cache``), compiled with it: the write fuses into the kernels producing
  them instead of two copy kernels per block.

``one_graph`` (off by default, with ``compile`` only): the whole block (both halves, the cache write and
the self-attention) compiled as one graph, so Inductor may fuse across the attention call and the block
issues fewer kernels (a candidate for the launch-bound first scales; measured by ``bench/small_scales.py``).

``compile=True`` runs the two halves of each block around its self-attention (``attention_inputs``,
``attention_outputs``) and the VAE decoder through ``torch.compile`` (Inductor): the per-block float32
elementwise work (LayerNorm/AdaLN modulation, q/k normalisation, RoPE, residual updates) fuses into a
few kernels around the matrix products and attention. The compiled callables are methods of the same
modules (the exported pieces); token counts are dynamic (``dynamic=True``), so one compilation serves
every scale and kept-token count (plus Inductor's size-0/1 specialisations at the first scales).
"""
from __future__ import annotations

import torch

from toprovar.model import families
from toprovar.model.layers import CrossAttnBlock
from toprovar.model.pieces import CachedBlockPiece
from .buffers import Workspace


class TorchBackend:
    """The reference backend; the exported ONNX pieces are these same modules."""

    name = "torch"

    def __init__(self, model: torch.nn.Module, decoder: torch.nn.Module, schedule: list[tuple[int, int]],
                 cuda_graphs: bool = False, compile: bool = False, text_kv_once: bool = True,
                 cache_writes_inside: bool = True, one_graph: bool = False):
        """model: a family's transformer (``toprovar.model.families``: Infinity or HART); its pieces come from
        the family. ``text_kv_once``, ``cache_writes_inside``, ``one_graph``: see the module docstring."""
        self.model, self.decoder = model, decoder
        self.device = model.word_embed.weight.device
        self.dtype = model.compute_dtype
        self.cond_pieces = {c: families.condition_piece(model, c) for c in (False, True)}
        self._decode = decoder
        self.compiled = compile
        self.text_kv_once = text_kv_once and all(isinstance(b, CrossAttnBlock) for b in model.blocks)
        self._ca_kv = self._ca_kv_proj = None  # the condition's ca_kv and its per-block projections
        self.blocks = [CachedBlockPiece(b, writes_inside=cache_writes_inside) for b in model.blocks]
        if compile:
            for p in self.blocks:
                if one_graph:
                    p.whole = _compiled(p.forward, dynamic=True)
                else:
                    p.inputs, p.outputs = _compiled(p.inputs, dynamic=True), _compiled(p.outputs, dynamic=True)
            self._decode = _compiled(decoder, dynamic=False)
        self.head_pieces = [families.head_piece(model, schedule, si) for si in range(len(schedule))]
        self.next_pieces = [families.next_input_piece(model, schedule, si) for si in range(len(schedule))]
        self._head_x = None
        self.cuda_graphs = cuda_graphs and self.device.type == "cuda"
        self.capture_scales = self.cuda_graphs  # the orchestrator may capture whole scales (scale_graphs)
        self._graphs: dict[tuple, tuple[torch.cuda.CUDAGraph, tuple]] = {}
        # one graph per (layer, scale) and policy variant (with/without entropy, a pruned count); more than
        # three per (layer, scale) means addresses or pruning patterns vary between calls: then all are
        # dropped (their static outputs freed) and re-captured
        self._max_graphs = 3 * len(self.blocks) * len(schedule)
        self._pool = torch.cuda.graph_pool_handle() if self.cuda_graphs else None
        self._ws = Workspace(self.device)
        self._compiled_fns: dict = {}

    def compiled_fn(self, fn):
        """``fn`` as this backend runs it: with ``compile`` its ``torch.compile``d version (one per function,
        static shapes: a recompilation per token count), else ``fn`` itself. For a policy that runs a layer
        itself (FastVAR's per-sub-layer block), so its layers fuse like the backend's own blocks."""
        if not self.compiled:
            return fn
        if fn not in self._compiled_fns:
            self._compiled_fns[fn] = _compiled(fn, dynamic=False)
        return self._compiled_fns[fn]

    def condition(self, text, lengths, cfg):
        out = self.cond_pieces[cfg](text, lengths)
        if self.cuda_graphs:
            names = ("cond", "ada", "ca_kv", "ca_lengths", "x0")
            out = tuple(self._ws.view(n, t.shape, t.dtype).copy_(t) for n, t in zip(names, out))
        if self.text_kv_once:
            self._ca_kv, self._ca_kv_proj = out[2], self._project_text(out[2])
        return out

    def _project_text(self, ca_kv: torch.Tensor) -> torch.Tensor:
        """ca_kv (B', L, C) -> every block's text keys/values (B', depth, L, 2C) in the compute dtype (a
        stable buffer with CUDA graphs: scale graphs read it; it grows only with ca_kv's buffer, whose address
        the scale plans are bound to, so a plan never reads a moved projection)."""
        Bp, L, C = ca_kv.shape
        shape = (Bp, len(self.blocks), L, 2 * C)
        out = self._ws.view("ca_kv_proj", shape, self.dtype) if self.cuda_graphs else torch.empty(
            shape, dtype=self.dtype, device=self.device)
        for i, p in enumerate(self.blocks):
            out[:, i].copy_(p.block.ca.kv_proj(ca_kv))
        return out

    def _text_kv_rows(self, layer: int, ca_kv: torch.Tensor) -> torch.Tensor | None:
        """The precomputed text keys/values (B, L, 2C) of block ``layer`` for the rows of ``ca_kv``, a view
        (rows r0, r0 + s, ...: the orchestrator's CFG truncation or one prompt's rows) of the condition's
        ca_kv; None when ``ca_kv`` is not such a view (then the block projects it itself)."""
        base = self._ca_kv
        if (base is None or ca_kv.dim() != 3 or ca_kv.shape[1:] != base.shape[1:] or ca_kv.stride()[1:] !=
                base.stride()[1:] or ca_kv.untyped_storage().data_ptr() != base.untyped_storage().data_ptr()):
            return None
        row, n = base.stride(0), ca_kv.shape[0]
        off = ca_kv.storage_offset() - base.storage_offset()
        step = ca_kv.stride(0) // row if n > 1 else 1
        if off < 0 or off % row or (n > 1 and (ca_kv.stride(0) % row or step < 1)):
            return None
        start = off // row
        if start + step * (n - 1) >= base.shape[0]:
            return None
        return self._ca_kv_proj[start::step][:ca_kv.shape[0], layer]

    def block(self, layer, x, ada, ca_kv, ca_lengths, rope, past_k, past_v, entropy):
        """The Backend protocol's block (cache prefix in, new keys/values out): ``block_in_cache`` on a
        copy of the prefix with room for the new ones."""
        P, n = past_k.shape[2], x.shape[1]
        room = lambda t: torch.cat([t, t.new_empty(*t.shape[:2], n, t.shape[3])], dim=2)  # noqa: E731
        cache_k, cache_v = room(past_k), room(past_v)
        xo, ent = self.block_in_cache(layer, x, ada, ca_kv, ca_lengths, rope, cache_k, cache_v, P, entropy)
        return xo, cache_k[:, :, P:], cache_v[:, :, P:], ent

    def block_in_cache(self, layer, x, ada, ca_kv, ca_lengths, rope, cache_k, cache_v, past, entropy):
        """Block ``layer`` writing its new keys/values into cache_k/cache_v (B', H, >= past+n, hd) at
        [past, past+n) -> x (B', n, C) float32, entropy (B', n) float32 | None (``CachedBlockPiece``)."""
        kv_proj = self._text_kv_rows(layer, ca_kv) if self.text_kv_once else None
        args = (x, ada, ca_kv, ca_lengths, rope, cache_k, cache_v, past, entropy, kv_proj)
        piece = self.blocks[layer]
        if self.cuda_graphs and not torch.cuda.is_current_stream_capturing():  # inside a scale graph: plain call
            try:
                return self._graphed(layer, piece, args)
            except torch.OutOfMemoryError:  # graph memory is a cache: drop it and run this call eagerly
                self.drop_graphs()
        return piece(*args)

    def _graphed(self, layer: int, piece: CachedBlockPiece, args: tuple) -> tuple:
        key = (layer,) + tuple((tuple(a.shape), a.stride(), a.data_ptr()) if torch.is_tensor(a) else a
                               for a in args)
        hit = self._graphs.get(key)
        if hit is None:
            if len(self._graphs) >= self._max_graphs:
                self.drop_graphs()
            side = torch.cuda.Stream(self.device)
            side.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(side):
                piece(*args)  # warm-up outside capture (library handles, workspaces)
            torch.cuda.current_stream(self.device).wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self._pool):
                outs = piece(*args)
            hit = self._graphs[key] = (graph, outs)
        graph, (xo, ent) = hit
        graph.replay()
        return xo, (None if ent is None else ent.clone())  # entropy: the policy may keep it

    def drop_graphs(self) -> bool:
        """Free every captured block graph with its static outputs and start a fresh memory pool; returns
        whether there were any."""
        had = bool(self._graphs)
        if not self.cuda_graphs:
            return had
        torch.cuda.synchronize(self.device)
        self._graphs.clear()
        self._pool = torch.cuda.graph_pool_handle()
        torch.cuda.empty_cache()
        return had

    def head(self, si, x, cond, uniform, cfg, tau, top_p):
        return self.head_pieces[si](x, cond, uniform, cfg, tau, top_p)

    # The head piece in two calls (same ops as its forward): profiled runs time logits and sampling apart.
    def head_logits(self, si, x, cond):
        self._head_x = x  # HART's last-scale sampling (its diffusion head) reads the last layer's output
        return self.head_pieces[si].logits(x, cond)

    def head_sample(self, si, logits, uniform, cfg, tau, top_p):
        x, self._head_x = self._head_x, None
        return self.head_pieces[si].sample(logits, uniform, cfg, tau, top_p, x=x)

    def next_input(self, si, bits, summed):
        out = self.next_pieces[si](bits, summed)
        return out[0], (out[1] if len(out) > 1 else None)

    def decode(self, summed):
        return self._decode(summed.to(next(self.decoder.parameters()).dtype)).float()

    def synchronize(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)


def _compiled(fn, dynamic: bool):
    """``torch.compile`` of a module or method (whole graph, no CUDA graphs of its own: this backend
    captures them).

    Every block shares the code objects of its two halves: their variants (the 32-60 block instances, the
    size-0/1 specialisations of the first scales) need more than dynamo's default 8 recompilations.
    """
    import torch._dynamo.config as dynamo_config
    dynamo_config.recompile_limit = max(dynamo_config.recompile_limit, 256)
    dynamo_config.accumulated_recompile_limit = max(dynamo_config.accumulated_recompile_limit, 4096)
    return torch.compile(fn, dynamic=dynamic, fullgraph=True)
