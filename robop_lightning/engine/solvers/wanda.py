"""Wanda (Sun et al., 2024): score ``|W_ij| * ||X_j||_2``; no weight update.

``||X_j||_2 = sqrt(H_jj)`` of the *undamped* effective Gram, so under a robust set the diagonal of
the set's effective matrix is used (per-row E, for instance, scales it by ``1 + r``).
"""

from __future__ import annotations

import torch

from robop_lightning.engine.patterns import Pattern


def wanda(w: torch.Tensor, h: torch.Tensor, pattern: Pattern, *, h_diag: torch.Tensor | None = None,
          prior: torch.Tensor | None = None, **_):
    d = h.diagonal() if h_diag is None else h_diag
    scores = w.abs() * d.to(device=w.device, dtype=torch.float32).clamp_min(0).sqrt()[None, :]
    mask = pattern.select(scores, prior=prior)
    return w * mask, mask
