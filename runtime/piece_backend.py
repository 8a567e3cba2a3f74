"""The orchestrator's ``Backend`` protocol over the exported pieces of an export directory.

``PieceBackend`` maps each protocol call to a piece of the manifest (names from ``docs/export-format.md``:
``condition_cfg``/``condition``, ``block_{l:02d}[_entropy]``, ``head_s{si:02d}[_nocfg]``,
``next_input_s{si:02d}``, ``vae_decoder``, ``text_encoder``) and binds tensors by the piece's input and
output names. Subclasses (ONNX Runtime, TensorRT) implement ``_execute``: run one piece on the given
input tensors, writing the outputs into the given output tensors (or returning the ones it allocated
where an output's shape is not known before running).

Outputs live in the backend's workspace, one buffer per piece kind and output name, reused by every
layer and scale (``owns_outputs``): the orchestrator copies what it keeps before the next call.
Non-contiguous inputs (the KV-cache prefix views) are staged into reused contiguous buffers.
"""
from __future__ import annotations

import math
import re
from typing import Mapping

import torch

from .buffers import ONNX_ELEMENT_TYPES, TORCH_DTYPES, Workspace

_FACTOR = re.compile(r"^\s*(\d+)\s*\*\s*([A-Za-z_][A-Za-z_0-9]*)\s*$")
_SYMBOL = re.compile(r"^[A-Za-z_][A-Za-z_0-9]*$")


class PieceError(ValueError):
    """A piece that is missing or called with tensors its manifest entry does not accept (one line)."""


def piece_kind(name: str) -> str:
    """Buffer family of a piece: every block shares one set of output buffers, every head another, ..."""
    for prefix in ("block_", "head_s", "next_input_s", "policy_s", "condition", "diffusion_head"):
        if name.startswith(prefix):
            return prefix.rstrip("_s").rstrip("_")
    return name


