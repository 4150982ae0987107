"""What every uncertainty set provides to the engine (pure tensors, no pipeline imports)."""

from __future__ import annotations

import torch

from robop_lightning.engine.gram import LayerInputs

__all__ = ["UncertaintySet", "quad"]


def quad(h: torch.Tensor, e: torch.Tensor) -> float:
    """``tr(E H E^T) = <H, E^T E>`` in float64 (the error can be tiny next to ``W``: no float32 cancellation).

    The nominal loss of an error ``E`` under the Gram ``H``: every set's robust loss adds to it, and
    the engine measures its errors with it.
    """
    e64 = e.double()
    return float(((e64 @ h.to(device=e.device, dtype=torch.float64)) * e64).sum())


class UncertaintySet:
    """A set ``U`` of Grams around the calibration Gram ``H``, described by its closed-form inner max.

    The engine asks a prepared set for:

    * ``ridge``: the scalar damping the solver adds to the effective matrix (``H + ridge I``),
      raised automatically only if the result is not numerically positive definite;
    * ``effective()``: the matrix a *static* set hands to the solver, before ``ridge``;
    * ``score_diagonal()``: the diagonal Wanda scores with (``||X_j||^2`` for the nominal set);
    * ``robust_loss(E)``: the support function ``max_{H' in U} <H', E^T E>`` (absolute);
    * ``worst_case(E)``: the maximiser ``H'``, for *dynamic* sets (the min-max extension only).
    """

    name = "set"
    dynamic = False
    coupled = False

    def prepare(self, h: torch.Tensor, inputs: LayerInputs, lam0: float) -> None:
        """Bind the layer's statistics: ``H`` (float64), its inputs, the engine's base damping."""
        self.h = h
        self.inputs = inputs
        self.lam0 = lam0
        self.ridge = lam0

    def effective(self) -> torch.Tensor:
        return self.h

    def score_diagonal(self) -> torch.Tensor:
        return self.effective().diagonal()

    def worst_case(self, e: torch.Tensor) -> torch.Tensor:  # pragma: no cover - dynamic sets only
        raise NotImplementedError

    def robust_loss(self, e: torch.Tensor) -> float:
        raise NotImplementedError

    def describe(self) -> str:
        return self.name
