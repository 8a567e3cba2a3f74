"""Test-only stand-ins that let the OFFICIAL HART code (mit-han-lab/hart) run on a CPU, and noise injection.

The official ``hart/modules/networks/basic_hart.py`` imports ``hart_backend.fused_kernels`` (its CUDA extension:
RMS norm and fused RoPE) and the model moves tensors with ``.cuda()`` everywhere; ``HARTForT2I.__init__`` loads its
tokenizer with ``from_pretrained``. This module provides, written here (nothing copied from the official code):
a ``hart_backend.fused_kernels`` whose ``rms_norm`` computes the same float32 math into ``out`` (the fused RoPE
entry points are not reached: the official attention uses its naive RoPE path), ``scipy.stats.truncnorm`` where
scipy is not installed (the official module only builds a training-time mask-ratio sampler from it), ``.cuda()`` as
a no-op on the CPU, a ``from_pretrained`` that builds the tokenizer from a given config, and ``injected_noise``: the
official sampler's
random draws (``torch.multinomial``, ``exponential_`` for the Gumbel noise, ``torch.randn``/``randn_like`` in the
diffusion head) replaced by inverse-CDF / transformed values of given uniforms, with exactly the formulas
``toprovar.model.hart.pieces`` uses, so both implementations consume the same randomness.

Nothing here is used by the package; only ``tests/oracle`` and ``bench/hart_gpu.py`` import it.
"""
from __future__ import annotations

import contextlib
import importlib
import importlib.util
import sys
import types
from pathlib import Path

import torch
import torch.nn as nn


def _rms_norm(out: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, eps: float, use_quant: bool) -> None:
    """hart_backend.fused_kernels.rms_norm: out = x * rsqrt(mean(x^2) + eps) * weight (float32 math)."""
    if use_quant:
        raise NotImplementedError("shim: int8 output is not used at inference")
    xf = x.float()
    out.copy_((xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps) * weight.float()).to(out.dtype))


def _unsupported(*_a, **_k):
    raise NotImplementedError("shim: the fused RoPE kernels are not used by the official inference path")


@contextlib.contextmanager
def official_hart(repo: str | Path, cpu: bool = True):
    """Import the official ``hart`` package from ``repo`` with the shims installed; yields the module of
    ``hart_transformer_t2i``. With ``cpu``, ``.cuda()`` is a no-op while inside (on a GPU machine pass False).
    Everything is removed again afterwards."""
    repo = str(Path(repo).resolve())
    fused = types.ModuleType("hart_backend.fused_kernels")
    fused.rms_norm = _rms_norm
    fused.fused_rope_forward_func = fused.fused_rope_backward_func = _unsupported
    fused.fused_rope_with_pos_forward_func = _unsupported
    backend = types.ModuleType("hart_backend")
    backend.fused_kernels = fused
    names = ["hart_backend", "hart_backend.fused_kernels"]
    stand_ins = [backend, fused]
    if importlib.util.find_spec("scipy") is None:  # no scipy (the GPU machine): a stand-in, never sampled
        sp, sps = types.ModuleType("scipy"), types.ModuleType("scipy.stats")
        sps.truncnorm = lambda *a, **k: None
        sp.stats = sps
        names += ["scipy", "scipy.stats"]
        stand_ins += [sp, sps]
    saved_mods = {k: sys.modules.get(k) for k in names}
    sys.modules.update(dict(zip(names, stand_ins)))
    saved_cuda = (torch.Tensor.cuda, nn.Module.cuda)
    if cpu:
        torch.Tensor.cuda = lambda self, *a, **k: self
        nn.Module.cuda = lambda self, *a, **k: self
    sys.path.insert(0, repo)
    try:
        yield importlib.import_module("hart.modules.models.transformer.hart_transformer_t2i")
    finally:
        sys.path.remove(repo)
        torch.Tensor.cuda, nn.Module.cuda = saved_cuda
        for k in [k for k in sys.modules if k == "hart" or k.startswith("hart.")]:
            del sys.modules[k]
        for k, v in saved_mods.items():
            if v is None:
                sys.modules.pop(k, None)
            else:
                sys.modules[k] = v


