"""Command-line pieces shared by ``toprovar generate``, ``calibrate``, ``bench``, the engine-directory path and
``toprovar-export``: a parser whose errors are one line, argument types that refuse what no run can use
(NaN, infinities, negative temperatures, aspect ratios outside the schedule, seeds past 64 bits, prompts
that are not UTF-8), the device check, model/weights and generation flags, dtype names, the per-scale report."""
from __future__ import annotations

import argparse
import math
import sys

import torch

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
VAE_DTYPES = ("auto", *sorted(DTYPES))
SEED_MAX = 2**64 - 1  # torch.Generator.manual_seed takes seeds up to 64 bits


class OneLineParser(argparse.ArgumentParser):
    """argparse, but a usage error is the single line ``PROG: error: MESSAGE`` (exit 2)."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message.splitlines()[0] if message else 'bad arguments'}\n")


def _float(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not math.isfinite(v):
        raise argparse.ArgumentTypeError(f"{text!r} is not a finite number")
    return v


def _floats(text: str, ok, want: str) -> float | list[float]:
    vals = [_float(v.strip()) for v in text.split(",")]
    bad = [v for v in vals if not ok(v)]
    if bad:
        raise argparse.ArgumentTypeError(f"{bad[0]:g} is not {want}")
    return vals[0] if len(vals) == 1 else vals


def cfg_values(text: str) -> float | list[float]:
    """CFG scale(s): finite, >= 0; one value or one per scale ("1,1,3,...")."""
    return _floats(text, lambda v: v >= 0, ">= 0")


def tau_values(text: str) -> float | list[float]:
    """Sampling temperature(s): finite, > 0; one value or one per scale."""
    return _floats(text, lambda v: v > 0, "> 0")


def unit_float(text: str) -> float:
    """A number in [0, 1] (top-p; 0 turns it off)."""
    v = _float(text)
    if not 0.0 <= v <= 1.0:
        raise argparse.ArgumentTypeError(f"{v:g} is outside [0, 1]")
    return v


def aspect_ratio(text: str) -> float:
    """h/w within the schedule's aspect-ratio templates (nearest one used)."""
    from .schedule import RATIO_SIDES
    v = _float(text)
    lo, hi = min(RATIO_SIDES), max(RATIO_SIDES)
    if not lo <= v <= hi:
        raise argparse.ArgumentTypeError(f"{v:g} is outside the schedule's aspect ratios {lo:g}..{hi:g} (h/w)")
    return v


def seed_value(text: str) -> int:
    """A seed in [0, 2^64 - 1]."""
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if not 0 <= v <= SEED_MAX:
        raise argparse.ArgumentTypeError(f"{v} is outside [0, 2^64 - 1]")
    return v


def positive_int(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"{v} is not >= 1")
    return v


def prompt_text(text: str) -> str:
    """A prompt that is valid UTF-8 (argv bytes that are not arrive as surrogate escapes)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        try:
            raw = text.encode("utf-8", "surrogateescape")  # the bytes as given on the command line
        except UnicodeEncodeError:
            raw = text.encode("utf-8", "backslashreplace")
        raise argparse.ArgumentTypeError(f"{raw[:40]!r} is not valid UTF-8") from None
    return text


def error_line(exc: BaseException) -> str:
    """The first line of an error's message; for an OSError without one its file and strerror."""
    text = str(exc).strip()
    if isinstance(exc, OSError) and exc.strerror and not isinstance(exc.args[0] if exc.args else None, str):
        text = f"{exc.filename}: {exc.strerror}" if exc.filename else exc.strerror
    return text.splitlines()[0] if text else type(exc).__name__


def end_progress_lines() -> None:
    """Close the open progress bars and start a fresh stderr line (before an interrupt's message).

    A Ctrl-C can land inside a bar's first draw, before tqdm can clear it; that bar is no longer closable, so
    the line is ended here: erased on a terminal, a newline in a log.
    """
    from tqdm import tqdm
    for bar in list(getattr(tqdm, "_instances", ())):
        bar.close()
    sys.stderr.write("\r\x1b[K" if sys.stderr.isatty() else "\n")


def check_device(name: str) -> str:
    """ValueError (one line) unless ``name`` is a torch device that exists on this machine."""
    try:
        dev = torch.device(name)
    except (RuntimeError, ValueError):
        raise ValueError(f"--device: {name!r} is not a device (cpu, cuda, cuda:N)") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"--device {name}: CUDA is not available on this machine (use --device cpu)")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    elif dev.type != "cpu":
        raise ValueError(f"--device: {name!r} is not supported (cpu, cuda, cuda:N)")
    return name


