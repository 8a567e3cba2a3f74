"""ONNX export of the pieces (torch.onnx dynamo exporter) and of a whole model + manifest.

Exporter: ``torch.onnx.export(..., dynamo=True)`` (the default of torch >= 2.9; the TorchScript exporter
still exists in 2.13 behind ``dynamo=False`` but is deprecated). Dynamic axes are ``torch.export.Dim``s
(the CFG batch of the head is the derived dim 2*B) and the FAE custom op is mapped to the
``toprovar::FlashAttentionEntropy`` node through ``custom_translation_table``; the node's local function
body is attached afterwards (``fae_onnx``).

Every file is written in a private temporary directory under ``OUT/onnx`` and renamed into place when
complete (external data first, the .onnx last), so an interrupted export never leaves a piece that looks
whole. Pieces whose weights exceed 2 GB keep them in ``<piece>.onnx.data`` (ONNX external data).
"""
from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import logging
import os
import platform
import re
import shutil
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

import torch

from . import fae_onnx
from .manifest import FORMAT, file_entry, sha256_file, write_manifest
from .pieces import PieceSpec

DEFAULT_OPSET = 18
EXTERNAL_DATA_THRESHOLD = 2_000_000_000  # weight bytes above which a piece uses ONNX external data (< 2^31)
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
_ONNX_DTYPES = {1: "float32", 10: "float16", 16: "bfloat16", 7: "int64", 6: "int32", 3: "int8", 2: "uint8",
                9: "bool"}


class ExportError(RuntimeError):
    """An export that cannot proceed or a file that is not a valid piece (message: one line)."""


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    for line in text.splitlines():
        line = line.strip()
        if line:
            return line[:300]
    return type(exc).__name__


# ------------------------------------------------------------------------------------------ one piece
def _tensor_info(value_infos) -> list[dict]:
    out = []
    for vi in value_infos:
        tt = vi.type.tensor_type
        shape = [d.dim_param if d.HasField("dim_param") else int(d.dim_value) for d in tt.shape.dim]
        out.append({"name": vi.name, "shape": shape, "dtype": _ONNX_DTYPES.get(tt.elem_type, str(tt.elem_type))})
    return out


_TOKEN = re.compile(r"[A-Za-z_][A-Za-z_0-9]*")
_FACTOR = re.compile(r"^\s*(\d+)\s*\*\s*([A-Za-z_][A-Za-z_0-9]*)\s*$")


def rename_dims(model, spec: PieceSpec) -> dict[str, str]:
    """Give the exporter's shape symbols (s12, 2*s12, ...) the spec's names (B, n, P, L, Bp, 2*B) in the
    graph's inputs, outputs and value_info. Returns the mapping used."""
    mapping: dict[str, str] = {}
    for vi in model.graph.input:
        dims = vi.type.tensor_type.shape.dim
        for ax, sym in spec.dynamic.get(vi.name, {}).items():
            if ax >= len(dims) or not dims[ax].HasField("dim_param"):
                continue
            param, axis = dims[ax].dim_param, spec.axes[sym]
            m = _FACTOR.match(param)
            if axis.base is not None and axis.factor != 1 and m:
                mapping.setdefault(m.group(2), axis.base)
            elif _TOKEN.fullmatch(param):
                mapping.setdefault(param, axis.base if axis.base is not None and axis.factor == 1 else sym)

    def sub(text: str) -> str:
        return _TOKEN.sub(lambda t: mapping.get(t.group(0), t.group(0)), text)

    for vi in [*model.graph.input, *model.graph.output, *model.graph.value_info]:
        for d in vi.type.tensor_type.shape.dim:
            if d.HasField("dim_param"):
                d.dim_param = sub(d.dim_param)
    return mapping


def _initializer_bytes(prog) -> int:
    """Bytes of the exported graph's weights (what decides ONNX external data; the 2 GB protobuf limit)."""
    try:
        return sum(v.const_value.nbytes for v in prog.model.graph.initializers.values() if v.const_value is not None)
    except AttributeError:  # another exporter version: count the proto's initializers
        return sum(t.ByteSize() for t in prog.model_proto.graph.initializer)


_REGISTRIES: dict[int, object] = {}


