"""This project's min-max extension of RobOP: not the authors' sets (see docs/method.md, "The min-max extension").

The authors define their four sets as closed-form regularisers solved once
(:mod:`robop_lightning.engine.sets.closed_form`). The sets here are a different reading: the
worst case over a set of Grams is *shared by all output rows* ("coupled") and chased by a
Frank-Wolfe alternation in :func:`robop_lightning.prune_layer` (4 to 7 solves per layer). They
are kept under names that cannot be confused with the authors' sets:

==============  ===========================================  ==========================================
name            set ``U`` around ``H``                        coupled worst case ``H'``
==============  ===========================================  ==========================================
minmax-trace    ``{H + D : D PSD, tr D <= rho tr H}``         ``H + r v v^T`` (top singular vector of E)
minmax-e        ``{S (H~ + Delta) S : ||Delta||_F <= r}``     ``H + r S G~ S / ||G~||_F``
cvar            ``{S sum_s q_s H_s : q_s <= 1/(alpha S)}``    the worst ``alpha`` fraction of samples
==============  ===========================================  ==========================================

``coupled=False`` gives the per-row forms of minmax-trace (the ridge ``H + r I``) and minmax-e
(``H + r Diag(H)``), which are static (one solve). Radii are relative: ``rho`` scales
``tr(H)`` for minmax-trace and ``||H~||_F`` for minmax-e, ``alpha`` is cvar's tail fraction.

Default radii (``radius=None``):

============  ==========================  =====================================================
set           coupled (default)           per-row (``coupled=False``)
============  ==========================  =====================================================
minmax-trace  ``rho = 0.01``              ``rho = 0.05 / n`` (a ridge of 5 % of mean(diag H))
minmax-e      90 % bootstrap quantile of  same bootstrap radius
              ``||H~_b - H~||_F/||H~||_F``
cvar          ``alpha = 0.5``             not available (one Gram per row)
============  ==========================  =====================================================

Measured (``benchmarks/results/layer_real*.md``): at 5-15x the Baseline's time these forms did
not beat the Baseline on held-out or out-of-distribution data; they stay as an extension.
"""

from __future__ import annotations


import torch

from robop_lightning.engine.sets.base import UncertaintySet, quad

__all__ = ["MinMaxTrace", "MinMaxEllipsoid", "CVaR", "cvar_weights", "spectral_norm_sq", "MINMAX_SETS"]

MINMAX_SETS = ("minmax-trace", "minmax-e", "cvar")


def spectral_norm_sq(e: torch.Tensor, iters: int = 100, tol: float = 1e-7) -> tuple[float, torch.Tensor]:
    """``||E||_2^2`` and the top right singular vector ``v`` of ``E`` by power iteration on ``E^T E``.

    The start vector is the column-norm vector of ``E`` (deterministic); for an ``E`` with at most
    64 columns or rows an exact eigendecomposition is used instead.
    """
    e64 = e.double()
    m, n = e64.shape
    if min(m, n) <= 64:
        g = e64.T @ e64
        vals, vecs = torch.linalg.eigh(g)
        return float(vals[-1].clamp_min(0)), vecs[:, -1]
    v = e64.pow(2).sum(0).sqrt()
    if float(v.norm()) == 0:
        return 0.0, torch.zeros(n, dtype=torch.float64, device=e.device)
    v = v / v.norm()
    lam = 0.0
    for _ in range(iters):
        w = e64.T @ (e64 @ v)
        new = float(w.norm())
        if new == 0:
            return 0.0, v
        v = w / new
        if abs(new - lam) <= tol * new:
            lam = new
            break
        lam = new
    return lam, v


class MinMaxTrace(UncertaintySet):
    """``U = {H + D : D PSD, tr D <= rho tr H}``: extra calibration tokens of bounded energy.

    Coupled worst case ``H + r v v^T`` (``v``: top right singular vector of ``E``), penalty
    ``r ||E||_2^2``. Per row it is the ridge ``H + r I``, penalty ``r ||E||_F^2``.
    """

    name = "minmax-trace"

    def __init__(self, rho: float | None = None, coupled: bool = True):
        self.coupled = coupled
        self.dynamic = coupled
        self._rho = rho

    def prepare(self, h, inputs, lam0):
        super().prepare(h, inputs, lam0)
        n = h.shape[0]
        self.rho = self._rho if self._rho is not None else (0.01 if self.coupled else 0.05 / n)
        self.r = self.rho * float(h.diagonal().sum())
        self.dynamic = self.coupled and self.r > 0

    def effective(self):
        return self.h + self.r * torch.eye(self.h.shape[0], dtype=self.h.dtype, device=self.h.device)

    def worst_case(self, e):
        _, v = spectral_norm_sq(e)
        v = v.to(self.h.device)
        return self.h + self.r * torch.outer(v, v)

    def robust_loss(self, e):
        if self.coupled:
            return quad(self.h, e) + self.r * spectral_norm_sq(e)[0]
        return quad(self.h, e) + self.r * float(e.double().pow(2).sum())

    def describe(self):
        return f"minmax-trace(rho={self.rho:.3g}{'' if self.coupled else ', per-row'})"


