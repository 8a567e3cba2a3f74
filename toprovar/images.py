"""Generated images: (B, 3, H, W) float in [-1, 1] -> uint8 arrays and PNG files."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """(B, 3, H, W) float in [-1, 1] -> (B, H, W, 3) uint8 RGB."""
    x = ((images.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return x.permute(0, 2, 3, 1).cpu().numpy()


def save_png(image: np.ndarray, path: str | Path, arg: str = "-o") -> Path:
    """Write one (H, W, 3) uint8 image as PNG (atomically; never over a non-regular file)."""
    from PIL import Image
    from .outputs import atomic_write
    return atomic_write(path, lambda tmp: Image.fromarray(image).save(tmp, format="PNG"), arg)


def output_paths(output: str | Path, n: int, arg: str = "-o") -> list[Path]:
    """The PNG paths of ``n`` images at ``output`` (``_i`` appended when n > 1), each checked as an output file
    (``toprovar.outputs.check_output_file``): call before generating."""
    from .outputs import check_output_file
    check_output_file(output, arg)
    out = Path(output)
    paths = [out] if n == 1 else [out.with_name(f"{out.stem}_{i}{out.suffix}") for i in range(n)]
    return [check_output_file(p, arg) for p in paths]


def save_images(images: torch.Tensor, output: str | Path, arg: str = "-o") -> list[Path]:
    """Save (B, 3, H, W) images in [-1, 1] as PNG at ``output`` (``_i`` appended when B > 1); prints paths."""
    paths = []
    for img, out in zip(to_uint8(images), output_paths(output, images.shape[0], arg)):
        paths.append(save_png(img, out, arg))
        print(paths[-1])
    return paths
