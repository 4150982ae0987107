"""SparseGPT (Frantar and Alistarh, 2023): column sweep with lazy batched OBS updates.

Follows the reference algorithm: the damped Gram's inverse is factored as ``H^-1 = U^T U`` (``U``
upper triangular), ``U`` drives a left-to-right sweep in blocks of ``block_size`` columns, each
block's mask is chosen by ``w^2 / U_ii^2``, and the remaining columns receive the error ``err @ U``.
Dead inputs (``H_jj = 0``) have their weights zeroed first, as in the reference.

Three differences from the reference, none changing what is computed beyond float rounding:

* exact budgets: each block prunes an exact count (the layer budget spread over blocks by
  cumulative rounding) instead of thresholding at a quantile, which can be off by ties; the count
  is found by a selection (NumPy's introselect on CPU, a radix select on an accelerator, where
  ``torch.kthvalue`` is slow on one large slice), ties at the threshold going to the lowest indices;
* ``U`` comes from one Cholesky factorisation and one triangular inverse, in float64, instead of
  the reference's three factorisations (``chol``, ``cholesky_inverse``, ``chol``): with ``J`` the
  reversal permutation and ``J H J = L L^T``, ``U = J L^-1 J`` is upper triangular with a positive
  diagonal and ``U^T U = H^-1``, so it is the reference's factor (up to rounding). ``L^-1`` is
  formed by halves (:func:`~robop_lightning.engine.solvers._linalg.triangular_inverse`). As the
  factorisation is in float64, the engine asks only for float64 definiteness, and
  :func:`prepare` (the factorisation itself) is that test;
* within a block, a column's update reaches the next columns of its sub-block of 16 at once and the
  rest of the block as one product per sub-block (the reference's lazy batching one level down:
  the same sums, grouped differently), on the transposed block so that columns are contiguous.
"""

from __future__ import annotations

import math

import torch

from robop_lightning.engine.patterns import Pattern
from robop_lightning.engine.solvers._linalg import triangular_inverse
from robop_lightning.engine.solvers._select import extreme_mask

__all__ = ["sparsegpt", "prepare", "upper_inverse_factor", "smallest"]


def _spread(total: int, n: int, i1: int, i2: int) -> int:
    """Share of ``total`` for columns ``[i1, i2)`` of ``n`` so that the shares sum to ``total``."""
    return round(total * i2 / n) - round(total * i1 / n)


def upper_inverse_factor(h: torch.Tensor) -> torch.Tensor:
    """The upper triangular ``U`` with ``U^T U = H^-1`` (float64), for a positive definite ``H``.

    Example:
        >>> a = torch.randn(8, 5, dtype=torch.float64)
        >>> h = a.T @ a + torch.eye(5, dtype=torch.float64)
        >>> u = upper_inverse_factor(h)
        >>> bool((u.tril(-1) == 0).all()), torch.allclose(u.T @ u, torch.linalg.inv(h))
        (True, True)
        >>> torch.allclose(u, torch.linalg.cholesky(torch.linalg.inv(h), upper=True))
        True
    """
    u = _upper_or_none(h)
    if u is None:
        raise ValueError("the damped Gram is not positive definite: its Cholesky factorisation failed.")
    return u


def _reversed(a: torch.Tensor) -> torch.Tensor:
    """``J A J`` (rows and columns in reverse order): the flat array reversed, 4x faster than
    ``flip(0, 1)`` on a CPU."""
    return a.contiguous().view(-1).flip(0).view(a.shape)


def _upper_or_none(h: torch.Tensor) -> torch.Tensor | None:
    low, info = torch.linalg.cholesky_ex(_reversed(h.double()))
    return None if int(info) != 0 else _reversed(triangular_inverse(low))


def prepare(h: torch.Tensor) -> torch.Tensor | None:
    """``U`` of a damped Gram (float32, on ``h``'s device), or ``None`` when its float64 Cholesky
    factorisation fails: the engine's definiteness test for this solver (no second factorisation).

    Example:
        >>> prepare(torch.tensor([[1.0, 2.0], [2.0, 1.0]], dtype=torch.float64)) is None  # indefinite
        True
    """
    u = _upper_or_none(h)
    return None if u is None else u.float()


