"""The export manifest (``OUT/manifest.json``, format ``toprovar-export/1``): schema, write, load, verify.

Shared by ``toprovar-export`` (writes it) and the runtime backends (read it). The layout and the keys are
documented in ``docs/export-format.md``. Every error is one ``ManifestError`` with a single-line message
that names the file and says what to do.

Runtime use::

    from toprovar.export.manifest import load_manifest, verify, check_engine
    m = load_manifest("OUT")                 # or OUT/manifest.json; validated against SCHEMA
    verify(m)                                # sha256 + size of every piece file (and external data)
    path = m.piece_path("block_00")          # absolute path of onnx/block_00.onnx
    eng = check_engine(m, "block_00", trt.__version__, gpu_name())   # refuses stale or foreign engines
    eng = check_engine(m, "block_00", trt.__version__, flavour="rtx", capability=(8, 9))  # TensorRT-RTX
"""
from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path
from typing import Any, Iterable

FORMAT = "toprovar-export/1"
MANIFEST_NAME = "manifest.json"
DTYPES = ["float32", "float16", "bfloat16", "int64", "int32", "int8", "uint8", "bool"]


class ManifestError(ValueError):
    """A manifest or an exported file that cannot be used as it is (message: one line)."""


# ------------------------------------------------------------------------------------------ schema
_DIM = {"oneOf": [{"type": "integer", "minimum": 0}, {"type": "string", "minLength": 1}]}
_TENSOR = {
    "type": "object",
    "required": ["name", "shape", "dtype"],
    "properties": {
        "name": {"type": "string", "minLength": 1},
        "shape": {"type": "array", "items": _DIM},
        "dtype": {"enum": DTYPES},
    },
}
_SHA = {"type": "string", "pattern": "^[0-9a-f]{64}$"}
_FILE = {
    "type": "object",
    "required": ["file", "sha256", "bytes"],
    "properties": {"file": {"type": "string", "minLength": 1}, "sha256": _SHA,
                   "bytes": {"type": "integer", "minimum": 0}},
}
_SHAPE3 = {"type": "array", "items": {"type": "integer", "minimum": 0}}
_PROFILE = {  # one optimization profile: {input name: {min, opt, max}}
    "type": "object",
    "additionalProperties": {
        "type": "object", "required": ["min", "opt", "max"],
        "properties": {"min": _SHAPE3, "opt": _SHAPE3, "max": _SHAPE3},
        "additionalProperties": False,
    },
}
_PIECE = {
    "type": "object",
    "required": ["file", "sha256", "bytes", "inputs", "outputs", "opset", "external_data"],
    "properties": {
        "file": {"type": "string", "minLength": 1},
        "sha256": _SHA,
        "bytes": {"type": "integer", "minimum": 1},
        "inputs": {"type": "array", "items": _TENSOR, "minItems": 1},
        "outputs": {"type": "array", "items": _TENSOR, "minItems": 1},
        "opset": {"type": "integer", "minimum": 7},
        "external_data": {"type": "array", "items": _FILE},
        "profiles": {"type": "array", "items": _PROFILE},
        "scale": {"type": ["integer", "null"]},
        "layer": {"type": ["integer", "null"]},
        "module": {"type": "string"},
        "custom_ops": {"type": "array", "items": {"type": "string"}},
    },
}
_ENGINE = {
    "type": "object",
    "required": ["file", "sha256", "flavour", "tensorrt", "onnx_sha256"],
    "properties": {
        "file": {"type": "string", "minLength": 1},
        "sha256": _SHA,
        "bytes": {"type": "integer", "minimum": 1},
        "flavour": {"enum": ["tensorrt", "rtx"]},
        "tensorrt": {"type": "string", "minLength": 1},  # the builder's version (TensorRT or TensorRT-RTX)
        "gpu": {"type": ["string", "null"]},  # TensorRT: the GPU it was built on (and runs on)
        "targets": {"type": ["array", "null"], "items": {"type": "string", "pattern": "^sm[0-9]+$"}},  # RTX
        "onnx_sha256": _SHA,
        "profiles": {"type": "integer", "minimum": 1},
        "fae": {"enum": ["plugin", "function", None]},
        "plugins": {"type": "array", "items": {"type": "string"}},
        "plugin_layers": {"type": "integer", "minimum": 0},
        "layers": {"type": "integer", "minimum": 1},
        "build_s": {"type": "number", "minimum": 0},
    },
}
SCHEMA: dict[str, Any] = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "$id": "https://toprovar/schemas/export-manifest-1.json",
    "title": "toprovar export manifest",
    "type": "object",
    "required": ["format", "model", "schedule", "preset", "h_div_w", "dtype", "policy", "pieces", "versions",
                 "engines"],
    "properties": {
        "format": {"const": FORMAT},
        "model": {"type": "object", "required": ["name", "depth", "width", "num_heads", "text_channels",
                                                 "codebook_dim", "spatial_patchify"]},
        "schedule": {"type": "array", "minItems": 1,
                     "items": {"type": "array", "items": {"type": "integer", "minimum": 1},
                               "minItems": 2, "maxItems": 2}},
        "preset": {"type": "string"},
        "h_div_w": {"type": "number", "exclusiveMinimum": 0},
        "resolution": {"type": "integer", "minimum": 1},
        "dtype": {"enum": ["float32", "float16", "bfloat16"]},
        "policy": {"type": ["object", "null"]},
        "text_encoder": {"type": ["object", "null"]},
        "vae": {"type": ["object", "null"]},
        "notes": {"type": "array", "items": {"type": "string"}},
        "pieces": {"type": "object", "additionalProperties": _PIECE},
        "versions": {"type": "object", "required": ["toprovar", "torch", "onnx", "onnxruntime", "tensorrt"],
                     "properties": {k: {"type": ["string", "null"]}
                                    for k in ("toprovar", "torch", "onnx", "onnxruntime", "tensorrt",
                                              "tensorrt_rtx", "onnxscript", "polygraphy", "python")}},
        "exporter": {"type": "object"},
        "engines": {"type": "object", "additionalProperties": _ENGINE},
        "created": {"type": "string"},
    },
}


