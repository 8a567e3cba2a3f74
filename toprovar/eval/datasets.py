"""Which procedural dataset and checker belong to a model: ``scenes`` for the scenes model, ``shapes`` for the
others (the shapes model, and the tiny one in smoke runs)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from . import checker, scene_checker, scenes, shapes


@dataclass(frozen=True)
class Dataset:
    """make(n, seed, workers) -> (images (n, S, S, 3) uint8, prompts, scenes with ``.spec``);
    evaluate(images, specs) and chance(images, specs, seed) -> the checker's result dict."""
    name: str
    categories: tuple[str, ...]
    make: Callable
    evaluate: Callable
    chance: Callable


DATASETS = {
    "shapes": Dataset("shapes", shapes.CATEGORIES, lambda n, seed, workers=1: shapes.make_dataset(n, seed),
                      checker.evaluate, checker.chance_accuracy),
    "scenes": Dataset("scenes", scenes.CATEGORIES, scenes.make_dataset, scene_checker.evaluate,
                      scene_checker.chance_accuracy),
}


def dataset_for(model: str) -> Dataset:
    """The dataset a model is trained and checked on."""
    return DATASETS["scenes" if model == "scenes" else "shapes"]
