"""The procedural text-to-image datasets (shapes 64 px, scenes 256 px: ``scenes``, ``scene_checker``, ``datasets``)
and the shapes GenEval-style checker, plus image metrics (PSNR, SSIM)."""
from __future__ import annotations

from .checker import Detection, chance_accuracy, detect, evaluate, score, segment
from .metrics import psnr, ssim
from .shapes import (BACKGROUND, CATEGORIES, COLORS, KINDS, PALETTE, RELATIONS, Group, Placed, Scene, Spec,
                     make_dataset, parse_prompt, prompt_of, relation_offsets, render, sample_scene, sample_spec)
