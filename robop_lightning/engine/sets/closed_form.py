"""The four uncertainty sets as RobOP's authors define them: closed-form regularisers, one solve.

``H = X^T X`` summed over the ``N`` calibration tokens (samples x tokens per sample; under several
processes the global count) and ``gamma`` the set's radius (the authors' ``--gamma``, 0.01 by
default for every set). The solver runs **once** on ``H + D``; ``D`` replaces the Baseline damping,
it is not added to it:

==========  =================================================  ==========================================
set         ``D``                                              reading
==========  =================================================  ==========================================
baseline    ``gamma mean(diag H) I``                           SparseGPT / ALPS damping (``percdamp``)
trace       ``gamma tr(H) / sqrt(N) I``                        a ridge shrinking like ``1/sqrt(N)``
e           ``gamma sqrt(tr(H) / N) H^(1/2)``                  eigenvalue-shaped (eigenvalues clamped at 0)
cte         ``gamma I``                                        absolute, in the units of ``X^T X``
==========  =================================================  ==========================================

Per output row each ``D`` is the support function of a set of Grams around ``H`` evaluated at
``e e^T``, so the robust problem of a row is the nominal one under ``H + D`` and every solver
(ALPS, CAP, SparseGPT, structured OBS) stays exact when handed ``H + D``.

**CTE is scale-dependent.** Its ridge is absolute: ``gamma = 0.01`` is a strong regulariser for
inputs of unit scale summed over a few hundred tokens, and next to nothing for an LLM layer whose
``mean(diag H)`` is ``1e4``-``1e6``. Pass ``radius = c * mean(diag H)`` for a relative ridge ``c``
(then CTE is the Baseline set with ``gamma = c``), or use ``trace``, whose ridge is relative.
"""

from __future__ import annotations

import math

import torch

from robop_lightning.engine.gram import LayerInputs
from robop_lightning.engine.sets.base import UncertaintySet, quad

__all__ = ["ClosedFormSet", "closed_form_damping", "closed_form_spectrum", "sqrt_psd", "CLOSED_FORM_SETS", "DEFAULT_GAMMA"]

CLOSED_FORM_SETS = ("baseline", "trace", "e", "cte")
DEFAULT_GAMMA = 0.01


def sqrt_psd(h: torch.Tensor) -> torch.Tensor:
    """``H^(1/2)`` of a symmetric matrix, eigenvalues clamped at 0 (one float64 eigendecomposition)."""
    vals, vecs = torch.linalg.eigh(h.double())
    root = (vecs * vals.clamp_min(0).sqrt()) @ vecs.T
    return 0.5 * (root + root.T)


def closed_form_spectrum(name: str, mean_diag: float, trace: float, n_tokens: int, gamma: float) -> tuple[float, float]:
    """The authors' ``D`` for set ``name`` as ``(ridge, root)``: ``D = ridge I + root H^(1/2)``.

    Every set is a spectral function of ``H``: it shifts each eigenvalue ``lam`` of ``H`` to
    ``lam + ridge + root sqrt(lam)`` and keeps the eigenvectors, so one eigendecomposition of ``H``
    serves every set and every gamma (what ``uncertainty="auto"`` scores candidates with).

    Args:
        name: ``"baseline"``, ``"trace"``, ``"e"`` or ``"cte"``.
        mean_diag: ``mean(diag H)``.
        trace: ``tr(H)``.
        n_tokens: ``N``, the number of calibration tokens (rows of ``X``) behind ``H``.
        gamma: the set's radius.

    Example:
        >>> closed_form_spectrum("e", 100.0, 400.0, 16, 0.01)  # root: 0.01 * sqrt(400 / 16)
        (0.0, 0.05)
    """
    if n_tokens < 1:
        raise ValueError(f"the number of calibration tokens must be >= 1, got {n_tokens}.")
    if name == "baseline":
        return gamma * mean_diag, 0.0
    if name == "trace":
        return gamma * trace / math.sqrt(n_tokens), 0.0
    if name == "cte":
        return float(gamma), 0.0
    if name == "e":
        return 0.0, gamma * math.sqrt(max(trace, 0.0) / n_tokens)
    raise ValueError(f"unknown closed-form set {name!r}: use one of {', '.join(CLOSED_FORM_SETS)}.")


def closed_form_damping(name: str, h: torch.Tensor, n_tokens: int, gamma: float) -> tuple[float, torch.Tensor | None]:
    """The authors' ``D`` for set ``name`` as ``(ridge, matrix)``: ``D = ridge I + matrix``.

    Args:
        name: ``"baseline"``, ``"trace"``, ``"e"`` or ``"cte"``.
        h: the calibration Gram ``X^T X`` (summed, not averaged), ``(n, n)``.
        n_tokens: ``N``, the number of calibration tokens (rows of ``X``) behind ``h``.
        gamma: the set's radius.

    Example:
        >>> h = torch.eye(4, dtype=torch.float64) * 100.0
        >>> closed_form_damping("trace", h, 16, 0.01)[0]  # 0.01 * 400 / sqrt(16)
        1.0
    """
    ridge, root = closed_form_spectrum(name, float(h.diagonal().mean()), float(h.diagonal().sum()), n_tokens, gamma)
    if name != "e":
        return ridge, None
    return 0.0, root * sqrt_psd(h).to(h.dtype)


class ClosedFormSet(UncertaintySet):
    """One of the authors' sets: a static set whose effective matrix is ``H + D`` (one solve).

    ``gamma=None`` for ``baseline`` means "the engine's ``damping``" (so that
    ``prune_layer(damping=...)`` keeps its meaning); for the other sets it is ``0.01``.
    """

    def __init__(self, name: str, gamma: float | None = None):
        self.name = name
        self.gamma = gamma

    def prepare(self, h: torch.Tensor, inputs: LayerInputs, lam0: float) -> None:
        super().prepare(h, inputs, lam0)
        if self.name == "baseline" and self.gamma is None:
            # the engine's damping (lam0 = damping * mean(diag H)): bit-identical to SparseGPT / ALPS
            self.ridge, self.matrix = lam0, None
        else:
            gamma = DEFAULT_GAMMA if self.gamma is None else self.gamma
            self.ridge, self.matrix = closed_form_damping(self.name, h, inputs.num_tokens, gamma)

    def effective(self) -> torch.Tensor:
        return self.h if self.matrix is None else self.h + self.matrix

    def score_diagonal(self) -> torch.Tensor:
        # Wanda's ||X_j||^2 under the set: the nominal set keeps the published score (no damping)
        if self.name == "baseline":
            return self.h.diagonal()
        return self.effective().diagonal() + self.ridge

    def robust_loss(self, e: torch.Tensor, nominal: float | None = None) -> float:
        """``<H + D, E^T E>``; ``nominal``: ``<H, E^T E>`` when the caller has it already (saves a product)."""
        loss = (quad(self.h, e) if nominal is None else nominal) + self.ridge * float(e.double().pow(2).sum())
        if self.matrix is not None:
            loss += quad(self.matrix, e)
        return loss

    def describe(self) -> str:
        if self.name == "baseline" and self.gamma is None:
            return "baseline"
        return f"{self.name}(gamma={DEFAULT_GAMMA if self.gamma is None else self.gamma:.3g})"