def build_official(t2i, cfg, vae_kwargs: dict, seed: int = 0):
    """An official ``HARTForT2I`` at toprovar config ``cfg`` (released flags) with its tokenizer built from
    ``vae_kwargs`` (``HARTAutoEncoderConfig`` arguments) instead of ``from_pretrained``; random weights from
    ``seed``, eval mode."""
    from hart.modules.models.autoencoder import HARTAutoEncoder, HARTAutoEncoderConfig
    conf = t2i.HARTForT2IConfig(
        vae_path="unused", context_token=cfg.text_maxlen, context_dim=cfg.text_channels, depth=cfg.depth,
        embed_dim=cfg.width, num_heads=cfg.num_heads, mlp_ratio=4.0, norm_eps=cfg.norm_eps, shared_aln=False,
        attn_l2_norm=False, patch_nums=tuple(cfg.patch_nums), flash_if_available=False, fused_if_available=False,
        mlp_type="llama", attn_type="llama", disable_aln=True, use_timestep_embed=True, sep_aln_pooling_mode="max",
        use_cross_attn=False, diff_width=cfg.diff_width, diff_depth=cfg.diff_depth,
        num_sampling_steps=str(cfg.diff_steps), sampler="iddpm", use_context_norm=True)
    vae_conf = HARTAutoEncoderConfig(**vae_kwargs)

    class _Loaded:
        def __init__(self):
            self.vae = HARTAutoEncoder(vae_conf)

    orig = t2i.HARTAutoEncoderWithDisc.from_pretrained
    t2i.HARTAutoEncoderWithDisc.from_pretrained = classmethod(lambda cls, *a, **k: _Loaded())
    torch.manual_seed(seed)
    try:
        model = t2i.HARTForT2I(conf)
    finally:
        t2i.HARTAutoEncoderWithDisc.from_pretrained = orig
    for p in model.parameters():  # the official init leaves AdaLN/final layers at zero: randomise everything
        p.data.normal_(0, 0.02 if p.dim() >= 2 else 0.05)
    model.head.weight.data.normal_(0, 0.2)
    vae = model.vae_proxy[0]
    for p in vae.parameters():
        p.data.normal_(0, 0.05)
    vae.quantize.embedding.weight.data.normal_(0, 1.0)
    for m in vae.modules():
        if isinstance(m, nn.GroupNorm):
            m.weight.data.fill_(1.0)
    return model.eval()


class NoiseFeed:
    """Hands out given tensors in order: the official code's draws, replaced."""

    def __init__(self, items: list[torch.Tensor]):
        self.items, self.i = list(items), 0

    def next(self) -> torch.Tensor:
        t = self.items[self.i]
        self.i += 1
        return t


@contextlib.contextmanager
def injected_noise(categorical_u: NoiseFeed, gumbel_u: NoiseFeed, normals: NoiseFeed):
    """Replace ``torch.multinomial`` (inverse CDF on the given uniforms, one per row), ``Tensor.exponential_``
    (Exp(1) = -log(1 - u) of the given uniforms, clamped at 1e-20: ``exponential_from_uniform``) and
    ``torch.randn`` / ``torch.randn_like`` (the given normals, shaped as asked) while inside."""
    saved = (torch.multinomial, torch.Tensor.exponential_, torch.randn, torch.randn_like)

    def multinomial(probs, num_samples, replacement=False, generator=None):
        u = categorical_u.next().reshape(-1).to(probs.dtype)
        cdf = probs.cumsum(dim=-1)
        idx = (cdf < (u * cdf[..., -1]).unsqueeze(-1)).sum(dim=-1).clamp_max(probs.shape[-1] - 1)
        return idx.view(-1, 1).expand(-1, num_samples)

    def exponential_(self, lambd=1.0, generator=None):
        u = gumbel_u.next().reshape(self.shape).to(self.dtype)
        return self.copy_((-torch.log(1 - u)).clamp_min(1e-20))

    def randn(*size, **kw):
        shape = size[0] if len(size) == 1 and isinstance(size[0], (tuple, list, torch.Size)) else size
        return normals.next().reshape(shape)

    def randn_like(t, **kw):
        return normals.next().reshape(t.shape).to(t.dtype)

    torch.multinomial, torch.Tensor.exponential_, torch.randn, torch.randn_like = (
        multinomial, exponential_, randn, randn_like)
    try:
        yield
    finally:
        torch.multinomial, torch.Tensor.exponential_, torch.randn, torch.randn_like = saved
