"""The four uncertainty sets of RobOP: Baseline, Trace, E (ellipsoid) and CTE (SPEC §2).

Each set ``U`` is a family of Gram matrices around the calibration Gram ``H``. The robust loss of
a pruned weight is the support function ``Phi_U(E) = max_{H' in U} <H', E^T E>`` with
``E = W - W_hat``. Every set here provides, in closed form:

* ``robust_loss(E)``: ``Phi_U`` (absolute, not normalised);
* for *static* sets (Baseline, per-row Trace and E): ``effective()``, the one matrix the solver is
  handed;
* for *dynamic* sets (coupled Trace and E, CTE): ``worst_case(E)``, the maximiser ``H'`` used by
  the Frank-Wolfe alternation in :func:`robop_lightning.prune_layer`.

Radii are relative, never absolute (SPEC §1): ``rho`` scales ``tr(H)`` for Trace and
``||H~||_F`` for E, ``alpha`` is the CTE tail fraction.

Default radii (``radius=None``):

==========  ==========================  =====================================================
set         coupled (default)           per-row (``coupled=False``)
==========  ==========================  =====================================================
trace       ``rho = 0.01``              ``rho = 0.05 / n`` (a ridge of 5 % of mean(diag H))
e           90 % bootstrap quantile of  same bootstrap radius
            ``||H~_b - H~||_F/||H~||_F``
cte         ``alpha = 0.5``             not available (one Gram per row)
==========  ==========================  =====================================================
"""

from __future__ import annotations

import math

import torch

from robop_lightning.gram import LayerInputs

__all__ = ["UncertaintySet", "Baseline", "Trace", "Ellipsoid", "CTE", "make_uncertainty", "UNCERTAINTY_SETS"]


def _inner(h: torch.Tensor, e: torch.Tensor) -> float:
    """``<H, E^T E> = tr(E H E^T)`` in float64."""
    e64 = e.double()
    return float(((e64 @ h.to(device=e.device, dtype=torch.float64)) * e64).sum())


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


class UncertaintySet:
    """Base class: a set around ``H`` described by its closed-form inner maximisation."""

    name = "set"
    dynamic = False
    coupled = True

    def prepare(self, h: torch.Tensor, inputs: LayerInputs, lam0: float) -> None:
        """Bind the layer's statistics (``H`` in float64, the inputs, the base damping)."""
        self.h = h
        self.inputs = inputs
        self.lam0 = lam0

    def effective(self) -> torch.Tensor:
        """The (undamped) matrix a static set hands to the solver."""
        return self.h

    def worst_case(self, e: torch.Tensor) -> torch.Tensor:  # pragma: no cover - dynamic sets only
        raise NotImplementedError

    def robust_loss(self, e: torch.Tensor) -> float:
        raise NotImplementedError

    def describe(self) -> str:
        return self.name


class Baseline(UncertaintySet):
    """``U = {H + lambda0 I}``: the nominal problem with SparseGPT's relative damping."""

    name = "baseline"

    def robust_loss(self, e: torch.Tensor) -> float:
        return _inner(self.h, e) + self.lam0 * float(e.double().pow(2).sum())


class Trace(UncertaintySet):
    """``U = {H + D : D PSD, tr D <= rho tr H}``: extra calibration tokens of bounded energy.

    Coupled worst case ``H + r v v^T`` (``v``: top right singular vector of ``E``), penalty
    ``r ||E||_2^2``. Per row it is the ridge ``H + r I``, penalty ``r ||E||_F^2``.
    """

    name = "trace"

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
            return _inner(self.h, e) + self.r * spectral_norm_sq(e)[0]
        return _inner(self.h, e) + self.r * float(e.double().pow(2).sum())

    def describe(self):
        return f"trace(rho={self.rho:.3g}{'' if self.coupled else ', per-row'})"


class Ellipsoid(UncertaintySet):
    """``U = {S (H~ + Delta) S : ||Delta||_F <= rho ||H~||_F}``: relative error of the Gram.

    Coupled worst case ``H + r S G~ S / ||G~||_F`` with ``G~ = S E^T E S``, penalty ``r ||G~||_F``.
    Per row it is ``H + r Diag(H)``. ``rho=None`` takes the 90 % bootstrap quantile of the
    Gram's relative estimation error over the calibration samples.
    """

    name = "e"

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
            return _inner(self.h, e) + self.r * self._gt_norm(e)
        return _inner(self.h, e) + self.r * float((e.double().pow(2) * self.diag.to(e.device)[None, :]).sum())

    def describe(self):
        return f"e(rho={self.rho:.3g}{'' if self.coupled else ', per-row'})"


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


class CTE(UncertaintySet):
    """Conditional tail expectation (CVaR) over calibration **samples** (images, sequences).

    ``U = {S sum_s q_s H_s : q in simplex, q_s <= 1/(alpha S)}``; the worst case re-weights the
    ``ceil(alpha S)`` samples with the largest loss ``||X_s E^T||_F^2``. ``alpha = 1`` is ``H``.
    """

    name = "cte"

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
        return f"cte(alpha={self.alpha:.3g})"


UNCERTAINTY_SETS = ("baseline", "trace", "e", "cte")


def make_uncertainty(name: str, radius: float | None, coupled: bool) -> UncertaintySet:
    """Build a set from its public name, checking the radius's range."""
    if not isinstance(name, str) or name.lower() not in UNCERTAINTY_SETS:
        raise ValueError(f"unknown uncertainty set {name!r}: use one of {', '.join(UNCERTAINTY_SETS)}.")
    name = name.lower()
    if radius is not None:
        if isinstance(radius, bool) or not isinstance(radius, (int, float)) or not math.isfinite(radius):
            raise ValueError(f"radius must be a finite number or None, got {radius!r}.")
        radius = float(radius)
    if name == "baseline":
        if radius is not None:
            raise ValueError(
                "the baseline set has no radius (its damping is the `damping` argument, 0.01 by default); "
                "pass radius=None."
            )
        return Baseline()
    if name == "trace":
        if radius is not None and radius < 0:
            raise ValueError(f"trace radius rho must be >= 0 (a fraction of tr(H)), got {radius}.")
        return Trace(radius, coupled)
    if name == "e":
        if radius is not None and radius < 0:
            raise ValueError(f"ellipsoid radius rho must be >= 0 (relative to ||H~||_F), got {radius}.")
        return Ellipsoid(radius, coupled)
    if radius is not None and not (0.0 < radius <= 1.0):
        raise ValueError(f"CTE radius alpha must be in (0, 1] (the tail fraction of samples), got {radius}.")
    if not coupled:
        raise ValueError(
            "per-row CTE (coupled=False) is not available: it needs one Gram per output row. "
            "Use coupled=True (the default) for CTE."
        )
    return CTE(radius)