def add_vae_dtype_arg(p: argparse.ArgumentParser) -> None:
    """--vae-dtype (generate, bench, serve): the VAE decoder's compute dtype."""
    p.add_argument("--vae-dtype", choices=VAE_DTYPES, default="auto",
                   help="VAE decoder dtype (auto: the model dtype on CUDA, float32 on the CPU)")


def vae_dtype(name: str) -> torch.dtype | None:
    """A ``--vae-dtype`` value -> the dtype, or None for auto (``load_parts`` decides)."""
    return None if name == "auto" else DTYPES[name]


def add_model_args(p: argparse.ArgumentParser) -> None:
    """Which model and weights to load, and where (shared by ``generate`` and ``calibrate``)."""
    p.add_argument("--model", default="shapes",
                   help="shapes (trained, packaged; default) | scenes (trained: --weights DIR) | tiny (random) | "
                        "infinity-2b | infinity-8b | hart-0.7b | hart-tiny (random)")
    p.add_argument("--weights", default=None, help="weights directory of a trained small model "
                   "(model/vae/text_encoder .safetensors; default: the model's packaged one)")
    p.add_argument("--checkpoint", default=None, help="transformer weights (.pth or .safetensors); with shapes the "
                   "VAE and text encoder still come from its weights directory")
    p.add_argument("--vae", "--tokenizer", dest="vae", default=None,
                   help="VAE weights (official .pth or .safetensors); HART: the tokenizer (file or directory)")
    p.add_argument("--t5", "--text-encoder", dest="t5", default=None,
                   help="local flan-t5-xl directory; HART: the local Qwen2 directory")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    p.add_argument("--keep-fp32-params", action="store_true",
                   help="with --dtype bfloat16/float16: keep the blocks' ada_gss, ca_norm and scale_mul float32 "
                        "(default: cast like the official load_infinity)")
    p.add_argument("--weights-seed", type=seed_value, default=0, help="seed of the random weights (no checkpoint)")
    add_vae_dtype_arg(p)


def add_generation_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--prompt", action="append", required=True, type=prompt_text,
                   help="text prompt (repeat for a batch)")
    p.add_argument("-o", "--output", default="output/toprovar.png",
                   help="PNG path (with several prompts, _i is appended)")
    add_sampling_args(p)
    p.add_argument("--policy", default="none", help="pruning policy (see `toprovar policies`)")
    p.add_argument("--calibration", default=None,
                   help="calibration JSON for the policy (default: the weights directory's calibration.json)")
    p.add_argument("--profile", action="store_true", help="per-scale timing and kept tokens")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the blocks and the VAE decoder (pays off over many images, not one)")


def add_sampling_args(p: argparse.ArgumentParser, tau_help: str = "sampling temperature (> 0), or one per scale"
                      ) -> None:
    """--seed, --cfg, --tau, --top-p, --resolution, --h-div-w (``generate`` and ``calibrate``)."""
    p.add_argument("--seed", type=seed_value, default=0)
    p.add_argument("--cfg", type=cfg_values, default=None, help="CFG scale (>= 0), or one per scale: 1,1,3,...")
    p.add_argument("--tau", type=tau_values, default=None, help=tau_help)
    p.add_argument("--top-p", type=unit_float, default=None, help="top-p in [0, 1] (0: off)")
    p.add_argument("--resolution", type=positive_int, default=None, help="longer image side in pixels")
    p.add_argument("--h-div-w", type=aspect_ratio, default=1.0,
                   help="aspect ratio h/w, 0.333..3 (the nearest template of the schedule is used)")


def print_report(res, profile: bool) -> None:
    """Per-scale kept-token table (and time with --profile) on stderr."""
    if not profile:
        return
    print(f"{'scale':>5} {'tokens':>7} {'kept%':>7} {'cfg':>4} {'ms':>9}", file=sys.stderr)
    for si, n in res.trace.tokens.items():
        kept = res.trace.kept[si]
        frac = sum(kept) / max(1, n * len(kept))
        ms = res.scale_ms[si] if si < len(res.scale_ms) else float("nan")
        print(f"{si:>5} {n:>7} {100 * frac:>6.1f}% {'x2' if res.trace.cfg_batch[si] else 'x1':>4} {ms:>9.2f}",
              file=sys.stderr)
