"""The PyTorch text-to-image pipeline: model + VAE decoder + text encoder + the shared orchestrator."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
import torch

from .config import ModelConfig
from .images import to_uint8
from .model import families
from .model.loading import load_parts
from .model.text import TextEncoder
from .policy.base import Policy
from .runtime.orchestrator import GenerationResult, ModelSpec, Orchestrator
from .runtime.torch_backend import TorchBackend
from .sampling import check_sampling


def model_spec(cfg: ModelConfig) -> ModelSpec:
    """The orchestrator's view of a model configuration."""
    return ModelSpec.from_config(cfg)


def resolve_schedule(cfg: ModelConfig, resolution: int | None, h_div_w: float) -> list[tuple[int, int]]:
    """The scale schedule for ``resolution`` pixels (longer side) or the model's default preset."""
    return families.schedule_for(cfg, resolution, h_div_w)


def vae_stride(cfg: ModelConfig) -> int:
    """Pixels per transformer token side (VAE stride, x2 with spatial patchify)."""
    return families.token_stride(cfg)


@dataclass
class Pipeline:
    """Everything generation needs, in PyTorch."""
    cfg: ModelConfig
    model: torch.nn.Module  # a family's transformer (Infinity, HART)
    decoder: torch.nn.Module
    text_encoder: TextEncoder | None
    random_parts: list[str]  # parts with random (seeded) weights (see ``ModelParts``)
    cuda_graphs: bool = True
    compile: bool = False  # torch.compile the blocks and the decoder (see TorchBackend)
    _orchestrators: dict = field(default_factory=dict, repr=False)

    @classmethod
    def load(cls, model: str = "tiny", **kw) -> "Pipeline":
        """A pipeline over ``load_parts(model, **kw)`` (checkpoint, vae, t5, device, dtype, seed, text_encoder,
        weights, keep_fp32_params, vae_dtype; random seeded weights where none are given)."""
        p = load_parts(model, **kw)
        return cls(p.cfg, p.model, p.decoder, p.text_encoder, p.random_parts)

    @property
    def random_weights(self) -> bool:
        return bool(self.random_parts)

    def orchestrator(self, schedule: list[tuple[int, int]]) -> Orchestrator:
        """The orchestrator of a schedule, kept so its buffers (and CUDA graphs) serve later calls."""
        key = tuple(schedule)
        if key not in self._orchestrators:
            ropes = families.ropes_for(self.cfg, schedule)
            backend = TorchBackend(self.model, self.decoder, schedule, cuda_graphs=self.cuda_graphs,
                                   compile=self.compile)
            self._orchestrators[key] = Orchestrator(backend, model_spec(self.cfg), schedule, ropes)
        return self._orchestrators[key]

    def release_graphs(self) -> None:
        """Free every orchestrator's CUDA graphs (scale plans and block graphs); they are captured again."""
        for orch in self._orchestrators.values():
            orch.release_graphs()

    def release(self) -> None:
        """Free every orchestrator's buffers (KV caches, workspace) and CUDA graphs, and the allocator's cached
        blocks; the orchestrators (and compiled pieces) stay, the next generation allocates and captures again."""
        for orch in self._orchestrators.values():
            orch.release()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
            torch.cuda.empty_cache()

    def generate(self, prompts: Sequence[str], seed: int | Sequence[int] = 0, resolution: int | None = None,
                 h_div_w: float = 1.0, cfg: float | Sequence[float] | None = None,
                 tau: float | Sequence[float] | None = None, top_p: float | None = None,
                 policy: Policy | None = None, profile: bool = False, progress: bool = True,
                 row_cfg: Sequence[float] | None = None) -> GenerationResult:
        """Generate one image per prompt; see ``Orchestrator.generate`` for the result."""
        if self.text_encoder is None:
            raise ValueError("--prompt: this pipeline has no text encoder; use generate_from_features")
        text, lengths = self.text_encoder.encode(list(prompts))
        return self.generate_from_features(text, lengths, seed, resolution, h_div_w, cfg, tau, top_p, policy,
                                           profile, progress, row_cfg)

    def generate_from_features(self, text: torch.Tensor, lengths: torch.Tensor, seed: int | Sequence[int] = 0,
                               resolution: int | None = None, h_div_w: float = 1.0,
                               cfg: float | Sequence[float] | None = None,
                               tau: float | Sequence[float] | None = None, top_p: float | None = None,
                               policy: Policy | None = None, profile: bool = False,
                               progress: bool = True, row_cfg: Sequence[float] | None = None) -> GenerationResult:
        """Generate from precomputed text features (B, L, C_text) float32 and lengths (B,) int32."""
        if text.shape[-1] != self.cfg.text_channels:
            raise ValueError(f"text features: expected {self.cfg.text_channels} channels, got {text.shape[-1]}")
        schedule = resolve_schedule(self.cfg, resolution, h_div_w)
        cfg = families.default_cfg_list(self.cfg, self.cfg.default_cfg if cfg is None else cfg, len(schedule))
        tau = self.cfg.default_tau if tau is None else tau
        top_p = self.cfg.top_p if top_p is None else top_p
        check_sampling(cfg, tau, top_p, len(schedule))
        return self.orchestrator(schedule).generate(text, lengths, seed=seed, cfg=cfg, tau=tau, top_p=top_p,
                                                    policy=policy, profile=profile, progress=progress,
                                                    row_cfg=row_cfg)


def generate(prompts: Sequence[str] | str, model: str = "tiny", seed: int = 0, **kw) -> np.ndarray:
    """One-call generation: prompts -> (B, H, W, 3) uint8 images (random weights unless given)."""
    load_kw = {k: kw.pop(k) for k in ("checkpoint", "vae", "t5", "device", "dtype", "vae_dtype") if k in kw}
    pipe = Pipeline.load(model, **load_kw)
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    return to_uint8(pipe.generate(prompts, seed=seed, **kw).images)
