"""Generated images: (B, 3, H, W) float in [-1, 1] -> uint8 arrays and PNG files."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch


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
