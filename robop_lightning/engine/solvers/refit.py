"""Least-squares refit of the kept weights on a fixed mask (the plug-in step).

For each output row ``i`` with kept set ``S``:
``w_hat_S = w_S + H_SS^-1 H_{S,Sc} w_Sc``, i.e. ``argmin_{w_hat supported on S} (w_hat - w)^T H (w_hat - w)``.
Two ways: an exact per-row back-solve (small layers, tests) and a batched preconditioned
conjugate gradient on all rows at once (large layers; ALPS's PCG step).
"""

from __future__ import annotations

import torch

__all__ = ["refit", "masked_pcg", "exact_refit"]

_REFIT_ITERS = 30  # CG iterations of a large-layer refit (see refit)


def exact_refit(w: torch.Tensor, h: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Exact per-row solution in float64 (``O(m k^3)``: for small layers and tests)."""
    w64, h64 = w.double(), h.double().to(w.device)
    out = torch.zeros_like(w64)
    for i in range(w64.shape[0]):
        s = mask[i]
        if not s.any():
            continue
        sc = ~s
        hss = h64[s][:, s]
        rhs = hss @ w64[i, s] + h64[s][:, sc] @ w64[i, sc]
        x, info = torch.linalg.solve_ex(hss, rhs)
        if info.item() != 0:  # singular H_SS (no damping): the system is consistent (H is PSD), take the min-norm solution
            x = torch.linalg.lstsq(hss.cpu(), rhs.cpu().unsqueeze(1), driver="gelsd").solution.squeeze(1).to(hss.device)
        out[i, s] = x
    return out.to(w.dtype)


def masked_pcg(
    w: torch.Tensor,
    h: torch.Tensor,
    mask: torch.Tensor,
    x0: torch.Tensor | None = None,
    iters: int = 10,
    tol: float = 0.0,
    hw: torch.Tensor | None = None,
) -> torch.Tensor:
    """Batched Jacobi-preconditioned CG for ``min_{X on mask} tr((X - W) H (X - W)^T)``.

    Args:
        w: ``(m, n)`` target weights.
        h: ``(n, n)`` positive definite Gram (damped).
        mask: ``(m, n)`` bool, True where a weight is free.
        x0: warm start (zeros outside the mask are enforced); ``w * mask`` by default.
        iters: maximum CG iterations.
        tol: stop when every row's relative residual is below ``tol`` (0 = run ``iters``).
        hw: ``H @ w^T`` (n, m) when the caller already has it (saves one product).

    Returns:
        ``(m, n)`` solution in ``w``'s dtype with exact zeros outside ``mask``.
    """
    dtype = w.dtype
    hm = h.to(device=w.device, dtype=dtype)
    p = mask.T.to(dtype)  # (n, m): columns are rows of W
    wt = w.T
    x = (w if x0 is None else x0).T.to(dtype) * p
    b = (hm @ wt if hw is None else hw.to(dtype)) * p
    r = b - (hm @ x) * p
    diag = hm.diagonal().clamp_min(torch.finfo(dtype).tiny)[:, None]
    z = r / diag
    d = z.clone()
    rz = (r * z).sum(0)
    b_norm = b.norm(dim=0).clamp_min(torch.finfo(dtype).tiny)
    for _ in range(iters):
        if tol > 0 and bool((r.norm(dim=0) <= tol * b_norm).all()):
            break
        ad = (hm @ d) * p
        dad = (d * ad).sum(0)
        alpha = torch.where(dad > 0, rz / dad.clamp_min(torch.finfo(dtype).tiny), torch.zeros_like(rz))
        x += alpha * d
        r -= alpha * ad
        z = r / diag
        rz_new = (r * z).sum(0)
        beta = torch.where(rz > 0, rz_new / rz.clamp_min(torch.finfo(dtype).tiny), torch.zeros_like(rz))
        d = z + beta * d
        rz = rz_new
    return (x * p).T.contiguous()


def refit(w: torch.Tensor, h: torch.Tensor, mask: torch.Tensor, exact: bool | None = None,
          x0: torch.Tensor | None = None) -> torch.Tensor:
    """Least-squares optimal kept weights on ``mask`` under ``h`` (exact for small layers)."""
    n = w.shape[1]
    if exact is None:
        exact = n <= 128 and w.shape[0] * n <= 1 << 16
    if exact:
        return exact_refit(w, h, mask)
    # float32 CG on the Jacobi-preconditioned system, warm-started from the solver's weights: on
    # real Gemma layers (q_proj, down_proj at 70 %, CTE rounds) 30 iterations leave the loss within
    # 3e-6 (relative) of a 150-iteration fit, far below the 1e-3 that separates the candidates the
    # refit compares; float32 halves each iteration's cost against float64.
    out = masked_pcg(w.float(), h, mask, x0=x0, iters=_REFIT_ITERS, tol=1e-5)
    return out.to(w.dtype)
