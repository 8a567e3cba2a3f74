"""The shapes text-to-image dataset and its GenEval-style checker, plus image metrics (PSNR, SSIM)."""
from __future__ import annotations

from .checker import Detection, chance_accuracy, detect, evaluate, score, segment
from .metrics import psnr, ssim
from .shapes import (BACKGROUND, CATEGORIES, COLORS, KINDS, PALETTE, RELATIONS, Group, Placed, Scene, Spec,
                     make_dataset, parse_prompt, prompt_of, relation_offsets, render, sample_scene, sample_spec)
