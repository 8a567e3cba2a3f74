"""The PyTorch text-to-image pipeline: model + VAE decoder + text encoder + the shared orchestrator."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from .config import ModelConfig, get_config
from .model import vae as vae_mod
from .model.infinity import Infinity, build_model
from .model.rope import rope_tables
from .model.text import TextEncoder, t5_text_encoder, tiny_text_encoder
from .policy.base import Policy
from .runtime.orchestrator import GenerationResult, ModelSpec, Orchestrator
from .runtime.torch_backend import TorchBackend
from .schedule import get_schedule, preset_for_resolution, rope_grid_side


def model_spec(cfg: ModelConfig) -> ModelSpec:
    """The orchestrator's view of a model configuration."""
    return ModelSpec(cfg.depth, cfg.num_heads, cfg.head_dim, cfg.width, cfg.token_bits, cfg.codebook_dim,
                     cfg.spatial_patchify)


def resolve_schedule(cfg: ModelConfig, resolution: int | None, h_div_w: float) -> list[tuple[int, int]]:
    """The scale schedule for ``resolution`` pixels (longer side) or the model's default preset."""
    preset = cfg.default_preset if resolution is None else preset_for_resolution(resolution, vae_stride(cfg), h_div_w)
    return get_schedule(preset, h_div_w)