def _private_exporter():
    """torch.onnx's internal ``_core.export`` and ``ONNXRegistry`` when their signatures are as expected.

    ``torch.onnx.export(dynamo=True)`` rebuilds the torchlib registry on every call (~2.5 s on a small CPU);
    building it once per opset (with the FAE translation registered) and passing it to the internal
    entry point gives the same graphs faster. Any mismatch falls back to the public API.
    """
    try:
        import inspect
        from torch.onnx._internal.exporter import _core, _registration
        params = inspect.signature(_core.export).parameters
        needed = {"registry", "dynamic_shapes", "input_names", "output_names", "optimize", "opset_version"}
        if not needed <= set(params):
            return None
        if not hasattr(_registration.ONNXRegistry, "from_torchlib"):
            return None
        return _core, _registration
    except Exception:  # pragma: no cover - other torch versions
        return None


def _torch_onnx_export(spec: PieceSpec, opset: int, verbose: bool):
    """torch.onnx.export(dynamo=True) of one piece -> ONNXProgram."""
    private = None if os.environ.get("TOPROVAR_EXPORT_PUBLIC_API") else _private_exporter()
    if private is not None:
        _core, _registration = private
        reg = _REGISTRIES.get(opset)
        if reg is None:
            reg = _registration.ONNXRegistry.from_torchlib(opset_version=opset)
            for op, fn in fae_onnx.translation_table().items():
                reg.register_op(op, fn, is_complex=False)
            _REGISTRIES[opset] = reg
        return _core.export(spec.module.eval(), spec.sample, registry=reg, dynamic_shapes=spec.dynamic_shapes(),
                            input_names=spec.inputs, output_names=spec.outputs, verbose=verbose, optimize=True,
                            opset_version=opset)
    return torch.onnx.export(
        spec.module.eval(), spec.sample, dynamo=True, dynamic_shapes=spec.dynamic_shapes(),
        input_names=spec.inputs, output_names=spec.outputs, opset_version=opset,
        custom_translation_table=fae_onnx.translation_table() if spec.custom_ops else None,
        optimize=True, verbose=verbose)