def bind_symbols(piece: str, specs: list[dict], tensors: Mapping[str, torch.Tensor]) -> dict[str, int]:
    """Symbol values ({'B': 1, 'n': 36, ...}) from the actual input shapes; PieceError on a mismatch."""
    env: dict[str, int] = {}
    for spec in specs:
        t = tensors[spec["name"]]
        want = spec["shape"]
        if len(want) != t.dim():
            raise PieceError(f"piece {piece}: input {spec['name']} has shape {list(t.shape)}, expected rank "
                             f"{len(want)} {want}")
        for d, (w, got) in enumerate(zip(want, t.shape)):
            if isinstance(w, int):
                if w != got:
                    raise PieceError(f"piece {piece}: input {spec['name']} has shape {list(t.shape)}, expected {want}")
                continue
            m = _FACTOR.match(w)
            sym, val = (m.group(2), got // int(m.group(1))) if m else (w.strip(), got)
            if m and got % int(m.group(1)):
                raise PieceError(f"piece {piece}: input {spec['name']} dim {d} = {got} is not {w}")
            if not (m or _SYMBOL.match(sym)):
                continue  # an expression we do not evaluate
            if env.setdefault(sym, val) != val:
                raise PieceError(f"piece {piece}: input {spec['name']} dim {d} = {got} disagrees with {sym} = "
                                 f"{env[sym]} of another input")
    return env


def resolve_shape(shape: list, env: Mapping[str, int]) -> tuple[int, ...] | None:
    """A manifest shape with symbols (``B``, ``2*B``) evaluated, or None when a symbol is unknown."""
    out = []
    for d in shape:
        if isinstance(d, int):
            out.append(d)
            continue
        m = _FACTOR.match(d)
        if m and m.group(2) in env:
            out.append(int(m.group(1)) * env[m.group(2)])
        elif d.strip() in env:
            out.append(env[d.strip()])
        else:
            return None
    return tuple(out)


class PieceBackend:
    """Backend protocol over exported pieces; subclasses implement ``_execute`` (and loading)."""

    name = "pieces"
    owns_outputs = True
    alignment = 1  # bytes; input addresses not a multiple of it are staged (TensorRT: 256)

    def __init__(self, manifest, device: torch.device | str):
        self.manifest = manifest
        self.device = torch.device(device)
        if self.device.type == "cuda" and self.device.index is None:
            self.device = torch.device("cuda", torch.cuda.current_device())
        self.dtype = TORCH_DTYPES[manifest["dtype"]]
        self.pieces: dict[str, dict] = manifest["pieces"]
        self.schedule = [tuple(s) for s in manifest["schedule"]]
        self.ws = Workspace(self.device)
        self.si = 0

    # ------------------------------------------------------------------ subclass interface
    def _execute(self, name: str, inputs: dict[str, torch.Tensor], outputs: dict[str, torch.Tensor | None]
                 ) -> dict[str, torch.Tensor]:
        """Run piece ``name``; ``outputs`` maps each output name to its preallocated tensor or None."""
        raise NotImplementedError

    # ------------------------------------------------------------------ generic piece call
    def require(self, name: str) -> dict:
        try:
            return self.pieces[name]
        except KeyError:
            have = sorted(self.pieces)
            raise PieceError(f"piece {name!r} is not in this export ({self.manifest.root}); it has "
                             f"{', '.join(have[:8])}{' ...' if len(have) > 8 else ''}; re-run toprovar-export") from None

    def has(self, name: str) -> bool:
        return name in self.pieces

    def run_piece(self, name: str, feeds: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Run any piece by name on named torch tensors (the policy pieces use this). Outputs are the
        backend's buffers, valid until the next call of a piece of the same kind."""
        spec = self.require(name)
        missing = [i["name"] for i in spec["inputs"] if i["name"] not in feeds]
        if missing:
            raise PieceError(f"piece {name}: inputs {missing} not given (it takes "
                             f"{[i['name'] for i in spec['inputs']]})")
        kind = piece_kind(name)
        inputs = {}
        for i in spec["inputs"]:
            t = feeds[i["name"]]
            want = TORCH_DTYPES[i["dtype"]]
            if t.device != self.device or t.dtype != want:
                t = t.to(self.device, want)
            inputs[i["name"]] = self.ws.stage(f"in:{kind}:{i['name']}", t, self.alignment)
        env = bind_symbols(name, spec["inputs"], inputs)
        outputs: dict[str, torch.Tensor | None] = {}
        for o in spec["outputs"]:
            shape = resolve_shape(o["shape"], env)
            outputs[o["name"]] = (None if shape is None else
                                  self.ws.view(f"out:{kind}:{o['name']}", shape, TORCH_DTYPES[o["dtype"]]))
        return self._execute(name, inputs, outputs)

    # ------------------------------------------------------------------ Backend protocol
    def prepare(self, schedule, batch: int, cfg: bool, text_len: int) -> None:
        """Size every per-call buffer for the largest scale once, so the scale loop never allocates."""
        m = self.manifest["spec"] if "spec" in self.manifest else self.manifest["model"]
        C, H = m["width"], m["num_heads"]
        hd = m.get("head_dim", C // H)
        Bp = batch * (2 if cfg else 1)
        n_max = max(h * w for h, w in schedule)
        total = sum(h * w for h, w in schedule)
        for name, numel, dt in (("out:block:x_out", Bp * n_max * C, torch.float32),
                                ("out:block:k", Bp * H * n_max * hd, self.dtype),
                                ("out:block:v", Bp * H * n_max * hd, self.dtype),
                                ("out:block:entropy", Bp * n_max, torch.float32),
                                ("in:block:past_k", Bp * H * total * hd, self.dtype),
                                ("in:block:past_v", Bp * H * total * hd, self.dtype),
                                ("out:head:bits", batch * n_max * m["token_bits"], torch.float32),
                                ("out:next_input:x_next", batch * n_max * C, torch.float32)):
            self.ws.reserve(name, numel, dt)
        for piece in ("next_input_s00", "vae_decoder"):  # summed codes and the image: batch-only shapes
            for o in self.pieces.get(piece, {}).get("outputs", []):
                shape = resolve_shape(o["shape"], {"B": batch})
                if shape is not None:
                    self.ws.reserve(f"out:{piece_kind(piece)}:{o['name']}", math.prod(shape),
                                    TORCH_DTYPES[o["dtype"]])

    def begin_scale(self, si: int) -> None:
        self.si = si

    def encode_text(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.run_piece("text_encoder", {"input_ids": input_ids, "attention_mask": attention_mask})["hidden"]

    def condition(self, text, lengths, cfg):
        out = self.run_piece("condition_cfg" if cfg else "condition", {"text": text, "lengths": lengths})
        return out["cond"], out["ada"], out["ca_kv"], out["ca_lengths"], out["x0"]

    def block(self, layer, x, ada, ca_kv, ca_lengths, rope, past_k, past_v, entropy):
        name = f"block_{layer:02d}" + ("_entropy" if entropy else "")
        out = self.run_piece(name, {"x": x, "ada": ada, "ca_kv": ca_kv, "ca_lengths": ca_lengths, "rope": rope,
                                    "past_k": past_k, "past_v": past_v})
        return out["x_out"], out["k"], out["v"], (out["entropy"] if entropy else None)

    def head(self, si, x, cond, uniform, cfg, tau, top_p):
        suffix = "_nocfg" if x.shape[0] == uniform.shape[0] else ""
        out = self.run_piece(f"head_s{si:02d}{suffix}", {"x": x, "cond": cond, "uniform": uniform, "cfg": cfg,
                                                          "tau": tau, "top_p": top_p})
        if "hard" in out and self.has("diffusion_head" + suffix):  # HART's last scale: + the residual diffusion head
            res = self.run_piece("diffusion_head" + suffix, {"x": x, "hard": out["hard"], "uniform": uniform,
                                                            "cfg": cfg})["residual"]
            return out["bits"] + res
        return out["bits"]

    def next_input(self, si, bits, summed):
        out = self.run_piece(f"next_input_s{si:02d}", {"bits": bits, "summed": summed})
        return out["summed_out"], out.get("x_next")

    def decode(self, summed):
        return self.run_piece("vae_decoder", {"summed": summed})["image"]

    def synchronize(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)


__all__ = ["ONNX_ELEMENT_TYPES", "PieceBackend", "PieceError", "bind_symbols", "piece_kind", "resolve_shape"]
