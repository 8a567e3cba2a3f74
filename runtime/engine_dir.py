"""Generation from an export directory (``toprovar-export`` output) on a chosen backend.

    rt = EngineRuntime.open("export/", backend="onnxruntime")     # or "trt", "torch"
    res = rt.generate(["a red fox"], seed=1, policy=make_policy("toprovar"), profile=True)

The manifest (``toprovar.export.manifest``) gives the model configuration, the scale schedule and the
pieces; the orchestration is the shared ``Orchestrator``, so every backend runs the same loop. Backends:

- ``onnxruntime``: the ONNX pieces (CPU, or CUDA with onnxruntime-gpu);
- ``trt``: the TensorRT engines of the manifest (CUDA; stale engines refused, plugin library loaded);
- ``torch``: the PyTorch modules the pieces were exported from, rebuilt from the manifest's model
  configuration and weights (random weights from their seed, or ``checkpoint=``/``vae=``/``t5=``).

Every error is one line: unknown backend, stale or mismatched files, missing plugin, a prompt over the
text encoder's limit, a resolution the export was not made for, out of memory at a scale.
"""
from __future__ import annotations

import contextlib
import dataclasses
import re
from pathlib import Path
from typing import Sequence

import torch

from toprovar.config import ModelConfig, get_config
from toprovar.model.families import default_cfg_list, ropes_for
from toprovar.model.rope import rope_tables
from toprovar.model.text import ByteTokenizer, tokenize_batch
from toprovar.policy.base import Policy
from toprovar.sampling import check_sampling
from toprovar.schedule import ScheduleError, nearest_ratio
from .orchestrator import GenerationResult, ModelSpec, Orchestrator

BACKENDS = ("trt", "onnxruntime", "torch")


class EngineDirError(ValueError):
    """An export directory that cannot be used as asked (message: one line)."""


def check_backend(name: str) -> str:
    if name not in BACKENDS:
        raise EngineDirError(f"--backend: unknown backend {name!r}; choose from {', '.join(BACKENDS)}")
    return name


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def model_config(manifest) -> ModelConfig:
    """The ModelConfig recorded in the manifest (validated)."""
    fields = {f.name for f in dataclasses.fields(ModelConfig)}
    data = {k: (tuple(v) if isinstance(v, list) else v) for k, v in manifest["model"].items() if k in fields}
    try:
        return ModelConfig(**data).validate()
    except TypeError as exc:
        raise EngineDirError(f"{manifest.path}: model configuration is incomplete ({exc})") from None


def weights_seed(manifest) -> int | None:
    """Seed of the random weights the export was made from (None for a checkpoint)."""
    if manifest.get("checkpoint"):
        return None
    for key in ("weights_seed",):
        if isinstance(manifest.get(key), int):
            return manifest[key]
    te = manifest.get("text_encoder") or {}
    if isinstance(te.get("seed"), int):
        return te["seed"]
    m = re.search(r"seed (\d+)", str((manifest.get("vae") or {}).get("source", "")))
    return int(m.group(1)) if m else 0