# ------------------------------------------------------------------------------------------ model
class Manifest(dict):
    """The manifest as a plain dict (the JSON), plus ``root`` (the export directory) and path helpers."""

    def __init__(self, data: dict, root: str | os.PathLike):
        super().__init__(data)
        self.root = Path(root)

    @property
    def path(self) -> Path:
        return self.root / MANIFEST_NAME

    def piece(self, name: str) -> dict:
        try:
            return self["pieces"][name]
        except KeyError:
            raise ManifestError(f"{self.path}: no piece {name!r} (has: {_short(sorted(self['pieces']))})") from None

    def piece_path(self, name: str) -> Path:
        return confined(self.root, self.piece(name)["file"], f"piece {name}")

    def engine(self, name: str) -> dict:
        try:
            return self["engines"][name]
        except KeyError:
            raise ManifestError(f"{self.path}: no engine for piece {name!r}; build engines with "
                                f"`toprovar-export --engines`") from None

    def engine_path(self, name: str) -> Path:
        return confined(self.root, self.engine(name)["file"], f"engine {name}")


def confined(root: Path, rel: str, what: str) -> Path:
    """``root / rel`` when ``rel`` is a relative path that stays inside ``root`` (symbolic links resolved);
    else ManifestError: a manifest never makes the runtime open a file outside its export directory."""
    from pathlib import PurePosixPath, PureWindowsPath
    if PurePosixPath(rel).is_absolute() or PureWindowsPath(rel).drive or ".." in PurePosixPath(rel).parts \
            or "\\" in rel or "\0" in rel:
        raise ManifestError(f"{what}: file {rel!r} in {root / MANIFEST_NAME} is not a path inside the export "
                            f"directory; re-run toprovar-export")
    p = root / rel
    try:
        p.resolve().relative_to(root.resolve())
    except ValueError:
        raise ManifestError(f"{what}: {p} leads outside the export directory {root} (a symbolic link?); "
                            f"re-run toprovar-export") from None
    return p


def _file_entries(data: dict):
    """(what, relative path) of every file a manifest names: pieces, their external data, engines."""
    for name, pc in data.get("pieces", {}).items():
        yield f"piece {name}", pc["file"]
        for ext in pc.get("external_data", []):
            yield f"piece {name} (external data)", ext["file"]
    for name, eng in data.get("engines", {}).items():
        yield f"engine {name}", eng["file"]


def _short(items: list[str], n: int = 6) -> str:
    return ", ".join(items[:n]) + (f" (+{len(items) - n} more)" if len(items) > n else "")


