"""Robustness evaluation: ImageNet-C-style corruptions, PGD / FGSM, and the metrics over both.

Language-model probes (corrupted context, embedding-space PGD) live in :mod:`robop_lightning.robustness.text`.
"""

from robop_lightning.robustness import text
from robop_lightning.robustness.attacks import fgsm, pgd, uniform_noise
from robop_lightning.robustness.corruptions import ALL_CORRUPTIONS, CORRUPTIONS, HELD_OUT_CORRUPTIONS, corrupt
from robop_lightning.robustness.metrics import (
    IMAGENET_EPS,
    SMALL_IMAGE_EPS,
    RobustnessEvaluator,
    corruption_errors,
    evaluate_robustness,
    mce,
    relative_mce,
)

__all__ = [
    "text",
    "CORRUPTIONS",
    "HELD_OUT_CORRUPTIONS",
    "ALL_CORRUPTIONS",
    "corrupt",
    "pgd",
    "fgsm",
    "uniform_noise",
    "RobustnessEvaluator",
    "evaluate_robustness",
    "relative_mce",
    "mce",
    "corruption_errors",
    "SMALL_IMAGE_EPS",
    "IMAGENET_EPS",
]
