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
"""

from __future__ import annotations

import torch

from robop_lightning.patterns import Pattern
from robop_lightning.solvers.refit import masked_pcg


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
    lam64, q64 = torch.linalg.eigh(ht64)
    lam = lam64.clamp_min(0).float()
    q = q64.float()
    ht = ht64.float()
    s32 = s.float()

    b0 = (w.float() * s32[None, :]).T.contiguous()  # (n, m)
    qt_hb0 = q.T @ (ht @ b0)
    k = max(pattern.keep_count(rows, cols), 1)

    def project(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        keep = pattern.select(x.abs().T, prior=prior).T
        return x * keep, keep

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
        b = q @ ((qt_hb0 + q.T @ (rho * d - v)) / (lam + rho)[:, None])
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

    def fitted(support, start):
        bt = masked_pcg(b0.T, ht, support.T, x0=start.T, iters=pcg_iters)
        e = bt - b0.T
        return bt, support, float(((e @ ht) * e).sum())

    # ADMM is a heuristic on a non-convex set: never return worse than the support it started
    # from (on a well-conditioned H~ that start, normalised magnitude, can be the optimum).
    bt, supp, loss = fitted(supp, d)
    if not torch.equal(supp, start_supp):
        bt0, supp0, loss0 = fitted(start_supp, start_d)
        if loss0 < loss:
            bt, supp = bt0, supp0
    w_hat = bt / s32[None, :]
    mask = supp.T.contiguous()
    return w_hat * mask, mask
