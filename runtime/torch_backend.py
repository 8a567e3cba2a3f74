"""PyTorch backend: runs the pieces of ``toprovar.model.pieces`` directly (CPU or CUDA).

On CUDA, with ``cuda_graphs=True``, the orchestrator captures whole scales when the policy's decisions
are static (``toprovar.runtime.scale_graphs``). Otherwise block calls are replayed from CUDA graphs: a
block call is captured the first time its (layer, entropy, shapes, input addresses) are seen and replayed
afterwards. The orchestrator's workspace keeps the KV caches, the residual stream and the gathered kept
tokens at stable addresses, and this backend copies the per-prompt conditioning into its own stable
buffers, so block calls replay with no input copies.

Blocks run as ``CachedBlockPiece``: the new keys/values are written into the orchestrator's KV cache in
place and attention reads the cache prefix, instead of the exported piece's concatenation (a copy of the
whole prefix per layer).

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
from toprovar.model.pieces import CachedBlockPiece
from .buffers import Workspace


class TorchBackend:
    """The reference backend; the exported ONNX pieces are these same modules."""

    name = "torch"

    def __init__(self, model: torch.nn.Module, decoder: torch.nn.Module, schedule: list[tuple[int, int]],
                 cuda_graphs: bool = False, compile: bool = False):
        """model: a family's transformer (``toprovar.model.families``: Infinity or HART); its pieces come from
        the family."""
        self.model, self.decoder = model, decoder
        self.device = model.word_embed.weight.device
        self.dtype = model.compute_dtype
        self.cond_pieces = {c: families.condition_piece(model, c) for c in (False, True)}
        self._decode = decoder
        self.compiled = compile
        if compile:
            self.blocks = [CachedBlockPiece(b, _compiled(b.attention_inputs, dynamic=True),
                                            _compiled(b.attention_outputs, dynamic=True)) for b in model.blocks]
            self._decode = _compiled(decoder, dynamic=False)
        else:
            self.blocks = [CachedBlockPiece(b) for b in model.blocks]
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

    def condition(self, text, lengths, cfg):
        out = self.cond_pieces[cfg](text, lengths)
        if not self.cuda_graphs:
            return out
        names = ("cond", "ada", "ca_kv", "ca_lengths", "x0")
        return tuple(self._ws.view(n, t.shape, t.dtype).copy_(t) for n, t in zip(names, out))

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
        args = (x, ada, ca_kv, ca_lengths, rope, cache_k, cache_v, past, entropy)
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
