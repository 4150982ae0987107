"""ALPS (Meng et al., NeurIPS 2024): ADMM with a support-driven rho schedule, then CG on the support.

Step for step the authors' ``ALPS_admm`` (github.com/mazumder-lab/ALPS, ``alps.py``). In
Jacobi-normalised coordinates (``s = diag(H)^1/2 + 1e-8``, ``H~ = S^-1 H S^-1``, ``B0 = (W S)^T``)
solve ``min 1/2 tr((B - B0)^T H~ (B - B0))`` subject to ``B`` on a pattern, by ADMM on all rows at
once, starting from ``D = project_k(B0)``, ``V = 0``::

    B <- (H~ + rho I)^-1 (H~ B0 - V + rho D)      # one float64 eigh of H~, reused for every rho
    D <- project_k((V + rho B) / rho)              # the pattern's top-k in normalised magnitude
    V <- V + rho (B - D)

Every ``check_every`` iterations the number ``s`` of support flips of ``D`` since the last check
updates rho, in this order (``k`` kept weights):

1. ``s/k > 0.1``: rho x1.3 (rho "raised"); ``s/k > 0.005``: x1.2 (raised);
2. at least one flip: x1.1 if rho was ever raised, else rho /5 and a **restart**: ``B = B0``,
   ``D = project_k(B0)``, ``V = 0``;
3. no flip: **stop** if rho was ever raised (at any iteration), else rho /5;
4. rho is capped at ``rho_max``; then **stop** if more than ``min_iter`` iterations ran and
   ``s/k < 3e-4`` (the test follows the rho update, so a restart just before it ends the run on
   ``B0``).

At ``max_iter`` the run stops too. The support is the pattern's top-k of the last ``B`` (not of
``D``); ``pcg_iters`` conjugate-gradient iterations on that support, started from ``B`` there, give
the weights. With a robust Gram both the quadratic and the linear term (``H~_eff B0``) use the
effective matrix.

Numerics, as the authors: ``eigh`` in float64, each ``(H~ + rho I)^-1 = Q diag(1/(lam + rho)) Q^T``
formed in float64 and rounded to float32, the iterates in float32. Checked against a transcription of
the authors' iteration (``tests/engine/test_alps.py``): identical masks on 199 of 200 random problems,
the other one on the two-product path below. Differences that only change rounding, kept for speed:

* when ``n >= 2 m`` (wide layers) the resolvent is applied as ``Q (Q^T x / (lam + rho))`` in float32
  instead of being formed (two ``n x n x m`` products per iteration beat ``n^3`` per rho; float64
  ``n^3`` per rho is what the authors pay);
* the resolvent is formed once per value of rho (the authors re-form it at every check);
* the unstructured top-k is a ``O(m n)`` selection of the k-th largest magnitude (``numpy.partition``
  on CPU, a radix select on an accelerator, where ``torch.kthvalue`` is slow on one large slice)
  plus a comparison, and ``N:M`` (``M <= 8``) ranks each weight by ``M - 1`` comparisons within its
  group;
* the CG is Jacobi-preconditioned (the authors' is not; ``diag(H~)`` is 1 up to the ``1e-8``, so
  the preconditioner is the identity up to rounding) and runs its ``pcg_iters`` iterations (the
  authors' stop test on the unmasked residual never fires before them on a pruned support).

Extensions the authors do not have: ``warm`` (start ADMM from a previous solution, used by the
min-max alternation) and ``prior`` (a keep-mask of an earlier pruning that the support may not
leave), both inactive by default; and ``fallback`` (on by default): when the start support
(normalised magnitude, or ``warm``'s) fits with a lower loss than ADMM's, return it. Measured on 200
random problems (8x24 to 48x96, 50-90 % and 2:4): with the 1 % damping alone (the authors' setting)
it changed none of 104 results; with a further ridge of 0.3 x ``mean(diag H)`` it lowered the loss
of 1 of 48 (by 0.2 %), with 3 x ``mean(diag H)`` of 18 of 48 (by 0.1-2.5 %): ``H~`` near a scaled
identity, as under large robust-set ridges, where ADMM can stop on a support worse than its start.
``fallback=False`` is the authors' procedure exactly.
The float32 ``eigh`` the solver used before is gone: it changed the mask on 4 more of those 200
problems than float64 (rounding) for about 1 s per 2048-input layer on one CPU thread.
"""

from __future__ import annotations

import torch

from robop_lightning.engine.damping import positive_definite
from robop_lightning.engine.patterns import Pattern
from robop_lightning.engine.solvers._select import extreme_mask
from robop_lightning.engine.solvers.refit import masked_pcg


def _normalised_eigh(h: torch.Tensor, dev: torch.device):
    """The authors' normalisation ``H~ = S^-1 H S^-1`` (float32, their order of operations) and the float64
    ``eigh`` of the float32 matrix the iterates use, as theirs: ``(s, H~, lam, Q)``."""
    h32 = h.to(device=dev, dtype=torch.float32)
    s32 = h32.diagonal().clamp_min(0).sqrt() + 1e-8
    ht = ((h32 / s32).T / s32).T.contiguous()
    lam, q = torch.linalg.eigh(ht.double())
    return s32, ht, lam.clamp_min(0), q


