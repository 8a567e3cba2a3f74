"""PyTorch backend: runs the pieces of ``toprovar.model.pieces`` directly (CPU or CUDA)."""
from __future__ import annotations

import torch

from ..model.infinity import Infinity
from ..model.pieces import BlockPiece, ConditionPiece, HeadPiece, NextInputPiece


class TorchBackend:
    """The reference backend; the exported ONNX pieces are these same modules."""

    name = "torch"

    def __init__(self, model: Infinity, decoder: torch.nn.Module, schedule: list[tuple[int, int]]):
        self.model, self.decoder = model, decoder
        self.device = model.word_embed.weight.device
        self.dtype = model.compute_dtype
        self.cond_pieces = {c: ConditionPiece(model, c) for c in (False, True)}
        self.blocks = [(BlockPiece(b, False), BlockPiece(b, True)) for b in model.blocks]
        self.head_piece = HeadPiece(model)
        self.next_pieces = [NextInputPiece(model, schedule, si) for si in range(len(schedule))]

    def condition(self, text, lengths, cfg):
        return self.cond_pieces[cfg](text, lengths)

    def block(self, layer, x, ada, ca_kv, ca_lengths, rope, past_k, past_v, entropy):
        out = self.blocks[layer][int(entropy)](x, ada, ca_kv, ca_lengths, rope, past_k, past_v)
        return out if entropy else (*out, None)

    def head(self, si, x, cond, uniform, cfg, tau, top_p):
        return self.head_piece(x, cond, uniform, cfg, tau, top_p)

    def next_input(self, si, bits, summed):
        out = self.next_pieces[si](bits, summed)
        return out[0], (out[1] if len(out) > 1 else None)

    def decode(self, summed):
        return self.decoder(summed.to(next(self.decoder.parameters()).dtype)).float()

    def synchronize(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
