"""Model configurations of every family in one registry: the official Infinity-2B / Infinity-8B, the project's
tiny model and its trained small models (shapes, scenes) (family ``infinity``), the released HART-0.7B 1024px and a
tiny random HART (family ``hart``, ``toprovar/model/hart/``)."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass


@dataclass(frozen=True)
class ModelConfig:
    """Architecture of an Infinity transformer (always shared AdaLN, cosine attention, 2D RoPE).

    codebook_dim: the VAE's bits per latent position; with ``spatial_patchify`` the transformer sees
    2x2 latent positions per token, so ``token_bits`` = 4 * codebook_dim.
    """
    name: str
    depth: int
    width: int
    num_heads: int
    text_channels: int
    codebook_dim: int
    vae: str
    text_encoder: str
    spatial_patchify: bool = False
    text_maxlen: int = 512
    block_chunks: int = 8
    norm_eps: float = 1e-6
    default_preset: str = "1M"
    default_cfg: float = 3.0
    default_tau: float = 0.5
    top_p: float = 0.97
    random_weights_label: str = ""
    weights: str = ""
    # ---- family ``hart`` only (mit-han-lab/hart ``HARTForT2IConfig``; unused by ``infinity``):
    # text_maxlen = context_token (the text is padded to it), text_channels = context_dim, codebook_dim = Cvae,
    # vae = the hybrid tokenizer's name; vocab_size = codebook entries (discrete head outputs)
    family: str = "infinity"
    patch_nums: tuple[int, ...] = ()
    vocab_size: int = 0
    diff_width: int = 0  # residual diffusion MLP width / depth / sampling steps (iDDPM, cosine schedule)
    diff_depth: int = 0
    diff_steps: int = 0
    more_smooth: bool = False  # official sample.py default True: Gumbel-softmax soft codes at every scale

    @property
    def weights_dir(self):
        """Directory of the packaged trained weights (``toprovar/weights/<weights>``), or None."""
        from pathlib import Path
        return Path(__file__).parent / "weights" / self.weights if self.weights else None

    def weight_files(self, weights_dir=None, checkpoint=None) -> dict | None:
        """Files of a trained small model's weights directory (``weights_dir``, else the packaged one):
        {"model", "vae", "text_encoder"} paths, ``model`` replaced by ``checkpoint`` when one is given (the
        VAE and text encoder still come from the directory); None for a model without packaged weights and
        no ``weights_dir``. A missing directory or file is a FileNotFoundError naming it."""
        from pathlib import Path
        d = Path(weights_dir) if weights_dir else self.weights_dir
        if d is None:
            return None
        if not d.is_dir():
            raise FileNotFoundError(f"--weights: {d} is not a directory (train it: python tools/train_small.py "
                                    f"--model {self.name} --out DIR, then pass --weights DIR)")
        files = {k: str(d / f"{k}.safetensors") for k in ("model", "vae", "text_encoder")}
        for k in ("vae", "text_encoder") if checkpoint else ("model", "vae", "text_encoder"):
            if not Path(files[k]).is_file():
                raise FileNotFoundError(f"--weights: {d} has no {k}.safetensors")
        if checkpoint:
            files["model"] = str(checkpoint)
        return files

    def packaged_calibration(self, weights_dir=None):
        """``calibration.json`` of the weights directory (given, else packaged) when it exists: the model's
        default ToProVAR operating point; None otherwise."""
        from pathlib import Path
        d = Path(weights_dir) if weights_dir else self.weights_dir
        return d / "calibration.json" if d is not None and (d / "calibration.json").is_file() else None

    @property
    def is_hart(self) -> bool:
        return self.family == "hart"

    @property
    def head_dim(self) -> int:
        return self.width // self.num_heads

    @property
    def mlp_hidden(self) -> int:
        if self.is_hart:  # llama MLP, ratio 4 -> 8/3, rounded up to 256 (official AdaLNSelfAttn)
            return int((self.width * 4.0 * 2) / 3 + 255) // 256 * 256
        return round(self.width * 4 / 256) * 256

    @property
    def token_bits(self) -> int:
        return self.codebook_dim * (4 if self.spatial_patchify else 1)

    @property
    def pool_heads(self) -> int:
        """Heads of the attentive text pool (official: head dim 64 above width 4096, else 128)."""
        return self.text_channels // (64 if self.width > 4096 else 128)

    def validate(self) -> "ModelConfig":
        for key in ("depth", "width", "num_heads", "text_channels", "codebook_dim", "text_maxlen", "block_chunks"):
            v = getattr(self, key)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"config {self.name}: {key} must be a positive integer, got {v!r}")
        if self.width % self.num_heads:
            raise ValueError(f"config {self.name}: width {self.width} not divisible by num_heads {self.num_heads}")
        if self.family not in ("infinity", "hart"):
            raise ValueError(f"config {self.name}: unknown family {self.family!r}")
        if self.is_hart:
            if self.head_dim % 4 or not self.patch_nums or self.vocab_size < 2 or self.diff_steps < 1:
                raise ValueError(f"config {self.name}: a HART config needs head_dim % 4 == 0, patch_nums, "
                                 f"vocab_size and diff_steps")
            return self
        if self.depth % self.block_chunks:
            raise ValueError(f"config {self.name}: depth {self.depth} not divisible by block_chunks {self.block_chunks}")
        if self.head_dim % 4:
            raise ValueError(f"config {self.name}: head dim {self.head_dim} must be a multiple of 4 for 2D RoPE")
        if self.pool_heads < 1 or self.width % self.pool_heads:
            raise ValueError(f"config {self.name}: text_channels {self.text_channels} gives no valid text pool heads")
        return self

    def replace(self, **kw) -> "ModelConfig":
        return dataclasses.replace(self, **kw).validate()


# Sampling defaults of the real models as the official notebooks have them (tools/interactive_infer.ipynb:
# cfg 3, tau 0.5; tools/interactive_infer_8b.ipynb: cfg 3, tau 1.0; both top_p 0.97, 1M); the oracle checks them.
CONFIGS: dict[str, ModelConfig] = {
    "infinity-2b": ModelConfig("infinity-2b", depth=32, width=2048, num_heads=16, text_channels=2048,
                               codebook_dim=32, vae="infinity-2b", text_encoder="flan-t5-xl",
                               default_cfg=3.0, default_tau=0.5).validate(),
    "infinity-8b": ModelConfig("infinity-8b", depth=40, width=3584, num_heads=28, text_channels=2048,
                               codebook_dim=14, spatial_patchify=True, vae="infinity-8b",
                               text_encoder="flan-t5-xl", default_cfg=3.0, default_tau=1.0).validate(),
    "tiny": ModelConfig("tiny", depth=4, width=128, num_heads=2, text_channels=128, codebook_dim=16,
                        vae="tiny", text_encoder="tiny", text_maxlen=64, block_chunks=2,
                        default_preset="0.06M", default_cfg=3.0, default_tau=1.0).validate(),
    # The project's trained shapes model (tools/train_small.py; weights packaged under toprovar/weights/shapes).
    "shapes": ModelConfig("shapes", depth=8, width=192, num_heads=3, text_channels=128, codebook_dim=16,
                          vae="shapes", text_encoder="tiny", text_maxlen=64, block_chunks=4,
                          default_preset="0.06M", default_cfg=3.0, default_tau=1.0, weights="shapes").validate(),
    # Closer to Infinity's regime: 10 scales up to 32x32 tokens (0.25M preset), 256x256 images, 16 layers of
    # width 512 (70 M parameters), trained on the scenes dataset (tools/train_small.py --model scenes); its
    # weights are not packaged (141 MB in bfloat16): --weights DIR, or toprovar/weights/scenes once trained.
    "scenes": ModelConfig("scenes", depth=16, width=512, num_heads=8, text_channels=256, codebook_dim=16,
                          vae="scenes", text_encoder="tiny", text_maxlen=128, block_chunks=4,
                          default_preset="0.25M", default_cfg=3.0, default_tau=1.0, weights="scenes").validate(),
    # mit-han-lab/hart-0.7b-1024px (HARTForT2IConfig as released: llama blocks without AdaLN, 2D RoPE, 300 Qwen2
    # context tokens of width 1536, 14 scales to 64x64, 37M-parameter residual diffusion MLP, 8 iDDPM steps)
    "hart-0.7b": ModelConfig("hart-0.7b", depth=24, width=1536, num_heads=24, text_channels=1536, codebook_dim=32,
                             vae="hart-1024", text_encoder="qwen2", text_maxlen=300, default_cfg=4.5,
                             default_tau=1.0, top_p=0.0, family="hart",
                             patch_nums=(1, 2, 3, 4, 5, 7, 9, 12, 16, 21, 27, 36, 48, 64), vocab_size=4096,
                             diff_width=1024, diff_depth=6, diff_steps=8, more_smooth=True).validate(),
    # tests and CI: the same architecture at a few layers, random weights, a tiny random Qwen2 text encoder; hard
    # codes (more_smooth off) so that backends agree code for code (Gumbel-softmax codes carry float differences)
    "hart-tiny": ModelConfig("hart-tiny", depth=3, width=64, num_heads=4, text_channels=48, codebook_dim=8,
                             vae="hart-tiny", text_encoder="tiny-qwen2", text_maxlen=24, default_cfg=4.5,
                             default_tau=1.0, top_p=0.0, family="hart", patch_nums=(1, 2, 3, 4, 6, 8),
                             vocab_size=640, diff_width=32, diff_depth=2, diff_steps=8).validate(),
}


def get_config(name: str) -> ModelConfig:
    """Look up a model configuration by name (one clear error for an unknown one)."""
    try:
        return CONFIGS[name]
    except KeyError:
        raise ValueError(f"--model: unknown model {name!r}; choose from {sorted(CONFIGS)}") from None