def prepare(h: torch.Tensor):
    """The normalisation and ``eigh`` of a damped Gram (on ``h``'s device), or ``None`` when it is
    not positive definite in float64 and, Jacobi-scaled, in float32 (what the float32 iterates need).

    Example:
        >>> prepare(torch.tensor([[1.0, 2.0], [2.0, 1.0]], dtype=torch.float64)) is None  # indefinite
        True
    """
    return _normalised_eigh(h, h.device) if positive_definite(h) else None


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
    fallback: bool = True,
    history: list | None = None,
    prior: torch.Tensor | None = None,
    factor: tuple | None = None,
    **_,
) -> tuple[torch.Tensor, torch.Tensor]:
    """ALPS on ``w`` ``(m, n)`` with the damped Gram ``h``; returns ``(w_hat, keep)`` (see the module).

    ``factor``: :func:`prepare`'s result for ``h`` (the engine's, shared by the layers with this ``h``).
    """
    rows, cols = w.shape
    dev = w.device
    s32, ht, lam, q = (_normalised_eigh(h, dev) if factor is None else (t.to(dev) for t in factor))

    b0 = (w.float() * s32[None, :]).T.contiguous()  # (n, m)
    hb0 = (b0.T @ ht).T  # H~ B0, computed as the authors' (W S) H~
    kept = pattern.keep_count(rows, cols)
    k = max(kept, 1)

    def project(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        keep = support(x.abs(), pattern, kept, prior)
        return x * keep.to(x.dtype), keep

    # The authors form (H~ + rho I)^-1 as one n x n matrix (float64, rounded to float32) for every
    # rho; for wide layers two n x n x m products per iteration are cheaper than n^3 per rho.
    explicit = cols < 2 * rows
    q32 = None if explicit else q.float()
    qt_hb0 = None if explicit else q32.T @ hb0
    resolvent = {"rho": None, "m": None}

    def solve(v: torch.Tensor, d: torch.Tensor, rho: float) -> torch.Tensor:
        """``(H~ + rho I)^-1 (H~ B0 - V + rho D)``."""
        if explicit:
            if resolvent["rho"] != rho:
                resolvent["rho"], resolvent["m"] = rho, (q @ ((1 / (lam + rho)) * q).T).float()
            return resolvent["m"] @ (hb0 - v + rho * d)
        return q32 @ ((qt_hb0 + q32.T @ (rho * d - v)) / (lam + rho).float()[:, None])

    if warm is not None:
        d, supp = project(warm.float().T * s32[:, None])
        b = d.clone()
    else:
        d, supp = project(b0)
        b = b0.clone()
    start_b, start_d, start_supp = b, d, supp
    v = torch.zeros_like(b0)
    rho = rho0
    raised = False
    for it in range(1, max_iter + 1):
        b = solve(v, d, rho)
        d, new_supp = project((v + rho * b) / rho)
        v += rho * (b - d)
        if it % check_every:
            continue
        flips = int(torch.count_nonzero(new_supp != supp))
        ratio = flips / k
        if history is not None:
            history.append({"iteration": it, "rho": rho, "flips": flips})
        if ratio > 0.1:
            rho, raised = rho * 1.3, True
        elif ratio > 0.005:
            rho, raised = rho * 1.2, True
        elif flips >= 1:
            if raised:
                rho *= 1.1
            else:  # restart from the start, with a smaller rho
                rho /= 5
                b, d, v = start_b.clone(), start_d.clone(), torch.zeros_like(b0)
        elif raised:
            break  # the support is stable after rho was raised: done, however early
        else:
            rho /= 5
        supp = new_supp
        rho = min(rho, rho_max)
        if it > min_iter and ratio < 3e-4:
            break

    def fitted(support, start, iters=pcg_iters):
        bt = masked_pcg(b0.T, ht, support.T, x0=start.T, iters=iters, hw=hb0)
        e = bt - b0.T
        return bt, support, float(((e @ ht) * e).sum())

    # the final support is the pattern's top-k of B (the authors'), then CG on it from B
    b, supp = project(b)
    if not fallback:
        bt = masked_pcg(b0.T, ht, supp.T, x0=b.T, iters=pcg_iters, hw=hb0)
    else:
        # never return worse than the start support (normalised magnitude): a 3-iteration fit
        # screens it, only a start within 25 % of the ADMM loss gets the full fit
        bt, supp, loss = fitted(supp, b)
        if not torch.equal(supp, start_supp):
            screen = min(3, pcg_iters)
            bt0, supp0, loss0 = fitted(start_supp, start_d, screen)
            if loss0 <= 1.25 * loss and pcg_iters > screen:
                bt0, supp0, loss0 = fitted(start_supp, bt0.T, pcg_iters - screen)
            if loss0 < loss:
                bt, supp = bt0, supp0
    w_hat = bt / s32[None, :]
    mask = supp.T.contiguous()
    return w_hat * mask.to(w_hat.dtype), mask


def support(scores: torch.Tensor, pattern: Pattern, kept: int, prior: torch.Tensor | None = None) -> torch.Tensor:
    """The pattern's keep-mask of ``scores`` in the solver layout ``(inputs, rows)``.

    ``kept`` is ``pattern.keep_count(rows, inputs)``. Unstructured and ``N:M`` (``M <= 8``) use the
    fast selections below; other patterns, and any ``prior`` mask, go through ``pattern.select``.
    """
    if pattern.kind == "unstructured" and prior is None and 0 < kept < scores.numel():
        return extreme_mask(scores, kept)
    if pattern.kind == "nm" and prior is None and pattern.m <= 8:
        return _nm_mask(scores, pattern.n, pattern.m)
    return pattern.select(scores.T, prior=prior).T


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
