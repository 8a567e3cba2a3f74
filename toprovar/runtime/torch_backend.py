"""PyTorch backend: runs the pieces of ``toprovar.model.pieces`` directly (CPU or CUDA).

On CUDA, with ``cuda_graphs=True``, the orchestrator captures whole scales when the policy's decisions
are static (``toprovar.runtime.scale_graphs``). Otherwise block calls are replayed from CUDA graphs: a
block call is captured the first time its (layer, entropy, shapes, input addresses) are seen and replayed
afterwards. The orchestrator's workspace keeps the KV caches, the residual stream and the gathered kept
tokens at stable addresses, and this backend copies the per-prompt conditioning into its own stable
buffers, so block calls replay with no input copies.

``compile=True`` runs the block pieces and the VAE decoder through ``torch.compile`` (Inductor): the
per-block float32 elementwise work (LayerNorm/AdaLN modulation, q/k normalisation, RoPE, residual
updates) fuses into a few kernels around the matrix products and attention. The compiled callables wrap
the same modules (the exported pieces); token counts are dynamic (``dynamic=True``), so one compilation
serves every scale and kept-token count (plus Inductor's size-0/1 specialisations at the first scales).
"""
from __future__ import annotations

import torch

from ..model.infinity import Infinity
from ..model.pieces import BlockPiece, ConditionPiece, HeadPiece, NextInputPiece
from ..sampling import sample_bits
from .buffers import Workspace


class TorchBackend:
    """The reference backend; the exported ONNX pieces are these same modules."""

    name = "torch"

    def __init__(self, model: Infinity, decoder: torch.nn.Module, schedule: list[tuple[int, int]],
                 cuda_graphs: bool = False, compile: bool = False):
        self.model, self.decoder = model, decoder
        self.device = model.word_embed.weight.device
        self.dtype = model.compute_dtype
        self.cond_pieces = {c: ConditionPiece(model, c) for c in (False, True)}
        self.blocks = [(BlockPiece(b, False), BlockPiece(b, True)) for b in model.blocks]
        self._decode = decoder
        self.compiled = compile
        if compile:
            self.blocks = [tuple(_compiled(p, dynamic=True) for p in pair) for pair in self.blocks]
            self._decode = _compiled(decoder, dynamic=False)
        self.head_piece = HeadPiece(model)
        self.next_pieces = [NextInputPiece(model, schedule, si) for si in range(len(schedule))]
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
        args = (x, ada, ca_kv, ca_lengths, rope, past_k, past_v)
        piece = self.blocks[layer][int(entropy)]
        out = None
        if self.cuda_graphs and not torch.cuda.is_current_stream_capturing():  # inside a scale graph: plain call
            try:
                out = self._graphed(layer, entropy, piece, args)
            except torch.OutOfMemoryError:  # graph memory is a cache: drop it and run this call eagerly
                self.drop_graphs()
        if out is None:
            out = piece(*args)
        return out if entropy else (*out, None)

    def _graphed(self, layer: int, entropy: bool, piece: BlockPiece, args: tuple) -> tuple:
        key = (layer, entropy) + tuple((tuple(a.shape), a.stride(), a.data_ptr()) for a in args)
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
        graph, outs = hit
        graph.replay()
        return outs[:3] + tuple(o.clone() for o in outs[3:])  # entropy: the policy may keep it

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
        return self.head_piece(x, cond, uniform, cfg, tau, top_p)

    # The head piece in two calls (same ops as HeadPiece.forward): profiled runs time logits and sampling apart.
    def head_logits(self, si, x, cond):
        return self.model.logits(x, cond)

    def head_sample(self, si, logits, uniform, cfg, tau, top_p):
        return sample_bits(logits, uniform, cfg, tau, top_p, self.head_piece.top_k)

    def next_input(self, si, bits, summed):
        out = self.next_pieces[si](bits, summed)
        return out[0], (out[1] if len(out) > 1 else None)

    def decode(self, summed):
        return self._decode(summed.to(next(self.decoder.parameters()).dtype)).float()

    def synchronize(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)


def _compiled(module: torch.nn.Module, dynamic: bool):
    """``torch.compile`` of a module (whole graph, no CUDA graphs of its own: this backend captures them).

    Every block shares one code object (``BlockPiece.forward``): its variants (with/without entropy, the
    size-0/1 specialisations of the first scales) need more than dynamo's default 8 recompilations.
    """
    import torch._dynamo.config as dynamo_config
    dynamo_config.recompile_limit = max(dynamo_config.recompile_limit, 64)
    return torch.compile(module, dynamic=dynamic, fullgraph=True)
