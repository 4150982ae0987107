"""ALPS (Meng et al., NeurIPS 2024): ADMM with a support-driven rho schedule, then PCG.

In Jacobi-normalised coordinates (``S = diag(H)^1/2``, ``H~ = S^-1 H S^-1``, ``B = (W S)^T``) solve
``min 1/2 tr((B - B0)^T H~ (B - B0))`` subject to ``B`` on a pattern, by ADMM on all rows at once::

    B <- (H~ + rho I)^-1 (H~ B0 - V + rho D)      # one float64 eigh of H~, reused for every rho
    D <- project_k(B + V / rho)                    # the pattern's top-k in normalised magnitude
    V <- V + rho (B - D)

Every ``check_every`` iterations the number of support flips ``s`` sets rho (k = kept weights):
``s/k > 0.1`` -> x1.3; ``> 0.005`` -> x1.2; at least one flip -> x1.1, or /5 and a dual restart if
rho was never raised; no flip -> stop if rho was raised before (x1.1 before ``min_iter``), else /5. Stop once
``it >= min_iter`` and ``s/k < 3e-4``, or at ``max_iter``. A few PCG iterations on the final support
(warm-started at ``D``) then give the weights. With a robust Gram both the quadratic and the linear
term (``H~_eff B0``) use the effective matrix.

Speed (same iterates, up to float32 rounding): ``(H~ + rho I)^-1 = Q diag(1/(lam + rho)) Q^T`` is
formed once per value of rho (``n^3``) whenever that beats two ``n x n x m`` products per iteration
(``n < 2 m``), so an iteration costs one product; the unstructured top-k projection is a
``O(m n)`` selection of the k-th largest magnitude (``numpy.partition`` on CPU, ``kthvalue`` on an
accelerator) plus a comparison, instead of a ``topk``, and ``N:M`` (``M <= 8``) ranks each weight
by ``M - 1`` comparisons within its group, in the solver's own layout; ``H~ B0`` is computed once and reused by the
final PCG fits.
"""

from __future__ import annotations

import numpy as np
import torch

from robop_lightning.engine.patterns import Pattern
from robop_lightning.engine.solvers.refit import masked_pcg