# ------------------------------------------------------------------------------------------ hashing
def sha256_file(path: str | os.PathLike, chunk: int = 1 << 22) -> str:
    """Hex sha256 of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def file_entry(path: str | os.PathLike, root: str | os.PathLike) -> dict:
    """{file (relative to root, '/' separated), sha256, bytes} of an existing file."""
    p = Path(path)
    return {"file": p.relative_to(root).as_posix(), "sha256": sha256_file(p), "bytes": p.stat().st_size}


def _check_file(root: Path, what: str, rel: str, sha: str, size: int | None) -> None:
    p = confined(root, rel, what)
    if not p.is_file():
        raise ManifestError(f"{what}: file {p} is missing; re-run toprovar-export")
    actual = p.stat().st_size
    if size is not None and actual != size:
        kind = "truncated" if actual < size else "larger than exported"
        raise ManifestError(f"{what}: {p} is {kind} ({actual} bytes, manifest says {size}); re-run toprovar-export")
    got = sha256_file(p)
    if got != sha:
        raise ManifestError(f"{what}: {p} sha256 mismatch (file {got[:12]}..., manifest {sha[:12]}...): "
                            f"the file is corrupted or was replaced; re-run toprovar-export")


# ------------------------------------------------------------------------------------------ validate / io
def validate(data: dict, source: str = "manifest") -> None:
    """Validate against SCHEMA (jsonschema when installed, else the required top-level keys)."""
    if not isinstance(data, dict):
        raise ManifestError(f"{source}: expected a JSON object, got {type(data).__name__}")
    if data.get("format") != FORMAT:
        raise ManifestError(f"{source}: format {data.get('format')!r} is not {FORMAT!r}; re-export with this "
                            f"toprovar version")
    try:
        import jsonschema
    except ImportError:
        missing = [k for k in SCHEMA["required"] if k not in data]
        if missing:
            raise ManifestError(f"{source}: missing keys {missing}") from None
        return
    err = jsonschema.exceptions.best_match(jsonschema.Draft202012Validator(SCHEMA).iter_errors(data))
    if err is not None:
        where = "/".join(str(p) for p in err.absolute_path) or "(top level)"
        msg = err.message.splitlines()[0]
        if len(msg) > 200:
            msg = msg[:200] + "..."
        raise ManifestError(f"{source}: schema violation at {where}: {msg}")


def dumps(data: dict) -> str:
    """Indented JSON with arrays of scalars (shapes, schedule entries) on one line."""
    text = json.dumps(data, indent=2)
    # JSON strings hold no raw newline, so folding newline+indent inside innermost [...] is always safe
    def fold(m: re.Match) -> str:
        return re.sub(r"\n\s*", "", re.sub(r",\n\s*", ", ", m.group(0)))
    return re.sub(r"\[[^\[\]{}]*\]", fold, text) + "\n"


def write_manifest(data: dict, out_dir: str | os.PathLike) -> Path:
    """Validate and write ``out_dir/manifest.json`` atomically (temp name, then rename)."""
    from toprovar.outputs import atomic_write
    out = Path(out_dir) / MANIFEST_NAME
    validate(data, str(out))
    text = dumps(data)
    return atomic_write(out, lambda tmp: Path(tmp).write_text(text), "--out")


def load_manifest(path: str | os.PathLike, validate_schema: bool = True) -> Manifest:
    """Read ``path`` (an export directory or its manifest.json) -> Manifest (schema-validated)."""
    p = Path(path)
    if not p.exists():
        raise ManifestError(f"{p}: no such export directory (make one with toprovar-export --out DIR)")
    if p.is_dir():
        if not (p / MANIFEST_NAME).is_file():
            raise ManifestError(f"{p}: no {MANIFEST_NAME} in this directory: not a toprovar-export output "
                                f"(make one with toprovar-export --out DIR)")
        p = p / MANIFEST_NAME
    elif not p.is_file():
        raise ManifestError(f"{p}: not an export directory nor a manifest file")
    def no_constant(name: str):
        raise ValueError(f"{name} is not a JSON number")
    try:
        data = json.loads(p.read_text(), parse_constant=no_constant)
    except (ValueError, UnicodeDecodeError) as exc:  # JSONDecodeError, NaN / Infinity
        raise ManifestError(f"{p}: not valid JSON ({str(exc).splitlines()[0]})") from None
    except OSError as exc:
        raise ManifestError(f"{p}: cannot read ({exc.strerror})") from None
    if validate_schema:
        validate(data, str(p))
        for what, rel in _file_entries(data):
            confined(p.parent, rel, what)
    return Manifest(data, p.parent)


def verify(manifest: Manifest, names: Iterable[str] | None = None, engines: bool = False) -> None:
    """Check size and sha256 of the pieces' files (all, or ``names``) and their external data.

    engines=True also checks each listed engine's file hash and that it was built from the current
    ONNX bytes of its piece. Raises ManifestError (one line) on the first problem.
    """
    root = manifest.root
    for name in (manifest["pieces"] if names is None else names):
        pc = manifest.piece(name)
        _check_file(root, f"piece {name}", pc["file"], pc["sha256"], pc.get("bytes"))
        for ext in pc.get("external_data", []):
            _check_file(root, f"piece {name} (external data)", ext["file"], ext["sha256"], ext.get("bytes"))
    if engines:
        for name, eng in manifest["engines"].items():
            if names is not None and name not in names:
                continue
            _check_engine_source(manifest, name, eng)
            _check_file(root, f"engine {name}", eng["file"], eng["sha256"], eng.get("bytes"))


def _check_engine_source(manifest: Manifest, name: str, eng: dict) -> None:
    piece = manifest["pieces"].get(name)
    if piece is None:
        raise ManifestError(f"engine {name}: no ONNX piece {name!r} in {manifest.path}")
    if eng["onnx_sha256"] != piece["sha256"]:
        raise ManifestError(f"engine {name}: stale, built from other ONNX bytes (engine {eng['onnx_sha256'][:12]}..., "
                            f"piece {piece['sha256'][:12]}...); rebuild with toprovar-export --engines")


def engine_flavour(manifest: Manifest) -> str:
    """The flavour (``tensorrt`` or ``rtx``) of the manifest's engines; ManifestError without engines or with
    both flavours."""
    kinds = sorted({e["flavour"] for e in manifest["engines"].values()})
    if not kinds:
        raise ManifestError(f"{manifest.path}: no TensorRT engines in this export; build them with "
                            f"toprovar-export --engines")
    if len(kinds) > 1:
        raise ManifestError(f"{manifest.path}: engines of both flavours ({', '.join(kinds)}); rebuild them with one "
                            f"toprovar-export --engines --trt-flavor")
    return kinds[0]


def check_engine_target(manifest: Manifest, name: str, flavour: str, gpu: str | None = None,
                        capability: tuple[int, int] | None = None) -> dict:
    """The engine entry of ``name`` if its flavour is ``flavour`` and it runs on this GPU (TensorRT: the same GPU
    name; TensorRT-RTX: ``capability`` among its targets), else ManifestError (one line). Needs no TensorRT
    module, so it runs before one is imported and before any deserialisation."""
    from .trt_flavour import LABELS, TargetError, check_capability
    eng = manifest.engine(name)
    if eng["flavour"] != flavour:
        raise ManifestError(f"engine {name}: a {LABELS[eng['flavour']]} engine, not {LABELS[flavour]}; rebuild with "
                            f"toprovar-export --engines --trt-flavor {flavour}")
    if flavour == "tensorrt" and gpu is not None and eng.get("gpu") != gpu:
        raise ManifestError(f"engine {name}: built for GPU {eng.get('gpu')!r}, this is {gpu!r}; "
                            f"rebuild with toprovar-export --engines")
    if flavour == "rtx" and capability is not None:
        try:
            check_capability(eng.get("targets") or [], capability, gpu or "this GPU", f"engine {name}")
        except TargetError as exc:
            raise ManifestError(str(exc)) from None
    return eng


def check_engine(manifest: Manifest, name: str, tensorrt_version: str, gpu: str | None = None,
                 hash_file: bool = True, flavour: str = "tensorrt", capability: tuple[int, int] | None = None) -> Path:
    """The engine file of piece ``name`` if it is usable here, else ManifestError (one line).

    Refuses an engine of another flavour, built by another TensorRT(-RTX) version, for another GPU (TensorRT)
    or other compute capabilities (TensorRT-RTX), or from other ONNX bytes.
    """
    from .trt_flavour import LABELS
    eng = check_engine_target(manifest, name, flavour, gpu, capability)
    if eng["tensorrt"] != str(tensorrt_version):
        raise ManifestError(f"engine {name}: built with {LABELS[flavour]} {eng['tensorrt']}, this is "
                            f"{tensorrt_version}; rebuild with toprovar-export --engines")
    _check_engine_source(manifest, name, eng)
    if hash_file:
        _check_file(manifest.root, f"engine {name}", eng["file"], eng["sha256"], eng.get("bytes"))
    return confined(manifest.root, eng["file"], f"engine {name}")


__all__ = ["FORMAT", "MANIFEST_NAME", "SCHEMA", "Manifest", "ManifestError", "check_engine", "check_engine_target",
           "confined", "engine_flavour", "file_entry",
           "load_manifest", "sha256_file", "validate", "verify", "write_manifest"]