class PieceTextEncoder:
    """Tokenizer + the exported ``text_encoder`` piece; ``encode`` as ``toprovar.model.text.TextEncoder``."""

    def __init__(self, backend, tokenize, max_length: int, label: str):
        self.backend, self.tokenize, self.max_length, self.label = backend, tokenize, max_length, label

    @torch.no_grad()
    def encode(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        input_ids, mask = tokenize_batch(self.tokenize, prompts, self.max_length, self.label)
        dev = self.backend.device
        hidden = self.backend.encode_text(input_ids.to(dev), mask.to(dev))
        return hidden.float().clone(), mask.sum(1).to(torch.int32).to(dev)


class EngineRuntime:
    """An export directory opened on one backend: text encoding, the orchestrator, decode."""

    def __init__(self, manifest, backend_name: str, backend, cfg: ModelConfig, text_encoder, stream=None):
        self.manifest, self.backend_name, self.backend, self.cfg = manifest, backend_name, backend, cfg
        self.text_encoder = text_encoder
        self.stream = stream
        self.schedule = [tuple(s) for s in manifest["schedule"]]
        grid = tuple(manifest.get("rope_grid") or ())
        if len(grid) != 2:
            from toprovar.schedule import rope_grid_side
            grid = rope_grid_side(self.schedule[-1][0] / self.schedule[-1][1])
        if cfg.is_hart:
            ropes = ropes_for(cfg, self.schedule)
        else:
            ropes = rope_tables(cfg.head_dim, self.schedule, grid)
        self.orchestrator = Orchestrator(backend, ModelSpec.from_config(cfg), self.schedule, ropes)

    # ------------------------------------------------------------------ opening
    @classmethod
    def open(cls, engine_dir: str | Path, backend: str = "onnxruntime", device: str | None = None, *,
             verify: bool = True, plugin: str | None = None, cuda_graph: bool = False,
             checkpoint: str | None = None, vae: str | None = None, t5: str | None = None,
             ort_optimization: str = "all") -> "EngineRuntime":
        """Load the manifest of ``engine_dir`` and build ``backend`` on ``device`` (default: cuda if any)."""
        from toprovar.export.manifest import load_manifest
        check_backend(backend)
        manifest = load_manifest(engine_dir)
        cfg = model_config(manifest)
        device = device or default_device()
        if backend == "torch":
            return cls._open_torch(manifest, cfg, device, checkpoint, vae, t5)
        if backend == "onnxruntime":
            from .onnxruntime_backend import OnnxRuntimeBackend
            be = OnnxRuntimeBackend(manifest, device, verify=verify, optimization=ort_optimization)
            stream = be.stream
        else:
            if torch.device(device).type != "cuda":
                raise EngineDirError(f"--backend trt needs a CUDA device, got --device {device}")
            from .tensorrt_backend import TensorRTBackend
            be = TensorRTBackend(manifest, device, plugin=plugin, verify=verify, cuda_graph=cuda_graph)
            stream = be.stream
        return cls(manifest, backend, be, cfg, cls._piece_text_encoder(manifest, cfg, be, t5, device), stream)

    @staticmethod
    def _piece_text_encoder(manifest, cfg: ModelConfig, be, t5: str | None, device: str):
        info = manifest.get("text_encoder") or {}
        max_length = int(info.get("max_length", cfg.text_maxlen))
        if cfg.is_hart:  # the Qwen2 text path runs in PyTorch (not an export piece)
            from toprovar.model.hart.text import qwen2_text_encoder, tiny_qwen2_encoder
            if t5:
                return qwen2_text_encoder(t5, cfg.text_maxlen, device=device)
            if cfg.text_encoder == "tiny-qwen2":
                return tiny_qwen2_encoder(cfg.text_channels, cfg.text_maxlen, seed=weights_seed(manifest) or 0
                                          ).to(device)
            return None
        if "text_encoder" not in manifest["pieces"]:
            if t5:
                from toprovar.model.text import t5_text_encoder
                return t5_text_encoder(t5, max_length, device=device)
            return None  # generate_from_features only; generate() says what to pass
        kind = info.get("kind", cfg.text_encoder)
        if kind == "tiny" or cfg.text_encoder == "tiny":
            random = str(info.get("source", "random")).startswith("random")
            return PieceTextEncoder(be, ByteTokenizer(), max_length, "tiny (random)" if random else "tiny (trained)")
        src = Path(t5 or info.get("source") or "")
        if not (src / "config.json").is_file() and not any(src.glob("tokenizer*")):
            raise EngineDirError(f"--t5: the tokenizer of this export's text encoder ({src or 'unknown'}) is not "
                                 f"here; pass --t5 DIR (a local flan-t5-xl directory)")
        from toprovar.model.importable import prepare_transformers_import
        prepare_transformers_import()
        from transformers import AutoTokenizer
        tok = AutoTokenizer.from_pretrained(str(src), local_files_only=True)
        return PieceTextEncoder(be, lambda p: tok(p, add_special_tokens=True)["input_ids"], max_length, src.name)

    @classmethod
    def _open_torch(cls, manifest, cfg: ModelConfig, device: str, checkpoint, vae, t5) -> "EngineRuntime":
        from toprovar.model.loading import load_parts
        from .torch_backend import TorchBackend
        ck = manifest.get("checkpoint")
        weights = manifest.get("weights") if isinstance(manifest.get("weights"), dict) else None
        if ck and not checkpoint and not (weights and weights.get("model_from_dir")):
            raise EngineDirError(f"--backend torch: this export was made from checkpoint {ck.get('file')!r}; "
                                 f"pass --checkpoint PATH (and --vae, --t5)")
        try:
            known = get_config(cfg.name)
        except ValueError:
            known = None
        if known != cfg:
            raise EngineDirError(f"--backend torch: the export's model configuration differs from toprovar's "
                                 f"{cfg.name!r}; use --backend onnxruntime or trt")
        te_info = manifest.get("text_encoder") or {}
        # built on the CPU as toprovar-export builds it (random weights drawn on a CUDA device differ from
        # the CPU draw of the same seed), then moved
        parts = load_parts(cfg.name, checkpoint=checkpoint, vae=vae, t5=t5 or None, device="cpu",
                           weights=weights.get("dir") if weights else None,
                           keep_fp32_params=bool(manifest.get("keep_fp32_params")),
                           dtype={"float32": torch.float32, "float16": torch.float16,
                                  "bfloat16": torch.bfloat16}[manifest["dtype"]],
                           seed=weights_seed(manifest) or 0,
                           text_encoder=bool(t5) or cfg.text_encoder in ("tiny", "tiny-qwen2")
                           or bool(te_info.get("kind") == "tiny"))
        for module in (parts.model, parts.decoder, parts.text_encoder):
            if module is not None and torch.device(device).type != "cpu":
                module.to(device)
        schedule = [tuple(s) for s in manifest["schedule"]]
        return cls(manifest, "torch", TorchBackend(parts.model, parts.decoder, schedule, cuda_graphs=True), cfg, parts.text_encoder)

    # ------------------------------------------------------------------ checks
    def check_request(self, resolution: int | None, h_div_w: float | None) -> None:
        """ScheduleError (one line) unless the export was made for this resolution and aspect ratio."""
        m = self.manifest
        res = m.get("resolution")
        hw = float(m.get("h_div_w", 1.0))
        where = (f"exported for {res}px, h/w {hw:g}, {len(self.schedule)} scales up to "
                 f"{self.schedule[-1][0]}x{self.schedule[-1][1]} tokens")
        if resolution is not None and resolution != res:
            raise ScheduleError(f"--resolution: {resolution} is not in this export's schedule ({where}); re-export "
                                f"with toprovar-export --resolution {resolution}")
        if h_div_w is not None and nearest_ratio(h_div_w) != nearest_ratio(hw):
            raise ScheduleError(f"--h-div-w: {h_div_w:g} is not in this export's schedule ({where}); re-export with "
                                f"toprovar-export --h-div-w {h_div_w:g}")

    @property
    def max_batch(self) -> int | None:
        """The largest batch (prompts) the exported pieces accept (the manifest's ``batch.max``; TensorRT
        profiles end there); None for the torch backend (its modules take any batch)."""
        if self.backend_name == "torch":
            return None
        return int((self.manifest.get("batch") or {}).get("max", 1))

    def check_batch(self, batch: int) -> None:
        """EngineDirError (one line) when the export was not made for ``batch`` prompts."""
        if self.max_batch is not None and batch > self.max_batch:
            raise EngineDirError(f"--prompt: a batch of {batch} prompts exceeds this export's largest batch "
                                 f"{self.max_batch} ({self.manifest.root}); re-export with toprovar-export "
                                 f"--max-batch-size {batch}")

    # ------------------------------------------------------------------ generation
    def _stream_ctx(self):
        return torch.cuda.stream(self.stream) if self.stream is not None else contextlib.nullcontext()

    def encode(self, prompts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        if self.text_encoder is None:
            raise EngineDirError(f"--prompt: this export has no text_encoder piece ({self.manifest.root}); pass --t5 "
                                 f"DIR or generate from text features")
        with self._stream_ctx():
            return self.text_encoder.encode(list(prompts))

    def generate(self, prompts: Sequence[str] | str, seed: int | Sequence[int] = 0, resolution: int | None = None,
                 h_div_w: float | None = None, cfg: float | Sequence[float] | None = None,
                 tau: float | Sequence[float] | None = None, top_p: float | None = None,
                 policy: Policy | None = None, profile: bool = False, progress: bool = True,
                 row_cfg: Sequence[float] | None = None) -> GenerationResult:
        """Generate one image per prompt (as ``Pipeline.generate``)."""
        self.check_request(resolution, h_div_w)
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        text, lengths = self.encode(prompts)
        return self.generate_from_features(text, lengths, seed, None, None, cfg, tau, top_p, policy, profile,
                                           progress, row_cfg)

    def generate_from_features(self, text: torch.Tensor, lengths: torch.Tensor, seed: int | Sequence[int] = 0,
                               resolution: int | None = None, h_div_w: float | None = None,
                               cfg: float | Sequence[float] | None = None,
                               tau: float | Sequence[float] | None = None, top_p: float | None = None,
                               policy: Policy | None = None, profile: bool = False,
                               progress: bool = True, row_cfg: Sequence[float] | None = None) -> GenerationResult:
        """Generate from text features (B, L, C_text) float32 and lengths (B,) int32."""
        self.check_request(resolution, h_div_w)
        self.check_batch(text.shape[0])
        if text.shape[-1] != self.cfg.text_channels:
            raise ValueError(f"text features: expected {self.cfg.text_channels} channels, got {text.shape[-1]}")
        c = self.cfg
        cfg = default_cfg_list(c, c.default_cfg if cfg is None else cfg, len(self.schedule))
        tau = c.default_tau if tau is None else tau
        top_p = c.top_p if top_p is None else top_p
        check_sampling(cfg, tau, top_p, len(self.schedule))
        with self._stream_ctx():
            res = self.orchestrator.generate(text, lengths, seed=seed, cfg=cfg, tau=tau, top_p=top_p,
                                             policy=policy, profile=profile, progress=progress, row_cfg=row_cfg)
        if self.stream is not None:
            torch.cuda.current_stream(self.backend.device).wait_stream(self.stream)
        return res


__all__ = ["BACKENDS", "EngineDirError", "EngineRuntime", "PieceTextEncoder", "check_backend", "model_config",
           "weights_seed"]
