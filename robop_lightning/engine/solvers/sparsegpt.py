"""SparseGPT (Frantar and Alistarh, 2023): column sweep with lazy batched OBS updates.

Follows the reference algorithm: the damped Gram is inverted through Cholesky, the upper Cholesky
factor ``U`` of ``H^-1`` drives a left-to-right sweep in blocks of ``block_size`` columns, each block's
mask is chosen by ``w^2 / U_ii^2``, and the remaining columns receive the error ``err @ U``.
One difference, for exact budgets: each block prunes an exact count (the layer budget spread over
blocks by cumulative rounding) instead of thresholding at a quantile, which can be off by ties.
Dead inputs (``H_jj = 0``) have their weights zeroed first, as in the reference.
"""

from __future__ import annotations

import math

import torch

from robop_lightning.engine.patterns import Pattern
from robop_lightning.engine.solvers._linalg import cholesky_inverse


def _spread(total: int, n: int, i1: int, i2: int) -> int:
    """Share of ``total`` for columns ``[i1, i2)`` of ``n`` so that the shares sum to ``total``."""
    return round(total * i2 / n) - round(total * i1 / n)


def _upper_inverse_factor(h: torch.Tensor) -> torch.Tensor:
    low = torch.linalg.cholesky(h.double())
    hinv = cholesky_inverse(low)
    return torch.linalg.cholesky(hinv, upper=True)


def sparsegpt(
    w: torch.Tensor,
    h: torch.Tensor,
    pattern: Pattern,
    *,
    h_diag: torch.Tensor | None = None,
    block_size: int = 128,
    prior: torch.Tensor | None = None,
    **_,
) -> tuple[torch.Tensor, torch.Tensor]:
    rows, cols = w.shape
    w = w.float().clone()
    if h_diag is not None:
        w[:, h_diag.to(w.device) == 0] = 0
    u = _upper_inverse_factor(h).to(device=w.device, dtype=torch.float32)
    pruned = torch.zeros(rows, cols, dtype=torch.bool, device=w.device)
    total_prune = rows * cols - pattern.keep_count(rows, cols)
    row_prune = cols - pattern.keep_per_row(cols) if pattern.kind == "row" else 0

    for i1 in range(0, cols, block_size):
        i2 = min(i1 + block_size, cols)
        count = i2 - i1
        w1 = w[:, i1:i2].clone()
        q1 = torch.zeros_like(w1)
        err1 = torch.zeros_like(w1)
        u1 = u[i1:i2, i1:i2]
        d1 = u1.diagonal()
        mask1 = torch.zeros_like(w1, dtype=torch.bool)  # True = pruned
        tmp = w1.pow(2) / d1.pow(2)[None, :]
        if prior is not None:  # weights pruned earlier go first, whatever their score
            tmp = tmp.masked_fill(~prior[:, i1:i2], -math.inf)
        if pattern.kind == "unstructured":
            if prior is None:
                p = _spread(total_prune, cols, i1, i2)
            else:  # spread what is left of the budget, never below what must stay pruned
                forced = int((~prior[:, i1:i2]).sum())
                p = max(forced, round((total_prune - int(pruned.sum())) * count / (cols - i1)))
            if p > 0:
                mask1.view(-1)[torch.topk(tmp.reshape(-1), min(p, tmp.numel()), largest=False).indices] = True
        elif pattern.kind == "row":
            if prior is None:
                p = _spread(row_prune, cols, i1, i2)
                if p > 0:
                    mask1.scatter_(1, torch.topk(tmp, p, dim=1, largest=False).indices, True)
            else:
                forced = (~prior[:, i1:i2]).sum(1)
                left = row_prune - pruned.sum(1)
                per_row = torch.maximum(forced, torch.round(left * count / (cols - i1)).long())
                rank = torch.argsort(torch.argsort(tmp, dim=1, stable=True), dim=1)
                mask1 = rank < per_row[:, None]
        for i in range(count):
            col = w1[:, i]
            d = u1[i, i]
            if pattern.kind == "nm" and i % pattern.m == 0:
                tmp = w1[:, i : i + pattern.m].pow(2) / d1[i : i + pattern.m].pow(2)[None, :]
                if prior is not None:
                    tmp = tmp.masked_fill(~prior[:, i1 + i : i1 + i + pattern.m], -math.inf)
                drop = torch.topk(tmp, pattern.m - pattern.n, dim=1, largest=False).indices
                mask1[:, i : i + pattern.m].scatter_(1, drop, True)
            q = col.clone()
            q[mask1[:, i]] = 0
            q1[:, i] = q
            err = (col - q) / d
            w1[:, i:] -= err[:, None] @ u1[i, i:][None, :]
            err1[:, i] = err
        w[:, i1:i2] = q1
        pruned[:, i1:i2] = mask1
        w[:, i2:] -= err1 @ u[i1:i2, i2:]
    keep = ~pruned
    return w * keep, keep
