"""Device buffers that live across scales and generations, dtype tables and out-of-memory errors.

A ``Workspace`` holds one flat, grow-only buffer per name and dtype and hands out contiguous views of the
exact shape asked for: a scale's activations, the gathered kept tokens, a piece's outputs. Reserving the
largest size once (``reserve``) keeps allocation out of the scale loop, and the views of one name keep the
same device address from call to call (what TensorRT tensor addresses and CUDA graphs want).
"""
from __future__ import annotations

import math
import re
from typing import Sequence

import torch

TORCH_DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "int64": torch.int64,
    "int32": torch.int32, "int8": torch.int8, "uint8": torch.uint8, "bool": torch.bool,
}
DTYPE_NAMES: dict[torch.dtype, str] = {v: k for k, v in TORCH_DTYPES.items()}
# onnx.TensorProto element types (what ONNX Runtime's IO binding takes for bfloat16 and friends)
ONNX_ELEMENT_TYPES: dict[torch.dtype, int] = {
    torch.float32: 1, torch.uint8: 2, torch.int8: 3, torch.int32: 6, torch.int64: 7, torch.bool: 9,
    torch.float16: 10, torch.bfloat16: 16,
}


class Workspace:
    """Named, grow-only device buffers; ``view(name, shape, dtype)`` is a contiguous view of the exact shape.

    Views of one name share storage: a new view invalidates the previous one of that name (callers use one
    name per role). Growing reallocates (never in the scale loop once ``reserve`` has sized the buffer).
    """

    def __init__(self, device: torch.device | str):
        self.device = torch.device(device)
        self._bufs: dict[tuple[str, torch.dtype], torch.Tensor] = {}
        self.grows = 0  # number of (re)allocations, for tests

    def reserve(self, name: str, numel: int, dtype: torch.dtype) -> torch.Tensor:
        """Make sure ``name`` holds at least ``numel`` elements of ``dtype``; returns the flat buffer."""
        key = (name, dtype)
        buf = self._bufs.get(key)
        if buf is None or buf.numel() < numel:
            self._bufs.pop(key, None)
            del buf
            buf = torch.empty(max(int(numel), 1), dtype=dtype, device=self.device)
            self._bufs[key] = buf
            self.grows += 1
        return buf

    def view(self, name: str, shape: Sequence[int], dtype: torch.dtype) -> torch.Tensor:
        shape = tuple(int(s) for s in shape)
        numel = math.prod(shape)
        return self.reserve(name, numel, dtype)[:numel].view(shape)

    def stage(self, name: str, t: torch.Tensor, alignment: int = 1) -> torch.Tensor:
        """``t`` itself when contiguous (and its address a multiple of ``alignment`` bytes), else a copy in
        the buffer ``name`` (contiguous, at the buffer's start; no allocation once reserved)."""
        if t.is_contiguous() and (alignment <= 1 or t.data_ptr() % alignment == 0):
            return t
        out = self.view(name, t.shape, t.dtype)
        out.copy_(t)
        return out

    def addresses(self) -> tuple:
        """(name, dtype, device address, numel) of every buffer: what captured CUDA graphs are bound to."""
        return tuple(sorted((n, str(d), b.data_ptr(), b.numel()) for (n, d), b in self._bufs.items()))

    def nbytes(self) -> int:
        return sum(b.numel() * b.element_size() for b in self._bufs.values())

    def clear(self) -> None:
        self._bufs.clear()


# ------------------------------------------------------------------------------------------------ out of memory
class OutOfMemoryAtScale(RuntimeError):
    """Generation ran out of device memory; the message names where and how many bytes were asked."""

    def __init__(self, message: str, where: str, nbytes: int | None):
        super().__init__(message)
        self.where, self.nbytes = where, nbytes


_OOM_PATTERNS = ("out of memory", "can't allocate memory", "failed to allocate memory", "cudaerrormemoryallocation",
                 "not enough memory", "bad_alloc")
_UNITS = {"b": 1, "bytes": 1, "kib": 2 ** 10, "mib": 2 ** 20, "gib": 2 ** 30, "tib": 2 ** 40,
          "kb": 10 ** 3, "mb": 10 ** 6, "gb": 10 ** 9}


def is_oom(exc: BaseException) -> bool:
    """Whether ``exc`` is an allocation failure (torch CUDA/CPU, ONNX Runtime, TensorRT, Python)."""
    if isinstance(exc, (torch.OutOfMemoryError, MemoryError)):
        return True
    text = str(exc).lower()
    return any(p in text for p in _OOM_PATTERNS)


def requested_bytes(exc: BaseException) -> int | None:
    """The allocation size an out-of-memory message mentions (torch CUDA/CPU, ONNX Runtime), if any."""
    text = str(exc)
    m = re.search(r"[Tt]ried to allocate ([\d.]+) ?([KMGT]i?B|bytes|B)\b", text)
    if m:
        return int(float(m.group(1)) * _UNITS[m.group(2).lower()])
    m = re.search(r"(?:buffer of size|allocate) (\d+)(?: bytes)?", text)
    if m:
        return int(m.group(1))
    return None


def human_bytes(n: int) -> str:
    for unit, f in (("GiB", 2 ** 30), ("MiB", 2 ** 20), ("KiB", 2 ** 10)):
        if n >= f:
            return f"{n / f:.2f} {unit}"
    return f"{n} B"


def oom_error(where: str, exc: BaseException | None, device: torch.device, nbytes: int | None = None,
              hint: str = "use a smaller --resolution, fewer prompts or --dtype bfloat16") -> OutOfMemoryAtScale:
    """One-line error: out of memory ``where`` (e.g. 'at scale 12 (64x64, 4096 tokens, batch 2)')."""
    asked = nbytes if nbytes is not None else (requested_bytes(exc) if exc is not None else None)
    what = f"{human_bytes(asked)} ({asked} bytes) asked" if asked is not None else "allocation size not reported"
    free = ""
    if device.type == "cuda" and torch.cuda.is_available():
        try:
            f, t = torch.cuda.mem_get_info(device)
            free = f", {human_bytes(f)} free of {human_bytes(t)}"
        except RuntimeError:
            pass
    return OutOfMemoryAtScale(f"out of memory {where}: {what} on {device}{free}; {hint}", where, asked)


def tensor_bytes(shape: Sequence[int], dtype: torch.dtype) -> int:
    return math.prod(int(s) for s in shape) * torch.empty((), dtype=dtype).element_size()
