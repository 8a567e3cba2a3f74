"""PyTorch backend: runs the pieces of ``toprovar.model.pieces`` directly (CPU or CUDA).

On CUDA, block calls can be replayed from CUDA graphs (``cuda_graphs=True``): a block call is captured
the first time its (layer, entropy, shapes, input addresses) are seen and replayed afterwards. The
orchestrator's workspace keeps the KV caches and the residual stream at stable addresses, and this
backend copies the per-prompt conditioning into its own stable buffers, so unpruned layers replay with
no input copies; pruned layers (gathered inputs of varying size) run eagerly.
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
                 cuda_graphs: bool = False):
        self.model, self.decoder = model, decoder
        self.device = model.word_embed.weight.device
        self.dtype = model.compute_dtype
        self.cond_pieces = {c: ConditionPiece(model, c) for c in (False, True)}
        self.blocks = [(BlockPiece(b, False), BlockPiece(b, True)) for b in model.blocks]
        self.head_piece = HeadPiece(model)
        self.next_pieces = [NextInputPiece(model, schedule, si) for si in range(len(schedule))]
        self.cuda_graphs = cuda_graphs and self.device.type == "cuda"
        self._graphs: dict[tuple, tuple[torch.cuda.CUDAGraph, tuple]] = {}
        # more graphs than one per (layer, scale) means addresses or pruning patterns vary
        # between calls: then all are dropped (their static outputs freed) and re-captured
        self._max_graphs = len(self.blocks) * len(schedule)
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
        if self.cuda_graphs:
            try:
                out = self._graphed(layer, entropy, piece, args)
            except torch.OutOfMemoryError:  # graph memory is a cache: drop it and run this call eagerly
                self._drop_graphs()
        if out is None:
            out = piece(*args)
        return out if entropy else (*out, None)

    def _graphed(self, layer: int, entropy: bool, piece: BlockPiece, args: tuple) -> tuple:
        key = (layer, entropy) + tuple((tuple(a.shape), a.stride(), a.data_ptr()) for a in args)
        hit = self._graphs.get(key)
        if hit is None:
            if len(self._graphs) >= self._max_graphs:
                self._drop_graphs()
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

    def _drop_graphs(self) -> None:
        """Free every captured graph with its static outputs and start a fresh memory pool."""
        torch.cuda.synchronize(self.device)
        self._graphs.clear()
        self._pool = torch.cuda.graph_pool_handle()
        torch.cuda.empty_cache()

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
        return self.decoder(summed.to(next(self.decoder.parameters()).dtype)).float()

    def synchronize(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
