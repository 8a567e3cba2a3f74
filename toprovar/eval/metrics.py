"""Full-reference image metrics for (H, W, 3) uint8 RGB images, computed in float64."""
from __future__ import annotations

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

SSIM_WINDOW, SSIM_SIGMA, SSIM_K1, SSIM_K2, SSIM_L = 11, 1.5, 0.01, 0.03, 255.0


def _pair(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    if a.shape != b.shape or a.ndim != 3 or a.shape[2] != 3:
        raise ValueError(f"need two (H, W, 3) images of one shape, got {a.shape} and {b.shape}")
    return a.astype(np.float64), b.astype(np.float64)


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    """10 log10(255^2 / MSE) in dB over all pixels and channels; inf for identical images."""
    a, b = _pair(a, b)
    mse = np.mean((a - b) ** 2)
    return float("inf") if mse == 0 else float(10 * np.log10(255.0 ** 2 / mse))


def _gaussian_filter_valid(x: np.ndarray, g: np.ndarray) -> np.ndarray:
    """(H, W, C) -> (H - n + 1, W - n + 1, C): separable correlation with the 1-D window g (n,), valid region."""
    x = sliding_window_view(x, len(g), axis=0) @ g           # (H - n + 1, W, C)
    return sliding_window_view(x, len(g), axis=1) @ g        # (H - n + 1, W - n + 1, C)


def ssim(a: np.ndarray, b: np.ndarray) -> float:
    """SSIM (Wang et al. 2004): 11x11 Gaussian window (sigma 1.5), K1 0.01, K2 0.03, L 255; the SSIM map over
    the valid region (windows fully inside the image), averaged per channel, then over the channels."""
    a, b = _pair(a, b)
    if min(a.shape[:2]) < SSIM_WINDOW:
        raise ValueError(f"SSIM needs images of at least {SSIM_WINDOW}x{SSIM_WINDOW}, got {a.shape[:2]}")
    g = np.exp(-((np.arange(SSIM_WINDOW) - SSIM_WINDOW // 2) ** 2) / (2 * SSIM_SIGMA ** 2))
    g /= g.sum()
    mu_a, mu_b = _gaussian_filter_valid(a, g), _gaussian_filter_valid(b, g)
    var_a = _gaussian_filter_valid(a * a, g) - mu_a ** 2
    var_b = _gaussian_filter_valid(b * b, g) - mu_b ** 2
    cov = _gaussian_filter_valid(a * b, g) - mu_a * mu_b
    c1, c2 = (SSIM_K1 * SSIM_L) ** 2, (SSIM_K2 * SSIM_L) ** 2
    smap = (2 * mu_a * mu_b + c1) * (2 * cov + c2) / ((mu_a ** 2 + mu_b ** 2 + c1) * (var_a + var_b + c2))
    return float(smap.mean(axis=(0, 1)).mean())