@contextlib.contextmanager
def _quiet(verbose: bool):
    """Silence the exporter's progress prints and warnings unless verbose."""
    if verbose:
        yield
        return
    buf = io.StringIO()
    loggers = [logging.getLogger(n) for n in ("torch.onnx", "torch.export", "torch._dynamo", "onnxscript",
                                              "torch.fx.experimental.symbolic_shapes", "torch._export")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(buf):
            warnings.simplefilter("ignore")
            yield
    finally:
        for lg, lv in zip(loggers, levels):
            lg.setLevel(lv)


def export_piece(spec: PieceSpec, onnx_dir: str | os.PathLike, root: str | os.PathLike, opset: int = DEFAULT_OPSET,
                 external_data_threshold: int = EXTERNAL_DATA_THRESHOLD, verbose: bool = False) -> dict:
    """Export one piece to ``onnx_dir/<name>.onnx`` (atomically) and return its manifest entry."""
    onnx_dir, root = Path(onnx_dir), Path(root)
    onnx_dir.mkdir(parents=True, exist_ok=True)
    import onnx
    tmpdir = Path(tempfile.mkdtemp(prefix=f".tmp-{spec.name}-", dir=onnx_dir))
    try:
        tmp = tmpdir / f"{spec.name}.onnx"
        with _quiet(verbose), torch.no_grad():
            try:
                prog = _torch_onnx_export(spec, opset, verbose)
            except Exception as exc:
                raise ExportError(f"piece {spec.name}: torch.onnx.export failed ({_first_line(exc)})") from exc
            external = _initializer_bytes(prog) > external_data_threshold
            prog.save(tmp, external_data=external)
            del prog
        model = onnx.load(str(tmp), load_external_data=False)
        rename_dims(model, spec)
        n_fae = fae_onnx.add_local_function(model, opset)
        if spec.custom_ops and not n_fae:
            raise ExportError(f"piece {spec.name}: expected a FlashAttentionEntropy node, the graph has none")
        got = [i.name for i in model.graph.input]
        if got != spec.inputs:
            raise ExportError(f"piece {spec.name}: ONNX inputs {got} differ from the contract {spec.inputs}")
        model.doc_string = f"toprovar piece {spec.name}: {spec.description}"
        del model.metadata_props[:]
        for k, v in {"toprovar.piece": spec.name, "toprovar.module": spec.module_name,
                     "toprovar.format": FORMAT}.items():
            model.metadata_props.add(key=k, value=v)
        onnx.save(model, str(tmp))
        try:
            onnx.checker.check_model(str(tmp))
        except Exception as exc:
            raise ExportError(f"piece {spec.name}: exported ONNX fails onnx.checker ({_first_line(exc)})") from exc
        data_files = sorted({e.value for init in model.graph.initializer for e in init.external_data
                             if e.key == "location"})
        from toprovar.outputs import check_output_file
        for f in [*data_files, tmp.name]:  # never over a link, a directory or a device
            check_output_file(onnx_dir / f, "--out")
        for f in data_files:  # data first, graph last: a complete .onnx implies complete data
            os.replace(tmpdir / f, onnx_dir / f)
        os.replace(tmp, onnx_dir / tmp.name)
    finally:
        shutil.rmtree(tmpdir, ignore_errors=True)
    final = onnx_dir / f"{spec.name}.onnx"
    entry = {**file_entry(final, root), "inputs": _tensor_info(model.graph.input),
             "outputs": _tensor_info(model.graph.output), "opset": written_opset(model),
             "external_data": [file_entry(onnx_dir / f, root) for f in data_files],
             "scale": spec.scale, "layer": spec.layer, "module": spec.module_name, "custom_ops": spec.custom_ops}
    if spec.profiles:
        entry["profiles"] = [{k: {"min": list(a), "opt": list(b), "max": list(c)} for k, (a, b, c) in p.items()}
                             for p in spec.profiles]
    return entry


def max_opset() -> int:
    """The highest default-domain opset both torch.onnx's exporter and the installed onnx support."""
    import onnx
    try:
        from torch.onnx._constants import ONNX_MAX_OPSET
    except ImportError:  # pragma: no cover - other torch versions
        ONNX_MAX_OPSET = DEFAULT_OPSET
    return min(int(ONNX_MAX_OPSET), onnx.defs.onnx_opset_version())


def written_opset(model) -> int:
    """The default-domain opset an ONNX model imports (what was actually written)."""
    return next((int(o.version) for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)


def load_onnx_checked(path: str | os.PathLike, full_check: bool = False):
    """onnx.load + onnx.checker with one ExportError line for a missing, truncated or corrupted file."""
    import onnx
    p = Path(path)
    if not p.is_file():
        raise ExportError(f"{p}: ONNX file not found")
    try:
        model = onnx.load(str(p))
    except Exception as exc:
        raise ExportError(f"{p}: not a readable ONNX model, truncated or corrupted ({_first_line(exc)})") from None
    try:
        onnx.checker.check_model(str(p), full_check=full_check)
    except Exception as exc:
        raise ExportError(f"{p}: invalid ONNX model ({_first_line(exc)})") from None
    return model


# ------------------------------------------------------------------------------------------ whole model
def versions() -> dict:
    out = {"toprovar": None, "torch": torch.__version__, "onnx": None, "onnxruntime": None, "tensorrt": None,
           "tensorrt_rtx": None, "onnxscript": None, "polygraphy": None, "python": platform.python_version()}
    from importlib import metadata
    for key, dist in (("toprovar", "toprovar"), ("onnx", "onnx"), ("onnxruntime", "onnxruntime"),
                      ("onnxscript", "onnxscript"), ("polygraphy", "polygraphy")):
        try:
            out[key] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            pass
    if out["toprovar"] is None:
        out["toprovar"] = "unknown (not installed)"
    try:
        import tensorrt  # noqa: F401
        out["tensorrt"] = tensorrt.__version__
    except Exception:
        pass
    return out


@dataclass
class ExportRequest:
    """Everything ``export_model`` needs (the CLI fills it from its flags)."""
    model: str = "tiny"
    out: str = "export"
    checkpoint: str | None = None
    vae: str | None = None
    t5: str | None = None
    resolution: int | None = None
    h_div_w: float = 1.0
    dtype: str = "float32"
    opset: int = DEFAULT_OPSET
    onnx_dir: str | None = None
    calibration: str | None = None
    weights_seed: int = 0
    weights: str | None = None      # a trained small model's weights directory (default: the packaged one)
    text_weights: str | None = None  # set from the weights directory: the tiny text encoder's trained weights
    keep_fp32_params: bool = False  # see Infinity.to_inference_dtype
    batch_size: int = 1
    max_batch_size: int = 4
    external_data_threshold: int = EXTERNAL_DATA_THRESHOLD
    only: list[str] | None = None   # export only these pieces (names or fnmatch patterns)
    jobs: int = 1                   # worker processes (each builds the model: for small models / many cores)
    verbose: bool = False
    progress: bool = True
    notes: list[str] = field(default_factory=list)


def vae_stride(cfg) -> int:
    """Pixels per transformer token side (VAE stride, x2 with spatial patchify)."""
    if getattr(cfg, "is_hart", False):
        from toprovar.model.families import token_stride
        return token_stride(cfg)
    try:
        from toprovar.model import vae as vae_mod
        stride = vae_mod.VAE_CONFIGS[cfg.vae].stride
    except (ImportError, AttributeError, KeyError):
        stride = {"infinity-2b": 16, "infinity-8b": 8}.get(cfg.vae, 16)
    return stride * (2 if cfg.spatial_patchify else 1)


def resolve_schedule(cfg, resolution: int | None, h_div_w: float) -> tuple[str, list[tuple[int, int]]]:
    from toprovar.schedule import get_schedule, preset_for_resolution
    if getattr(cfg, "is_hart", False):
        from toprovar.model.families import schedule_for
        from toprovar.schedule import ScheduleError
        try:
            return "hart", schedule_for(cfg, resolution, h_div_w)
        except ScheduleError as exc:
            raise ExportError(str(exc)) from None
    preset = cfg.default_preset if resolution is None else preset_for_resolution(resolution, vae_stride(cfg), h_div_w)
    return preset, get_schedule(preset, h_div_w)


def load_model(req: ExportRequest, cfg):
    """The model exactly as ``Pipeline.load`` builds it (weights, inference dtype; HART: with the tokenizer's
    codebook)."""
    if getattr(cfg, "is_hart", False):
        from toprovar.model.loading import load_parts
        parts = load_parts(cfg.name, checkpoint=req.checkpoint, vae=req.vae, seed=req.weights_seed,
                           dtype=DTYPES[req.dtype], text_encoder=False)
        return parts.model.eval().requires_grad_(False)
    from toprovar.model.infinity import build_model
    net = build_model(cfg, seed=req.weights_seed, device="meta" if req.checkpoint else "cpu")
    if req.checkpoint:
        net = net.to_empty(device="cpu")
        net.load_checkpoint(req.checkpoint)
    if DTYPES[req.dtype] != torch.float32:
        net.to_inference_dtype(DTYPES[req.dtype], req.keep_fp32_params)
    return net.eval().requires_grad_(False)


def load_text_encoder(req: ExportRequest, cfg):
    """(encoder module, vocab size, info) or (None, 0, note) when a real model has no --t5 directory."""
    from toprovar.model.text import ByteTokenizer, t5_text_encoder, tiny_text_encoder
    if getattr(cfg, "is_hart", False):  # the Qwen2 text encoder is not exported (runtime: features, or --t5)
        return None, 0, None
    if req.t5:
        dt = torch.float32 if req.dtype == "float32" else torch.bfloat16  # T5 overflows in float16
        te = t5_text_encoder(req.t5, cfg.text_maxlen, dtype=dt)
        return te.encoder.eval(), te.encoder.config.vocab_size, {"kind": "t5", "source": str(req.t5),
                                                                  "max_length": cfg.text_maxlen,
                                                                  "dtype": str(dt).removeprefix("torch.")}
    if cfg.text_encoder == "tiny":
        te = tiny_text_encoder(cfg.text_channels, cfg.text_maxlen, seed=req.weights_seed, weights=req.text_weights)
        source = req.text_weights or f"random (seed {req.weights_seed})"
        return te.encoder.eval(), ByteTokenizer.vocab_size, {"kind": "tiny", "tokenizer": "bytes+3 (0 pad, 1 eos)",
                                                             "max_length": cfg.text_maxlen, "dtype": "float32",
                                                             "source": source}
    return None, 0, None


def load_vae_decoder(req: ExportRequest, cfg):
    """(decoder, info) or (None, None) when ``toprovar.model.vae`` is not available."""
    if getattr(cfg, "is_hart", False):
        from toprovar.model import families
        dec = (families.load_decoder(cfg, req.vae) if req.vae else families.build_decoder(cfg, seed=req.weights_seed))
        return dec.eval().requires_grad_(False), {"name": cfg.vae, "source": req.vae or
                                                  f"random (seed {req.weights_seed})", "stride": vae_stride(cfg)}
    try:
        from toprovar.model import vae as vae_mod
    except ImportError:
        return None, None
    if req.vae:
        dec = vae_mod.load_vae_decoder(req.vae, cfg.vae)
    else:
        dec = vae_mod.build_decoder(cfg.vae, seed=req.weights_seed)
    dec.set_layout(subpixel=True)  # the torch backend's layout (load_parts); float32 here
    return dec.eval().requires_grad_(False), {"name": cfg.vae, "source": req.vae or f"random (seed {req.weights_seed})",
                                              "stride": vae_stride(cfg)}


def load_policy(path: str | None, schedule: list[tuple[int, int]]):
    """The ToProVAR policy whose TokenKeepPiece is exported, its manifest entry and the per-scale minimum
    token counts of the block profiles (1 everywhere without a calibration: any policy may run)."""
    try:
        from toprovar.policy.config import ToProVARConfig
        from toprovar.policy.stats import min_kept
        from toprovar.policy.toprovar import ToProVARPolicy
    except ImportError:
        if path:
            raise ExportError("--calibration: this build has no ToProVAR policy (toprovar.policy.toprovar)") from None
        return None, None, 1
    if path is None:
        pol = ToProVARPolicy(ToProVARConfig())
        info = {"name": pol.name, "params": pol.config.to_dict(), "calibration": None}
        return pol, info, 1
    p = Path(path)
    try:
        pol = ToProVARPolicy.from_calibration(p)
    except (ValueError, FileNotFoundError) as exc:
        raise ExportError(_first_line(exc)) from None
    c = pol.config
    info = {"name": pol.name, "params": c.to_dict(),
            "calibration": {"file": p.name, "sha256": sha256_file(p), "meta": pol.calibration}}
    mins = tuple(min_kept(h * w, c.k_min, c.bucket) for h, w in schedule)
    info["min_tokens"] = list(mins)
    return pol, info, mins


def _select(specs: list[PieceSpec], only: list[str] | None) -> list[PieceSpec]:
    if not only:
        return specs
    import fnmatch
    return [s for s in specs if any(fnmatch.fnmatchcase(s.name, pat) for pat in only)]


def _spec(cfg) -> dict:
    """The manifest's ``spec``: the orchestrator's ``ModelSpec`` fields."""
    from toprovar.runtime.orchestrator import ModelSpec
    return dataclasses.asdict(ModelSpec.from_config(cfg))


def build_specs(req: ExportRequest) -> tuple[dict, list[PieceSpec]]:
    """The manifest header (everything but pieces/engines) and the piece specs to export."""
    from toprovar.config import get_config
    from toprovar.schedule import rope_grid_side
    from . import pieces as P
    if req.dtype not in DTYPES:
        raise ExportError(f"--dtype: {req.dtype!r} is not one of {sorted(DTYPES)}")
    if req.opset < fae_onnx.MIN_OPSET:
        raise ExportError(f"--opset: at least {fae_onnx.MIN_OPSET} is needed (FlashAttentionEntropy body), "
                          f"got {req.opset}")
    if req.max_batch_size < req.batch_size:
        raise ExportError(f"--max-batch-size {req.max_batch_size} is smaller than --batch-size {req.batch_size}")
    cfg = get_config(req.model)
    files = cfg.weight_files(req.weights, req.checkpoint)
    model_from_dir = bool(files) and not req.checkpoint
    if files:  # a trained small model: its directory supplies all three weight files
        req = dataclasses.replace(req, checkpoint=files["model"], vae=req.vae or files["vae"],
                                  text_weights=files["text_encoder"])
    preset, schedule = resolve_schedule(cfg, req.resolution, req.h_div_w)
    pol, policy, min_tokens = load_policy(req.calibration, schedule)
    st = P.ExportSettings(schedule=schedule, dtype=DTYPES[req.dtype], batch_size=req.batch_size,
                          max_batch_size=req.max_batch_size, min_tokens=min_tokens)
    notes = list(req.notes)
    model = load_model(req, cfg)
    if cfg.is_hart:
        from .hart_specs import hart_model_specs as model_specs
    else:
        model_specs = P.model_specs
    specs = model_specs(model, st, pol.piece.eval() if pol is not None else None)
    enc, vocab, te_info = load_text_encoder(req, cfg)
    if enc is not None:
        specs.insert(0, P.text_encoder_spec(enc, cfg, st, vocab))
    else:
        notes.append(f"text_encoder: not exported (model {cfg.name} uses {cfg.text_encoder}"
                     + ("; the Qwen2 text path is not an export piece" if cfg.is_hart else
                        "; pass --t5 DIR with a local T5 directory") + "); the runtime must be given text features")
    dec, vae_info = load_vae_decoder(req, cfg)
    if dec is not None:
        specs.append(P.vae_decoder_spec(dec, cfg, st))
    else:
        notes.append("vae_decoder: not exported (toprovar.model.vae is not available in this build)")
    if pol is None:
        notes.append("policy_sXX: not exported (toprovar.policy.toprovar is not available in this build)")
    random_parts = [name for name, given in (("transformer", req.checkpoint), ("VAE", req.vae),
                                             ("text encoder", enc is None or req.t5 or req.text_weights))
                    if not given]
    gh, gw = rope_grid_side(req.h_div_w)
    header = {
        "format": FORMAT,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "model": json.loads(json.dumps(dataclasses.asdict(cfg))),  # as read back (tuples -> lists)
        "spec": _spec(cfg),
        "random_weights": bool(random_parts),
        "random_parts": random_parts,
        "checkpoint": None if not req.checkpoint else {"file": Path(req.checkpoint).name},
        # a trained small model's weights directory (dir None: the packaged one); model_from_dir: the
        # transformer too (no separate --checkpoint), so `--backend torch` can rebuild it without flags
        "weights": None if not files else {"dir": str(Path(req.weights).resolve()) if req.weights else None,
                                           "model_from_dir": model_from_dir},
        "schedule": [list(s) for s in schedule],
        "preset": preset,
        "h_div_w": float(req.h_div_w),
        "resolution": max(schedule[-1]) * vae_stride(cfg),
        "rope_grid": [gh, gw],
        "latent": list(P.latent_grid(cfg, schedule)),
        "dtype": req.dtype,
        "keep_fp32_params": req.keep_fp32_params,
        "batch": {"opt": req.batch_size, "max": req.max_batch_size},
        "min_tokens": list(min_tokens) if not isinstance(min_tokens, int) else [1] * len(schedule),
        "weights_seed": None if req.checkpoint else req.weights_seed,
        "policy": policy,
        "text_encoder": te_info,
        "vae": vae_info,
        "notes": notes,
        "exporter": {"name": "torch.onnx.export(dynamo=True)", "opset": req.opset,
                     "fae": {"domain": fae_onnx.DOMAIN, "op_type": fae_onnx.OP_TYPE,
                             "plugin_namespace": fae_onnx.PLUGIN_NAMESPACE,
                             "plugin_version": fae_onnx.PLUGIN_VERSION, "local_function": True}},
        "versions": versions(),
        "pieces": {},
        "engines": {},
    }
    return header, _select(specs, req.only)


_WORKER: dict = {}


def die_with_parent(parent_pid: int) -> None:
    """Have the kernel SIGKILL this process when its parent dies (Linux PR_SET_PDEATHSIG), so export workers
    never outlive a killed ``toprovar-export``; exits at once if the parent is already gone."""
    if sys.platform.startswith("linux"):
        import ctypes
        import signal
        PR_SET_PDEATHSIG = 1
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if os.getppid() != parent_pid:  # the parent died before the death signal was armed
        os._exit(1)


def _worker_init(req: ExportRequest, threads: int, parent_pid: int) -> None:
    die_with_parent(parent_pid)
    torch.set_num_threads(threads)
    _, specs = build_specs(req)
    _WORKER["specs"] = {sp.name: sp for sp in specs}
    _WORKER["req"] = req


def _worker_export(name: str, onnx_dir: str, out: str) -> tuple[str, dict]:
    req, spec = _WORKER["req"], _WORKER["specs"][name]
    t0 = time.perf_counter()
    entry = export_piece(spec, onnx_dir, out, req.opset, req.external_data_threshold, req.verbose)
    entry["export_s"] = round(time.perf_counter() - t0, 2)
    return name, entry


def export_model(req: ExportRequest, on_piece: Callable[[str, dict], None] | None = None) -> dict:
    """Export every piece of ``req`` and write OUT/manifest.json; returns the manifest dict."""
    from toprovar.outputs import check_output_dir, make_dir
    out = check_output_dir(req.out, "--out")
    onnx_dir = Path(req.onnx_dir) if req.onnx_dir else out / "onnx"
    try:
        onnx_dir.resolve().relative_to(out.resolve())
    except ValueError:
        raise ExportError(f"--onnx-dir {onnx_dir} must lie inside --out {out} (the manifest uses relative paths)") \
            from None
    header, specs = build_specs(req)
    if not specs:
        raise ExportError(f"--pieces: no piece matches {req.only}")
    make_dir(out, "--out")
    from tqdm.auto import tqdm
    bar = tqdm(total=len(specs), desc="export", unit="piece", disable=not req.progress, file=sys.stderr)
    entries: dict[str, dict] = {}

    def done(name: str, entry: dict) -> None:
        entries[name] = entry
        bar.set_postfix_str(name)
        bar.update(1)
        if on_piece:
            on_piece(name, entry)

    jobs = max(1, min(req.jobs, len(specs)))
    if jobs == 1:
        for spec in specs:
            t0 = time.perf_counter()
            entry = export_piece(spec, onnx_dir, out, req.opset, req.external_data_threshold, req.verbose)
            entry["export_s"] = round(time.perf_counter() - t0, 2)
            done(spec.name, entry)
    else:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor, as_completed
        names = [sp.name for sp in specs]
        del specs
        threads = max(1, (os.cpu_count() or 1) // jobs)
        with ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("spawn"), initializer=_worker_init,
                                 initargs=(dataclasses.replace(req, progress=False), threads, os.getpid())) as pool:
            futs = [pool.submit(_worker_export, n, str(onnx_dir), str(out)) for n in names]
            try:
                for fut in as_completed(futs):
                    done(*fut.result())
            except BaseException:
                for f in futs:
                    f.cancel()
                raise
        specs_order = names
        entries = {n: entries[n] for n in specs_order}
    bar.close()
    for entry in entries.values():
        entry.pop("export_s", None)
    opsets = sorted({e["opset"] for e in entries.values()})
    header["exporter"]["opset"] = opsets[-1] if opsets else req.opset  # what was written
    if opsets != [req.opset]:
        header["notes"].append(f"--opset {req.opset} requested; the exporter wrote opset {', '.join(map(str, opsets))}")
    if req.only:
        header = _merge_existing(header, entries, out)
    else:
        header["pieces"] = entries
    write_manifest(header, out)
    if not req.only:
        remove_stale_pieces(header, out, onnx_dir)
    return header


def remove_stale_pieces(manifest: dict, out: Path, onnx_dir: Path) -> list[Path]:
    """Delete ``*.onnx`` / ``*.onnx.data`` files of ``onnx_dir`` that the manifest does not list (pieces of an
    earlier export with other settings); returns them."""
    listed = {(out / pc["file"]).resolve() for pc in manifest["pieces"].values()}
    listed |= {(out / e["file"]).resolve() for pc in manifest["pieces"].values() for e in pc["external_data"]}
    stale = [f for f in sorted(onnx_dir.iterdir()) if f.is_file() and not f.is_symlink()
             and f.name.endswith((".onnx", ".onnx.data")) and f.resolve() not in listed]
    for f in stale:
        f.unlink()
    return stale


def _merge_existing(header: dict, entries: dict, out: Path) -> dict:
    """With --pieces: keep the other pieces (and engines) of an existing manifest made for the same model,
    schedule, dtype and opset; the re-exported pieces replace theirs."""
    from .manifest import ManifestError, load_manifest
    try:
        old = load_manifest(out)
    except ManifestError:
        old = None
    same = old is not None and all(old.get(k) == header.get(k) for k in ("model", "schedule", "dtype", "h_div_w")) \
        and old.get("exporter", {}).get("opset") == header["exporter"]["opset"]
    if not same:
        header["pieces"] = entries
        return header
    pieces = {k: v for k, v in old["pieces"].items() if (out / v["file"]).is_file()}
    pieces.update(entries)
    header["pieces"] = pieces
    header["engines"] = dict(old.get("engines", {}))
    return header