def vae_stride(cfg: ModelConfig) -> int:
    """Pixels per transformer token side (VAE stride, x2 with spatial patchify)."""
    return vae_mod.VAE_CONFIGS[cfg.vae].token_stride


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """(B, 3, H, W) float in [-1, 1] -> (B, H, W, 3) uint8 RGB."""
    x = ((images.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return x.permute(0, 2, 3, 1).cpu().numpy()


def save_png(image: np.ndarray, path: str | Path) -> Path:
    """Write one (H, W, 3) uint8 image as PNG (atomically)."""
    from PIL import Image
    from .model.checkpoint import atomic_write
    return atomic_write(path, lambda tmp: Image.fromarray(image).save(tmp, format="PNG"))


def save_images(images: torch.Tensor, output: str | Path) -> list[Path]:
    """Save (B, 3, H, W) images in [-1, 1] as PNG at ``output`` (``_i`` appended when B > 1); prints paths."""
    paths = []
    for i, img in enumerate(to_uint8(images)):
        out = Path(output)
        if images.shape[0] > 1:
            out = out.with_name(f"{out.stem}_{i}{out.suffix}")
        paths.append(save_png(img, out))
        print(paths[-1])
    return paths


@dataclass
class Pipeline:
    """Everything generation needs, in PyTorch."""
    cfg: ModelConfig
    model: Infinity
    decoder: torch.nn.Module
    text_encoder: TextEncoder | None
    random_weights: bool
    cuda_graphs: bool = True
    compile: bool = False  # torch.compile the blocks and the decoder (see TorchBackend)
    _orchestrators: dict = field(default_factory=dict, repr=False)

    @classmethod
    def load(cls, model: str = "tiny", checkpoint: str | None = None, vae: str | None = None,
             t5: str | None = None, device: str = "cpu", dtype: torch.dtype = torch.float32,
             seed: int = 0, text_encoder: bool = True, weights: str | None = None) -> "Pipeline":
        """Build from a config name; real weights from ``checkpoint``/``vae``/``t5``, else random (seeded).

        A config with packaged weights (``shapes``) loads them unless ``checkpoint`` is given; ``weights``
        names another directory of that layout (model / vae / text_encoder ``.safetensors``, as written by
        tools/train_small.py). text_encoder=False builds no text encoder: generate from precomputed features.
        """
        cfg = get_config(model)
        files = cfg.weight_files(weights, checkpoint)
        text_weights = files["text_encoder"] if files else None
        if files:
            checkpoint, vae = files["model"], vae or files["vae"]
        # random weights are drawn on the CPU so a seed gives the same model on every device
        net = build_model(cfg, seed=seed, device="meta" if checkpoint else "cpu")
        if checkpoint:
            net = net.to_empty(device="cpu")
            net.load_checkpoint(checkpoint)
        if dtype != torch.float32:
            net.to_inference_dtype(dtype)
        net = net.to(device)
        dec = vae_mod.load_vae_decoder(vae, cfg.vae) if vae else vae_mod.build_decoder(cfg.vae, seed=seed)
        dec = dec.to(device).eval().requires_grad_(False)
        if not text_encoder:
            te = None
        elif t5:
            te = t5_text_encoder(t5, cfg.text_maxlen, device=device)
        elif cfg.text_encoder == "tiny":
            te = tiny_text_encoder(cfg.text_channels, cfg.text_maxlen, seed=seed, weights=text_weights).to(device)
        else:
            raise ValueError(f"--t5: model {cfg.name} needs a local flan-t5-xl directory (--t5 DIR)")
        return cls(cfg, net, dec, te, random_weights=not checkpoint)

    def orchestrator(self, schedule: list[tuple[int, int]]) -> Orchestrator:
        """The orchestrator of a schedule, kept so its buffers (and CUDA graphs) serve later calls."""
        key = tuple(schedule)
        if key not in self._orchestrators:
            ropes = rope_tables(self.cfg.head_dim, schedule, rope_grid_side(schedule[-1][0] / schedule[-1][1]))
            backend = TorchBackend(self.model, self.decoder, schedule, cuda_graphs=self.cuda_graphs,
                                   compile=self.compile)
            self._orchestrators[key] = Orchestrator(backend, model_spec(self.cfg), schedule, ropes)
        return self._orchestrators[key]

    def release_graphs(self) -> None:
        """Free every orchestrator's CUDA graphs (scale plans and block graphs); they are captured again."""
        for orch in self._orchestrators.values():
            orch.release_graphs()

    def generate(self, prompts: Sequence[str], seed: int = 0, resolution: int | None = None,
                 h_div_w: float = 1.0, cfg: float | Sequence[float] | None = None,
                 tau: float | Sequence[float] | None = None, top_p: float | None = None,
                 policy: Policy | None = None, profile: bool = False, progress: bool = True) -> GenerationResult:
        """Generate one image per prompt; see ``Orchestrator.generate`` for the result."""
        if self.text_encoder is None:
            raise ValueError("--prompt: this pipeline has no text encoder; use generate_from_features")
        text, lengths = self.text_encoder.encode(list(prompts))
        return self.generate_from_features(text, lengths, seed, resolution, h_div_w, cfg, tau, top_p, policy,
                                           profile, progress)

    def generate_from_features(self, text: torch.Tensor, lengths: torch.Tensor, seed: int = 0,
                               resolution: int | None = None, h_div_w: float = 1.0,
                               cfg: float | Sequence[float] | None = None,
                               tau: float | Sequence[float] | None = None, top_p: float | None = None,
                               policy: Policy | None = None, profile: bool = False,
                               progress: bool = True) -> GenerationResult:
        """Generate from precomputed text features (B, L, C_text) float32 and lengths (B,) int32."""
        if text.shape[-1] != self.cfg.text_channels:
            raise ValueError(f"text features: expected {self.cfg.text_channels} channels, got {text.shape[-1]}")
        schedule = resolve_schedule(self.cfg, resolution, h_div_w)
        return self.orchestrator(schedule).generate(
            text, lengths, seed=seed, cfg=self.cfg.default_cfg if cfg is None else cfg,
            tau=self.cfg.default_tau if tau is None else tau, top_p=self.cfg.top_p if top_p is None else top_p,
            policy=policy, profile=profile, progress=progress)


def generate(prompts: Sequence[str] | str, model: str = "tiny", seed: int = 0, **kw) -> np.ndarray:
    """One-call generation: prompts -> (B, H, W, 3) uint8 images (random weights unless given)."""
    load_kw = {k: kw.pop(k) for k in ("checkpoint", "vae", "t5", "device", "dtype") if k in kw}
    pipe = Pipeline.load(model, **load_kw)
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    return to_uint8(pipe.generate(prompts, seed=seed, **kw).images)