def smallest(scores: torch.Tensor, k: int | torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Mask of the ``k`` smallest entries (``dim=None``: of the whole tensor; else ``k`` per slice along
    ``dim``, where ``k`` may be a tensor of counts per slice). Ties at the threshold go to the lowest
    indices, so the count is exact and the result does not depend on a sort's order.

    Example:
        >>> smallest(torch.tensor([3.0, 1.0, 2.0, 1.0]), 2).tolist()
        [False, True, False, True]
        >>> smallest(torch.tensor([[1.0, 1.0, 1.0], [3.0, 2.0, 1.0]]), torch.tensor([2, 1]), dim=1).tolist()
        [[True, True, False], [False, False, True]]
    """
    if dim is None:
        return extreme_mask(scores, min(max(int(k), 0), scores.numel()), largest=False)
    moved = scores.movedim(dim, -1)
    n = moved.shape[-1]
    counts = torch.as_tensor(k, device=scores.device).expand(moved.shape[:-1]).clamp(0, n)
    if bool((counts == 0).all()):
        return torch.zeros_like(scores, dtype=torch.bool)
    thr = _kth(moved, counts)  # the k-th smallest of every slice (-inf where k = 0: nothing below or tied)
    below = moved < thr[..., None]
    ties = moved == thr[..., None]
    need = counts - below.sum(-1)
    if not bool((ties.sum(-1) == need).all()):  # more ties than needed somewhere: the first ones
        ties &= ties.cumsum(-1) <= need[..., None]
    return (below | ties).movedim(-1, dim)


def _kth(moved: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """The ``counts``-th smallest value of every slice along the last dim (``-inf`` where a count is 0)."""
    first = int(counts.reshape(-1)[0])
    if bool((counts == first).all()):  # one count for all slices: one selection
        if first == 0:
            return torch.full(moved.shape[:-1], -math.inf, dtype=moved.dtype, device=moved.device)
        return torch.kthvalue(moved, first, dim=-1).values
    ordered = moved.sort(dim=-1).values
    idx = (counts - 1).clamp_min(0).unsqueeze(-1)
    return ordered.gather(-1, idx)[..., 0].masked_fill(counts == 0, -math.inf)


def _block_mask(tmp: torch.Tensor, pattern: Pattern, pruned: torch.Tensor, prior: torch.Tensor | None,
                i1: int, cols: int, total_prune: int, row_prune: int) -> torch.Tensor:
    """The mask (True = pruned) of the block ``[i1, i1 + tmp.shape[1])`` for unstructured and row budgets."""
    count = tmp.shape[1]
    i2 = i1 + count
    if pattern.kind == "unstructured":
        if prior is None:
            p = _spread(total_prune, cols, i1, i2)
        else:  # spread what is left of the budget, never below what must stay pruned
            forced = int((~prior[:, i1:i2]).sum())
            p = max(forced, round((total_prune - int(pruned.sum())) * count / (cols - i1)))
        return smallest(tmp, min(p, tmp.numel()))
    if prior is None:
        return smallest(tmp, torch.tensor(_spread(row_prune, cols, i1, i2), device=tmp.device), dim=1)
    forced = (~prior[:, i1:i2]).sum(1)
    left = row_prune - pruned.sum(1)
    per_row = torch.maximum(forced, torch.round(left * count / (cols - i1)).long())
    return smallest(tmp, per_row, dim=1)


SUB_BLOCK = 16  # columns whose updates reach the rest of their block at once (one GEMM)


def _sweep(w1: torch.Tensor, u1: torch.Tensor, mask1: torch.Tensor, pattern: Pattern,
           prior1: torch.Tensor | None, sub: int = SUB_BLOCK) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """OBS sweep of one block: returns the pruned block, its mask (True = pruned; filled for N:M
    patterns as it goes) and its scaled errors (what later columns receive), each ``(rows, count)``.

    The lazy batching of the reference, one level down: a column's update reaches the columns of
    its sub-block at once and the rest of the block when the sub-block is done, as one product
    (the same sums, grouped differently: equal up to float32 rounding). The sweep works on the
    transposed block, so that every column it reads and writes is contiguous.
    """
    wt = w1.T.contiguous()  # (count, rows): column i is wt[i]
    mt = mask1.T.contiguous()
    et = torch.empty_like(wt)  # every row is written
    diag = u1.diagonal().tolist()
    count = wt.shape[0]
    zero = torch.zeros((), dtype=wt.dtype, device=wt.device)
    if pattern.kind == "nm":  # a group's columns must all be up to date when its mask is chosen
        sub = -(-sub // pattern.m) * pattern.m
        d2 = u1.diagonal().pow(2)  # the OBS denominators of the block, once
    for j1 in range(0, count, sub):
        j2 = min(j1 + sub, count)
        for i in range(j1, j2):
            if pattern.kind == "nm" and i % pattern.m == 0:
                tmp = wt[i : i + pattern.m].T.pow(2) / d2[i : i + pattern.m][None, :]
                if prior1 is not None:
                    tmp = tmp.masked_fill(~prior1[:, i : i + pattern.m], -math.inf)
                drop = torch.topk(tmp, pattern.m - pattern.n, dim=1, largest=False).indices
                mt[i : i + pattern.m].T.scatter_(1, drop, True)
            col = wt[i]
            pruned = mt[i]
            err = torch.div(torch.where(pruned, col, zero), diag[i], out=et[i])  # (w - q) / d, q: col, pruned zeroed
            col.masked_fill_(pruned, 0)  # the column becomes q
            if i + 1 < j2:
                wt[i + 1 : j2] -= u1[i, i + 1 : j2][:, None] * err[None, :]
        if j2 < count:
            wt[j2:] -= u1[j1:j2, j2:].T @ et[j1:j2]
    return wt.T, mt.T, et.T


def sparsegpt(
    w: torch.Tensor,
    h: torch.Tensor,
    pattern: Pattern,
    *,
    h_diag: torch.Tensor | None = None,
    block_size: int = 128,
    prior: torch.Tensor | None = None,
    factor: torch.Tensor | None = None,
    **_,
) -> tuple[torch.Tensor, torch.Tensor]:
    """SparseGPT on ``w`` ``(m, n)`` with the damped Gram ``h``; returns ``(w_hat, keep)``.

    ``factor``: ``U`` of ``h`` from :func:`prepare` (the engine's, shared by the layers with this ``h``).

    Example:
        >>> from robop_lightning.engine.patterns import parse_pattern
        >>> x = torch.randn(64, 16, dtype=torch.float64)
        >>> h = x.T @ x + 0.1 * torch.eye(16, dtype=torch.float64)
        >>> w_hat, keep = sparsegpt(torch.randn(4, 16), h, parse_pattern("2:4", None), block_size=8)
        >>> int(keep.sum()), bool((w_hat[~keep] == 0).all())
        (32, True)
    """
    rows, cols = w.shape
    if pattern.kind == "nm":  # blocks of whole N:M groups (the pattern divides the layer's width)
        block_size = -(-block_size // pattern.m) * pattern.m
    w = w.float().clone()
    if h_diag is not None:
        w[:, h_diag.to(w.device) == 0] = 0

    if factor is None:
        factor = upper_inverse_factor(h)
    u = factor.to(device=w.device, dtype=torch.float32)
    pruned = torch.zeros(rows, cols, dtype=torch.bool, device=w.device)
    total_prune = rows * cols - pattern.keep_count(rows, cols)
    row_prune = cols - pattern.keep_per_row(cols) if pattern.kind == "row" else 0

    for i1 in range(0, cols, block_size):
        i2 = min(i1 + block_size, cols)
        w1 = w[:, i1:i2]
        u1 = u[i1:i2, i1:i2]
        prior1 = None if prior is None else prior[:, i1:i2]
        if pattern.kind == "nm":
            mask1 = torch.zeros_like(w1, dtype=torch.bool)  # True = pruned, filled by the sweep
        else:
            tmp = w1.pow(2) / u1.diagonal().pow(2)[None, :]
            if prior1 is not None:  # weights pruned earlier go first, whatever their score
                tmp = tmp.masked_fill(~prior1, -math.inf)
            mask1 = _block_mask(tmp, pattern, pruned, prior, i1, cols, total_prune, row_prune)
        w1, mask1, err1 = _sweep(w1, u1, mask1, pattern, prior1)
        w[:, i1:i2] = w1
        pruned[:, i1:i2] = mask1
        w[:, i2:] -= err1 @ u[i1:i2, i2:]
    keep = ~pruned
    return w * keep.to(w.dtype), keep
