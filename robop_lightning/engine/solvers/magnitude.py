"""Magnitude pruning: keep the largest ``|W_ij|``; no weight update, no calibration data."""

from __future__ import annotations

import torch

from robop_lightning.engine.patterns import Pattern


def magnitude(w: torch.Tensor, h: torch.Tensor, pattern: Pattern, *, prior: torch.Tensor | None = None, **_):
    mask = pattern.select(w.abs(), prior=prior)
    return w * mask.to(w.dtype), mask
