"""The robust loop every caller shares: the alternation for dynamic sets, and its error measures.

A *dynamic* set (this project's min-max extension: minmax-trace, minmax-e, cvar) has no closed
form; its worst-case Gram depends on the error of the current solution. :func:`alternate` runs
the alternating scheme around any solver (a masked one, structured OBS, or a fake in the tests)::

    H_0 = H;  S_0 = SOLVE(H_0)
    for k in 0 .. rounds-1:
        H'_k  = argmax_{H' in U} <H', E_k^T E_k>          # the set's closed-form worst case
        H_k+1 = (1 - g_k) H_k + g_k H'_k,  g_k = 2/(k+2)    # Frank-Wolfe, stays in U
        S_k+1 = SOLVE(H_k+1, warm start S_k)
    keep the S_k of smallest robust loss

The authors' four sets are static (one solve on ``H + D``) and never enter the loop. The
remaining pieces, shared by ``prune_layer`` and structured OBS: :func:`quad` (``tr(E H E^T)`` in
float64; the sets' own, from :mod:`robop_lightning.engine.sets.base`), :func:`relative_error`
(held-out and calibration errors) and :func:`clamp_robust` (a robust loss is never reported below
the nominal one it bounds).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

import torch

from robop_lightning.engine.sets import UncertaintySet
from robop_lightning.engine.sets.base import quad

__all__ = ["Round", "alternate", "blown_up", "clamp_robust", "frank_wolfe_step", "quad", "relative_error"]

S = TypeVar("S")


def frank_wolfe_step(k: int) -> float:
    """``g_k = 2 / (k + 2)``: the step of round ``k`` towards the worst case."""
    return 2 / (k + 2)


def relative_error(h: torch.Tensor, weight: torch.Tensor, error: torch.Tensor) -> float:
    """``tr(E H E^T) / tr(W H W^T)`` (0 when the denominator is 0).

    Example:
        >>> w = torch.eye(2)
        >>> relative_error(torch.eye(2), w, 0.5 * w)
        0.25
    """
    den = quad(h, weight)
    return quad(h, error) / den if den > 0 else 0.0


def clamp_robust(nominal: float, robust: float) -> float:
    """The robust loss to report: ``nominal`` when ``robust`` is below it only by rounding.

    The two are computed along different paths; they are equal up to rounding (relative, and
    absolute for a near-zero error in a rank-deficient Gram, where both lose digits to cancellation).
    """
    if nominal - 1e-6 * nominal - 1e-10 <= robust < nominal:
        return nominal
    return robust


def blown_up(h: torch.Tensor, weight: torch.Tensor, w_hat: torch.Tensor, mask: torch.Tensor, factor: float = 10.0,
             rows: int = 64) -> bool:
    """Whether a compensating solver's result is numerically broken: non-finite, or its error under
    ``h`` more than ``factor`` times that of the same mask with no compensation (``W * mask``).

    A singular ``H + D`` can pass Cholesky on rounding noise (the authors' E on LayerNorm outputs:
    ``D`` vanishes on ``H``'s null space too); the OBS updates then explode by orders of magnitude,
    in every row with a component on the null direction. The errors are compared on ``rows``
    evenly spaced rows, so the check costs a small fraction of a solve.

    Example:
        >>> h, w = torch.eye(2, dtype=torch.float64), torch.ones(1, 2)
        >>> keep = torch.tensor([[True, False]])
        >>> blown_up(h, w, w * keep, keep), blown_up(h, w, torch.tensor([[1e6, 0.0]]), keep)
        (False, True)
    """
    if not bool(torch.isfinite(w_hat).all()):
        return True
    if weight.shape[0] > rows:
        pick = torch.linspace(0, weight.shape[0] - 1, rows, device=weight.device).round().long()
        weight, w_hat, mask = weight[pick], w_hat[pick], mask[pick]
    masked = quad(h, weight * ~mask)
    return quad(h, weight - w_hat) > factor * masked + 1e-12 * quad(h, weight)


@dataclass
class Round(Generic[S]):
    """One solve of the alternation: its solution, error ``W - W_hat``, Gram and robust loss."""

    solution: S
    error: torch.Tensor
    h: torch.Tensor
    robust_loss: float


def alternate(
    solve: Callable[[torch.Tensor, S | None], tuple[S, torch.Tensor]],
    h: torch.Tensor,
    uset: UncertaintySet,
    rounds: int,
    nominal: Callable[[torch.Tensor], float],
    describe: Callable[[S, S], dict[str, Any]] | None = None,
) -> tuple[Round[S], list[dict[str, Any]]]:
    """The alternation for a dynamic set: the round of smallest robust loss, and the history.

    Args:
        solve: ``solve(H_k, previous solution or None) -> (solution, error W - W_hat)``.
        h: the Gram the first round solves with (``H_0``).
        uset: a prepared dynamic set (``worst_case``, ``robust_loss``).
        rounds: Frank-Wolfe rounds after the first solve.
        nominal: the nominal loss of an error (for the history).
        describe: extra history fields from ``(previous, current)`` solutions (e.g. mask change);
            round 0 gets the same keys with value 0.

    Returns:
        ``(best round, history)``; ties keep the earlier round.

    Example:
        >>> from robop_lightning.engine.sets import make_uncertainty
        >>> from robop_lightning.engine.gram import LayerInputs
        >>> x = torch.randn(32, 4, dtype=torch.float64); w = torch.randn(3, 4)
        >>> u = make_uncertainty("minmax-trace", 0.1); u.prepare(x.T @ x, LayerInputs(x), 0.0)
        >>> best, history = alternate(lambda hk, prev: (w * 0.5, w * 0.5), x.T @ x, u, 2, lambda e: 0.0)
        >>> len(history), best.solution.shape
        (3, torch.Size([3, 4]))
    """
    solution, error = solve(h, None)
    best = Round(solution, error, h, uset.robust_loss(error))
    history = [{"round": 0, "robust_loss": best.robust_loss, "nominal_loss": nominal(error)}]
    if describe is not None:
        history[0].update({k: 0.0 for k in describe(solution, solution)})
    h_k = h
    for k in range(rounds):
        g = frank_wolfe_step(k)
        h_k = (1 - g) * h_k + g * uset.worst_case(error)
        previous = solution
        solution, error = solve(h_k, previous)
        phi = uset.robust_loss(error)
        entry = {"round": k + 1, "robust_loss": phi, "nominal_loss": nominal(error)}
        if describe is not None:
            entry.update(describe(previous, solution))
        history.append(entry)
        if phi < best.robust_loss:
            best = Round(solution, error, h_k, phi)
    return best, history