def alps(
    w: torch.Tensor,
    h: torch.Tensor,
    pattern: Pattern,
    *,
    warm: torch.Tensor | None = None,
    rho0: float = 0.1,
    max_iter: int = 300,
    min_iter: int = 30,
    check_every: int = 3,
    rho_max: float = 1e6,
    pcg_iters: int = 10,
    history: list | None = None,
    prior: torch.Tensor | None = None,
    **_,
) -> tuple[torch.Tensor, torch.Tensor]:
    rows, cols = w.shape
    dev = w.device
    h64 = h.to(device=dev, dtype=torch.float64)
    s = h64.diagonal().clamp_min(torch.finfo(torch.float64).tiny).sqrt()
    ht64 = h64 / torch.outer(s, s)
    ht = ht64.float()
    # float32 eigh (about 2x faster than float64 at n = 2048): the ADMM steps use the resolvent
    # (H~ + rho I)^-1 in float32 anyway, and H~ is Jacobi-normalised (unit diagonal), so its
    # eigenvalues are O(1) to O(n) and the float32 error stays far below rho.
    lam, q = torch.linalg.eigh(ht)
    lam = lam.clamp_min(0)
    s32 = s.float()

    b0 = (w.float() * s32[None, :]).T.contiguous()  # (n, m)
    hb0 = ht @ b0
    qt_hb0 = None  # Q^T H~ B0, only for the two-product update
    kept = pattern.keep_count(rows, cols)
    k = max(kept, 1)

    def project(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        keep = support(x.abs(), pattern, kept, prior)
        return x * keep, keep

    # (H~ + rho I)^-1 as one n x n matrix per rho when forming it (n^3) is cheaper than a second
    # n x n x m product in each of the (at least check_every) iterations that share this rho.
    explicit = cols < 2 * rows
    resolvent = {"rho": None, "m": None}

    def solve(rhs_extra: torch.Tensor, rho: float) -> torch.Tensor:
        nonlocal qt_hb0
        if explicit:
            if resolvent["rho"] != rho:
                resolvent["rho"], resolvent["m"] = rho, (q / (lam + rho)[None, :]) @ q.T
            return resolvent["m"] @ (hb0 + rhs_extra)
        if qt_hb0 is None:
            qt_hb0 = q.T @ hb0
        return q @ ((qt_hb0 + q.T @ rhs_extra) / (lam + rho)[:, None])

    if warm is not None:
        d, supp = project(warm.float().T * s32[:, None])
        b = d.clone()
    else:
        d, supp = project(b0)
        b = b0.clone()
    start_d, start_supp = d, supp
    v = torch.zeros_like(b0)
    rho = rho0
    raised = False
    it = 0
    for it in range(1, max_iter + 1):
        b = solve(rho * d - v, rho)
        d, new_supp = project(b + v / rho)
        v += rho * (b - d)
        if it % check_every:
            continue
        flips = int((new_supp != supp).sum())
        supp = new_supp
        ratio = flips / k
        if history is not None:
            history.append({"iteration": it, "rho": rho, "flips": flips})
        if it >= min_iter and ratio < 3e-4:
            break
        if ratio > 0.1:
            rho, raised = rho * 1.3, True
        elif ratio > 0.005:
            rho, raised = rho * 1.2, True
        elif flips >= 1:
            if raised:
                rho *= 1.1
            else:
                rho /= 5
                v.zero_()
        elif raised:
            if it >= min_iter:
                break
            rho *= 1.1  # stable support, but too early to trust it: keep tightening
        else:
            rho /= 5
        rho = min(rho, rho_max)
    supp = new_supp

    def fitted(support, start, iters=pcg_iters):
        bt = masked_pcg(b0.T, ht, support.T, x0=start.T, iters=iters, hw=hb0)
        e = bt - b0.T
        return bt, support, float(((e @ ht) * e).sum())

    # ADMM is a heuristic on a non-convex set: never return worse than the support it started
    # from (on a well-conditioned H~ that start, normalised magnitude, can be the optimum).
    # PCG only lowers the loss, so a short fit of the start screens it: only a start within 25 %
    # of the ADMM loss after 3 iterations gets the full fit.
    bt, supp, loss = fitted(supp, d)
    if not torch.equal(supp, start_supp):
        screen = min(3, pcg_iters)
        bt0, supp0, loss0 = fitted(start_supp, start_d, screen)
        if loss0 <= 1.25 * loss and pcg_iters > screen:
            bt0, supp0, loss0 = fitted(start_supp, bt0.T, pcg_iters - screen)
        if loss0 < loss:
            bt, supp = bt0, supp0
    w_hat = bt / s32[None, :]
    mask = supp.T.contiguous()
    return w_hat * mask, mask


def support(scores: torch.Tensor, pattern: Pattern, kept: int, prior: torch.Tensor | None = None) -> torch.Tensor:
    """The pattern's keep-mask of ``scores`` in the solver layout ``(inputs, rows)``.

    ``kept`` is ``pattern.keep_count(rows, inputs)``. Unstructured and ``N:M`` (``M <= 8``) use the
    fast selections below; other patterns, and any ``prior`` mask, go through ``pattern.select``.
    """
    if pattern.kind == "unstructured" and prior is None and 0 < kept < scores.numel():
        return _top_k_mask(scores, kept)
    if pattern.kind == "nm" and prior is None and pattern.m <= 8:
        return _nm_mask(scores, pattern.n, pattern.m)
    return pattern.select(scores.T, prior=prior).T


def _top_k_mask(a: torch.Tensor, k: int) -> torch.Tensor:
    """Bool mask of the ``k`` largest entries of ``a`` (ties at the threshold: first in memory order).

    Selects the k-th largest value in ``O(numel)`` (``numpy.partition`` on CPU, ``kthvalue``
    elsewhere) and compares, instead of a ``topk`` over the whole layer.
    """
    flat = a.reshape(-1)
    total = flat.numel()
    if flat.device.type == "cpu" and flat.dtype in (torch.float32, torch.float64):
        arr = flat.detach().numpy()
        thr = torch.as_tensor(np.partition(arr, total - k)[total - k], dtype=flat.dtype)
    else:
        thr = torch.kthvalue(flat, total - k + 1).values
    keep = flat >= thr
    extra = int(keep.sum()) - k
    if extra > 0:  # ties at the threshold: keep the first ones only
        ties = torch.nonzero(flat == thr).flatten()
        keep[ties[ties.numel() - extra :]] = False
    return keep.view_as(a)


def _nm_mask(a: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Keep the ``n`` largest of every ``m`` consecutive entries along dim 0 of ``a`` (inputs x rows).

    An entry is kept when fewer than ``n`` entries of its group beat it (larger, or equal and
    earlier): ``m (m - 1)`` elementwise comparisons instead of a ``topk`` over groups of ``m``.
    """
    g = a.reshape(a.shape[0] // m, m, *a.shape[1:])
    beaten = torch.zeros(g.shape, dtype=torch.int8, device=a.device)
    for j in range(m):
        gj = g[:, j]
        for i in range(m):
            if i != j:
                beaten[:, j] += (g[:, i] > gj) if i > j else (g[:, i] >= gj)
    return (beaten < n).reshape(a.shape)