class MinMaxEllipsoid(UncertaintySet):
    """``U = {S (H~ + Delta) S : ||Delta||_F <= rho ||H~||_F}``: relative error of the Gram.

    Coupled worst case ``H + r S G~ S / ||G~||_F`` with ``G~ = S E^T E S``, penalty ``r ||G~||_F``.
    Per row it is ``H + r Diag(H)``. ``rho=None`` takes the 90 % bootstrap quantile of the
    Gram's relative estimation error over the calibration samples.
    """

    name = "minmax-e"

    def __init__(self, rho: float | None = None, coupled: bool = True):
        self.coupled = coupled
        self.dynamic = coupled
        self._rho = rho

    def prepare(self, h, inputs, lam0):
        super().prepare(h, inputs, lam0)
        self.rho = self._rho if self._rho is not None else inputs.bootstrap_radius()
        self.diag = h.diagonal().clone()
        s = self.diag.sqrt()
        ht_norm = float(torch.linalg.matrix_norm(h / torch.outer(s, s).clamp_min(torch.finfo(h.dtype).tiny)))
        self.r = self.rho * ht_norm
        self.dynamic = self.coupled and self.r > 0

    def _gt_norm(self, e: torch.Tensor) -> float:
        et = e.double() * self.diag.to(e.device).sqrt()[None, :]
        m, n = et.shape
        g = et @ et.T if m <= n else et.T @ et
        return float(torch.linalg.matrix_norm(g))

    def effective(self):
        return self.h + self.r * torch.diag(self.diag)

    def worst_case(self, e):
        norm = self._gt_norm(e)
        if norm == 0:
            return self.h
        ed = e.double().to(self.h.device) * self.diag[None, :]
        return self.h + (self.r / norm) * (ed.T @ ed)

    def robust_loss(self, e):
        if self.coupled:
            return quad(self.h, e) + self.r * self._gt_norm(e)
        return quad(self.h, e) + self.r * float((e.double().pow(2) * self.diag.to(e.device)[None, :]).sum())

    def describe(self):
        return f"minmax-e(rho={self.rho:.3g}{'' if self.coupled else ', per-row'})"


def cvar_weights(losses: torch.Tensor, alpha: float) -> torch.Tensor:
    """Worst-case ``q`` on the simplex with ``q_s <= 1 / (alpha S)``: fill the largest losses first.

    ``S * sum_s q_s l_s`` is then ``S`` times the CVaR at level ``alpha`` of the per-sample losses.
    Ties are broken by sample index, so the result is deterministic.
    """
    s = losses.numel()
    cap = 1.0 / (alpha * s)
    order = torch.sort(losses, descending=True, stable=True).indices
    filled = torch.clamp(1.0 - cap * torch.arange(s, dtype=torch.float64, device=losses.device), min=0.0)
    sorted_q = torch.clamp(filled, max=cap)
    q = torch.empty_like(sorted_q)
    q[order] = sorted_q
    return q


class CVaR(UncertaintySet):
    """CVaR over calibration **samples** (images, sequences): the extension's sample re-weighting.

    ``U = {S sum_s q_s H_s : q in simplex, q_s <= 1/(alpha S)}``; the worst case re-weights the
    ``ceil(alpha S)`` samples with the largest loss ``||X_s E^T||_F^2``. ``alpha = 1`` is ``H``.
    """

    name = "cvar"
    coupled = True

    def __init__(self, alpha: float | None = None):
        self.alpha = 0.5 if alpha is None else alpha
        # alpha = 1 is the singleton {H}: no worst case to chase, exactly the nominal problem.
        self.dynamic = self.alpha < 1.0

    def _q(self, e):
        return cvar_weights(self.inputs.sample_losses(e), self.alpha)

    def worst_case(self, e):
        q = self._q(e)
        return self.inputs.gram(sample_weights=q * q.numel(), device=self.h.device)

    def robust_loss(self, e):
        losses = self.inputs.sample_losses(e)
        q = cvar_weights(losses, self.alpha)
        return float(losses.numel() * (q * losses).sum())

    def describe(self):
        return f"cvar(alpha={self.alpha:.3g})"
