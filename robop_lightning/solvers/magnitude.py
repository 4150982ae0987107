"""Magnitude pruning: keep the largest ``|W_ij|``; no weight update, no calibration data."""

from __future__ import annotations

import torch

from robop_lightning.patterns import Pattern


def magnitude(w: torch.Tensor, h: torch.Tensor, pattern: Pattern, **_) -> tuple[torch.Tensor, torch.Tensor]:
    mask = pattern.select(w.abs())
    return w * mask, mask
