"""BSQ VAE decoder and the parameter-free multiscale quantizer pieces, compatible with official Infinity.

Checkpoint format (official ``infinity_vae_*.pth``): the official loader (``vae_model``) reads the full VAE state
dict from the file's ``"vae"`` entry. The official ``AutoEncoder.state_dict()`` holds ``encoder.*`` (unused here),
``decoder.*`` and the quantizer's one persistent buffer, the bit weights 2^(d-1) .. 1, twice: as
``quantizer.lfq.mask`` and ``quantize.lfq.mask`` (the module keeps the quantizer under both names); the quantizer
has no parameters. (No published weights were available to inspect; the layout is read from the official code and
checked against its modules by tests/oracle/test_vae_oracle.py.) Official modules wrap every conv as
``<name>.conv`` and every GroupNorm as ``<name>.norm``, so decoder keys read e.g.
``decoder.mid.block_1.norm1.norm.weight`` and ``decoder.up.1.upsample.conv.conv.weight``. ``BSQDecoder`` has
exactly these ``decoder.*`` keys; the official loader (``load_cnn``) also accepts the flat layout without the
wrappers (``decoder.conv_in.weight``), and so does ``load_vae_decoder``.

Latent layout: (B, d, H, W) float, d = ``codebook_dim``. With ``spatial_patchify`` (Infinity-8B) the transformer
sees 2x2 latent positions per token (4d bits) through pixel (un)shuffle by 2.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass, replace
from typing import Mapping

import torch
import torch.nn as nn
import torch.nn.functional as F

from .checkpoint import CheckpointError, load_into

# ----------------------------------------------------------------------------------------------- config


@dataclass(frozen=True)
class VAEConfig:
    """Architecture of the BSQ VAE decoder (official ``vae_model`` arguments in brackets).

    codebook_dim: bits per latent position, also the decoder's input channels [codebook_dim / vae_type].
    patch_size: spatial down/up-sampling factor [patch_size]; must be 2 ** (len(ch_mult) - 1) here.
    ch, ch_mult, num_res_blocks: [base_ch, decoder_ch_mult, num_res_blocks]; the decoder has
        num_res_blocks + 1 residual blocks per level. Channel counts must be multiples of 32 or 24
        (GroupNorm with 32 or 24 groups, as the official ``Normalize``).
    spatial_patchify: the transformer token covers 2x2 latent positions [apply_spatial_patchify].
    """
    name: str
    codebook_dim: int
    patch_size: int
    ch: int = 128
    ch_mult: tuple[int, ...] = (1, 2, 4, 4, 4)
    num_res_blocks: int = 2
    spatial_patchify: bool = False
    out_ch: int = 3

    @property
    def stride(self) -> int:
        """Pixels per latent position side (the decoder's total upsampling)."""
        return 2 ** min(len(self.ch_mult) - 1, int(math.log2(self.patch_size)))

    @property
    def z_channels(self) -> int:
        return self.codebook_dim

    @property
    def token_bits(self) -> int:
        """Bits per transformer token: d, or 4d with spatial patchify."""
        return self.codebook_dim * (4 if self.spatial_patchify else 1)

    @property
    def token_stride(self) -> int:
        """Pixels per transformer token side."""
        return self.stride * (2 if self.spatial_patchify else 1)

    def validate(self) -> "VAEConfig":
        if self.patch_size < 1 or self.patch_size & (self.patch_size - 1):
            raise ValueError(f"VAE config {self.name}: patch_size {self.patch_size} is not a power of 2")
        if self.stride != self.patch_size:
            raise ValueError(f"VAE config {self.name}: patch_size {self.patch_size} needs "
                             f"{int(math.log2(self.patch_size)) + 1} levels, ch_mult has {len(self.ch_mult)}")
        for m in self.ch_mult:
            _groups(self.ch * m, self.name)
        if self.codebook_dim < 1 or self.num_res_blocks < 0:
            raise ValueError(f"VAE config {self.name}: bad codebook_dim/num_res_blocks")
        return self

    def replace(self, **kw) -> "VAEConfig":
        return replace(self, **kw).validate()

    @classmethod
    def official(cls, vae_type: int, spatial_patchify: bool = False) -> "VAEConfig":
        """The config the official ``load_visual_tokenizer`` builds for ``--vae_type`` / ``--apply_spatial_patchify``."""
        if vae_type not in (14, 16, 18, 20, 24, 32, 64):
            raise ValueError(f"vae_type {vae_type} is not an official Infinity VAE")
        if spatial_patchify:
            return cls(f"d{vae_type}-patchify", vae_type, 8, ch_mult=(1, 2, 4, 4), spatial_patchify=True).validate()
        return cls(f"d{vae_type}", vae_type, 16, ch_mult=(1, 2, 4, 4, 4)).validate()


def _groups(channels: int, name: str = "") -> int:
    """GroupNorm groups as the official ``Normalize``: 32 if it divides ``channels``, else 24."""
    if channels % 32 == 0:
        return 32
    if channels % 24 == 0:
        return 24
    raise ValueError(f"VAE config {name}: {channels} channels are neither a multiple of 32 nor of 24")


VAE_CONFIGS: dict[str, VAEConfig] = {
    "infinity-2b": replace(VAEConfig.official(32), name="infinity-2b"),
    "infinity-8b": replace(VAEConfig.official(14, spatial_patchify=True), name="infinity-8b"),
    # Tests and the CPU demo: 16 bits, stride 4 (a 16x16 latent decodes to 64x64 in a few ms).
    "tiny": VAEConfig("tiny", codebook_dim=16, patch_size=4, ch=32, ch_mult=(1, 2, 2), num_res_blocks=1).validate(),
    # The trained shapes tokenizer (tools/train_small.py): 64x64 images <-> 16x16 x 16-bit latents.
    "shapes": VAEConfig("shapes", codebook_dim=16, patch_size=4, ch=48, ch_mult=(1, 2, 2), num_res_blocks=1).validate(),
    # The scenes tokenizer (tools/train_small.py --model scenes): 256x256 images <-> 32x32 x 16-bit latents.
    "scenes": VAEConfig("scenes", codebook_dim=16, patch_size=8, ch=64, ch_mult=(1, 2, 2, 4), num_res_blocks=1).validate(),
}


def get_vae_config(config: str | VAEConfig) -> VAEConfig:
    """A VAEConfig from a preset name (one clear error for an unknown one) or as given."""
    if isinstance(config, VAEConfig):
        return config.validate()
    try:
        return VAE_CONFIGS[config]
    except KeyError:
        raise ValueError(f"VAE config: unknown {config!r}; choose from {sorted(VAE_CONFIGS)}") from None


# ---------------------------------------------------------------------------------------------- modules


def _swish(x: torch.Tensor) -> torch.Tensor:
    # x * sigmoid(x) written out (not F.silu): bit-identical to the official activation.
    return x * torch.sigmoid(x)


class _Conv(nn.Module):
    """A 2D conv stored as ``<name>.conv`` (the official wrapper layout)."""

    def __init__(self, cin: int, cout: int, k: int):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, k, padding=k // 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class _Norm(nn.Module):
    """GroupNorm (eps 1e-6, affine) stored as ``<name>.norm``."""

    def __init__(self, channels: int):
        super().__init__()
        self.norm = nn.GroupNorm(_groups(channels), channels, eps=1e-6, affine=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(x)


class _ResBlock(nn.Module):
    """x -> shortcut(x) + conv2(swish(norm2(conv1(swish(norm1(x))))))."""

    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.norm1, self.conv1 = _Norm(cin), _Conv(cin, cout, 3)
        self.norm2, self.conv2 = _Norm(cout), _Conv(cout, cout, 3)
        if cin != cout:
            self.nin_shortcut = _Conv(cin, cout, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(_swish(self.norm1(x)))
        h = self.conv2(_swish(self.norm2(h)))
        skip = self.nin_shortcut(x) if hasattr(self, "nin_shortcut") else x
        return skip + h


# Subpixel form of "nearest x2 then 3x3 conv": output row 2i+a reads upsampled rows 2i+a-1 .. 2i+a+1, i.e. input
# rows i-1, i, i (a=0) or i, i, i+1 (a=1). Row r of _PHASE[a] sums the original kernel rows landing on input
# offset r-1, so the phase kernel is _PHASE[a] @ W @ _PHASE[b]^T (a 3x3 kernel at the input resolution).
_PHASE = ((((1, 0, 0), (0, 1, 1), (0, 0, 0))), (((0, 0, 0), (1, 1, 0), (0, 0, 1))))


def subpixel_weight(weight: torch.Tensor, bias: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(C, Cin, 3, 3), (C,) of the conv after a nearest x2 upsample -> (4C, Cin, 3, 3), (4C,) of the equivalent
    conv at the input resolution whose output, through ``pixel_shuffle(., 2)``, is the same image (channel
    4c + 2a + b is pixel (2i+a, 2j+b) of channel c)."""
    ph = torch.tensor(_PHASE, dtype=weight.dtype, device=weight.device)  # (2, 3, 3)
    w = torch.einsum("ark,oikl,bsl->oabirs", ph, weight, ph)  # (C, 2, 2, Cin, 3, 3)
    return w.reshape(-1, *weight.shape[1:]), bias.repeat_interleave(4)


class _Upsample(nn.Module):
    """Nearest x2, then a 3x3 conv (``upsample.conv.conv``, the only parameters).

    ``subpixel``: the same math as one 3x3 conv at the input resolution to 4x channels + pixel shuffle (the
    weights re-arranged by ``subpixel_weight`` on each call to ``set_subpixel``; no x2 tensor is read by a conv).
    """

    def __init__(self, channels: int):
        super().__init__()
        self.conv = _Conv(channels, channels, 3)
        self.subpixel = False
        self.register_buffer("_w4", None, persistent=False)
        self.register_buffer("_b4", None, persistent=False)

    def set_subpixel(self, on: bool) -> None:
        self.subpixel = on
        self._w4, self._b4 = (subpixel_weight(self.conv.conv.weight.detach(), self.conv.conv.bias.detach())
                              if on else (None, None))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.subpixel:
            return F.pixel_shuffle(F.conv2d(x, self._w4, self._b4, padding=1), 2)
        return self.conv(F.interpolate(x, scale_factor=2, mode="nearest"))


class _Level(nn.Module):
    """One resolution level of the decoder: ``block.{j}`` residual blocks, optional ``upsample``."""

    def __init__(self, cin: int, cout: int, n_blocks: int, upsample: bool):
        super().__init__()
        self.block = nn.ModuleList(_ResBlock(cin if j == 0 else cout, cout) for j in range(n_blocks))
        if upsample:
            self.upsample = _Upsample(cout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for blk in self.block:
            x = blk(x)
        return self.upsample(x) if hasattr(self, "upsample") else x


class _Mid(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.block_1, self.block_2 = _ResBlock(channels, channels), _ResBlock(channels, channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block_2(self.block_1(x))


class _DecoderNet(nn.Module):
    """The official ``Decoder`` graph for 2D images without attention; ``up[i]`` is level i (0 = finest)."""

    def __init__(self, cfg: VAEConfig):
        super().__init__()
        n = len(cfg.ch_mult)
        top = cfg.ch * cfg.ch_mult[-1]
        self.conv_in = _Conv(cfg.z_channels, top, 3)
        self.mid = _Mid(top)
        levels = [None] * n
        cin = top
        for i in reversed(range(n)):  # coarse to fine, as they run
            cout = cfg.ch * cfg.ch_mult[i]
            levels[i] = _Level(cin, cout, cfg.num_res_blocks + 1, upsample=1 <= i <= math.log2(cfg.patch_size))
            cin = cout
        self.up = nn.ModuleList(levels)
        self.norm_out = _Norm(cin)
        self.conv_out = _Conv(cin, cfg.out_ch, 3)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.mid(self.conv_in(z))
        for level in reversed(self.up):
            h = level(h)
        return self.conv_out(_swish(self.norm_out(h)))


class BSQDecoder(nn.Module):
    """BSQ VAE decoder: latent (B, d, h, w) float -> image (B, 3, h*stride, w*stride) in [-1, 1], same dtype.

    State-dict keys are the official VAE checkpoint's ``decoder.*`` keys (module ``self.decoder``).
    """

    def __init__(self, cfg: str | VAEConfig):
        super().__init__()
        self.cfg = get_vae_config(cfg)
        self.decoder = _DecoderNet(self.cfg)

    def set_layout(self, subpixel: bool = True, channels_last: bool = False) -> "BSQDecoder":
        """Execution layout (same weights, same state dict): ``subpixel`` upsample convs (see ``_Upsample``;
        call again after changing the weights or dtype) and channels-last memory format. Returns self."""
        for m in self.modules():
            if isinstance(m, _Upsample):
                m.set_subpixel(subpixel)
        return self.to(memory_format=torch.channels_last if channels_last else torch.contiguous_format)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        if z.ndim != 4 or z.shape[1] != self.cfg.codebook_dim:
            raise ValueError(f"VAE decoder: expected latent (B, {self.cfg.codebook_dim}, h, w), got {tuple(z.shape)}")
        return self.decoder(z).clamp(-1, 1)


class _Downsample(nn.Module):
    """A 3x3 conv with stride 2 (``downsample.conv``)."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class _EncoderNet(nn.Module):
    """The project's encoder, the decoder's mirror: conv_in, per level ``block.{j}`` + ``downsample``, mid,
    norm_out, conv_out to d channels. Image (B, 3, H, W) -> latent (B, d, H/stride, W/stride)."""

    def __init__(self, cfg: VAEConfig):
        super().__init__()
        chans = [cfg.ch * m for m in cfg.ch_mult]
        self.conv_in = _Conv(cfg.out_ch, chans[0], 3)
        self.down = nn.ModuleList()
        cin = chans[0]
        for i, cout in enumerate(chans):
            level = nn.Module()
            level.block = nn.ModuleList(_ResBlock(cin if j == 0 else cout, cout) for j in range(cfg.num_res_blocks + 1))
            if i < math.log2(cfg.patch_size):
                level.downsample = _Downsample(cout)
            self.down.append(level)
            cin = cout
        self.mid = _Mid(cin)
        self.norm_out = _Norm(cin)
        self.conv_out = _Conv(cin, cfg.z_channels, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)
        for level in self.down:
            for blk in level.block:
                h = blk(h)
            if hasattr(level, "downsample"):
                h = level.downsample(h)
        return self.conv_out(_swish(self.norm_out(self.mid(h))))


class BSQAutoencoder(nn.Module):
    """Encoder + multiscale BSQ + decoder, for training the project's own tokenizer.

    State dict = ``encoder.*`` + the decoder's ``decoder.*`` keys, so a saved autoencoder loads with
    ``load_vae_decoder`` (which, as for official VAE files, ignores the encoder).
    """

    def __init__(self, cfg: str | VAEConfig):
        super().__init__()
        self.cfg = get_vae_config(cfg)
        if self.cfg.spatial_patchify:
            raise ValueError(f"VAE config {self.cfg.name}: the autoencoder does not support spatial patchify")
        self.encoder = _EncoderNet(self.cfg)
        self.decoder = _DecoderNet(self.cfg)

    def tokenize(self, images: torch.Tensor, schedule: list[tuple[int, int]]
                 ) -> tuple[list[torch.Tensor], torch.Tensor, torch.Tensor]:
        """Images (B, 3, H, W) in [-1, 1] -> (bits per scale (B, h, w, d) uint8, latent f, summed codes f_hat),
        both (B, d, H/stride, W/stride) float32."""
        from .quant import quantize_multiscale
        f = self.encoder(images).float()
        bits, f_hat = quantize_multiscale(f, schedule)
        return bits, f, f_hat

    def forward(self, images: torch.Tensor, schedule: list[tuple[int, int]]):
        """Training pass: (reconstruction (B, 3, H, W), f, f_hat); gradients reach the encoder through a
        straight-through estimator (the decoder sees f + (f_hat - f).detach())."""
        _, f, f_hat = self.tokenize(images, schedule)
        return self.decoder(f + (f_hat - f).detach()), f, f_hat


def build_decoder(config: str | VAEConfig, seed: int | None = 0, device: str | torch.device | None = None) -> BSQDecoder:
    """A randomly initialised decoder (default PyTorch init under ``torch.manual_seed(seed)`` when seed is given,
    without touching the global RNG state)."""
    cfg = get_vae_config(config)
    with torch.random.fork_rng(devices=[], enabled=seed is not None):
        if seed is not None:
            torch.manual_seed(seed)
        dec = BSQDecoder(cfg)
    return dec.to(device) if device is not None else dec


# ------------------------------------------------------------------------------------------ checkpoints

# The official AutoEncoder registers its quantizer twice (``quantizer`` and the alias ``quantize``), so its state
# dict holds the one persistent buffer under both names. Those buffers (the quantizer has no parameters in any
# official config) are the only quantizer keys accepted, and ignored, like the encoder.
VAE_IGNORED_PREFIXES = ("encoder.", "quantizer.", "quantize.")
_QUANTIZER_BUFFERS = ("quantizer.lfq.mask", "quantize.lfq.mask")


def _official_layout(model_keys: set[str], source: str):
    """rename hook: flat conv/norm keys -> the wrapped ``.conv.`` / ``.norm.`` layout, as official ``load_cnn``."""

    def rename(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        extra = sorted(k for k in sd if k.startswith(("quantizer.", "quantize.")) and k not in _QUANTIZER_BUFFERS)
        if extra:
            raise CheckpointError(f"{source}: the VAE quantizer has parameters this decoder cannot use "
                                  f"(e.g. projections): {', '.join(extra[:5])}")
        out = {}
        for k, v in sd.items():
            if k not in model_keys and k.startswith("decoder.") and k.endswith((".weight", ".bias")):
                stem, _, leaf = k.rpartition(".")
                hits = [f"{stem}.{w}.{leaf}" for w in ("conv", "norm") if f"{stem}.{w}.{leaf}" in model_keys]
                if len(hits) == 1 and hits[0] not in sd:
                    k = hits[0]
            out[k] = v
        return out

    return rename


def load_vae_decoder(path: str | os.PathLike | Mapping[str, torch.Tensor], config: str | VAEConfig,
                     device: str | torch.device | None = None) -> BSQDecoder:
    """Load the decoder of an official VAE checkpoint (or a decoder-only file saved by ``save_state_dict``).

    Reads ``.pth`` (the state dict under ``"vae"``) or ``.safetensors`` through ``read_state_dict``; drops
    ``encoder.*`` and the quantizer buffer; every ``decoder.*`` key must match by name and shape, else one
    ``CheckpointError`` names the file and the first offending keys.
    """
    cfg = get_vae_config(config)
    with torch.device("meta"):
        dec = BSQDecoder(cfg)
    dec = dec.to_empty(device="cpu")
    source = "state dict" if isinstance(path, Mapping) else str(path)
    load_into(dec, path, ignore_prefixes=VAE_IGNORED_PREFIXES, rename=_official_layout(set(dec.state_dict()), source))
    dec.eval().requires_grad_(False)
    return dec.to(device) if device is not None else dec


def decoder_param_count(config: str | VAEConfig) -> int:
    """Parameters of the decoder, counted from the architecture formula (no module is built)."""
    cfg = get_vae_config(config)
    conv = lambda i, o, k: i * o * k * k + o  # noqa: E731
    res = lambda i, o: 2 * i + conv(i, o, 3) + 2 * o + conv(o, o, 3) + (conv(i, o, 1) if i != o else 0)  # noqa: E731
    top = cfg.ch * cfg.ch_mult[-1]
    n = conv(cfg.z_channels, top, 3) + 2 * res(top, top)
    cin = top
    for i in reversed(range(len(cfg.ch_mult))):
        cout = cfg.ch * cfg.ch_mult[i]
        n += res(cin, cout) + cfg.num_res_blocks * res(cout, cout)
        n += conv(cout, cout, 3) if 1 <= i <= math.log2(cfg.patch_size) else 0
        cin = cout
    return n + 2 * cin + conv(cin, cfg.out_ch, 3)
