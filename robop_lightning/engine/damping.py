"""Make an effective Gram solvable: damping until it is numerically positive definite, and scaling.

Pure functions of tensors, shared by every caller that hands a Gram to a solver.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Any, Callable

import torch

__all__ = ["Ridge", "check_engine_options", "positive_definite", "damp_until", "damp_until_definite", "factored",
           "unit_scale"]


def positive_definite(hd: torch.Tensor, float32: bool = True) -> bool:
    """Cholesky succeeds in float64 and (``float32=True``), Jacobi-normalised, in float32 (CAP
    eliminates in float32 and ALPS iterates in float32: a Gram that is only float64-definite breaks them)."""
    if int(torch.linalg.cholesky_ex(hd).info) != 0:
        return False
    if not float32:
        return True
    d = hd.diagonal().clamp_min(torch.finfo(hd.dtype).tiny).rsqrt()
    return int(torch.linalg.cholesky_ex(hd.mul(d[:, None]).mul_(d[None, :]).float()).info) == 0


def damp_until(
    h_eff: torch.Tensor,
    lam: float,
    name: str,
    accept: Callable[[torch.Tensor], Any],
    warn: bool = True,
    columns: int | None = None,
    stacklevel: int = 3,
) -> tuple[Any, float]:
    """``(accept(h_eff + lam I), lam)``, with ``lam`` raised x10 (up to 6 times) while ``accept`` returns
    ``None`` (the matrix is not definite enough for the caller; else what the caller keeps of it, such
    as a solver's factorisation).

    ``warn=False`` leaves the warning to the caller (``prune_layer`` warns once per layer).
    ``columns``: damp only the first ``columns`` diagonal entries, and scale the raise by their
    mean (structured OBS: the last column is a bias's constant input).

    Example:
        >>> h = torch.tensor([[1.0, 1.0], [1.0, 1.0]], dtype=torch.float64)  # singular
        >>> low, lam = damp_until(h, 0.0, "layer", lambda hd: torch.linalg.cholesky_ex(hd)[0]
        ...                       if int(torch.linalg.cholesky_ex(hd).info) == 0 else None, warn=False)
        >>> lam > 0, bool((low.diagonal() > 0).all())
        (True, True)
    """
    base = lam
    for _ in range(7):
        hd = h_eff.clone()
        hd.diagonal()[:columns].add_(lam)  # h_eff + lam I (only the first ``columns`` entries)
        kept = accept(hd)
        if kept is not None:
            if lam != base and warn:
                warnings.warn(
                    f"{name}: the damped Gram was not positive definite; damping raised from "
                    f"{base:.3g} to {lam:.3g} (rank-deficient or badly scaled calibration inputs).",
                    RuntimeWarning,
                    stacklevel=stacklevel,
                )
            return kept, lam
        # x10, starting no lower than 1e-6 of the Gram's scale (an absolute ridge can be far below it)
        scale = float(h_eff.diagonal()[:columns].mean())
        lam = max(lam * 10, 1e-6 * (scale if scale > 0 else 1.0))
    raise ValueError(
        f"{name}: the calibration Gram stays singular even with damping {lam:.3g}; the inputs of this "
        "layer are degenerate. Use more calibration data or a larger `damping`."
    )


def damp_until_definite(
    h_eff: torch.Tensor,
    lam: float,
    name: str,
    warn: bool = True,
    columns: int | None = None,
    float32: bool = True,
) -> tuple[torch.Tensor, float]:
    """``h_eff + lam I``, with ``lam`` raised x10 (up to 6 times) until :func:`positive_definite`
    (``float32=False``: the caller works in float64 only); see :func:`damp_until`.

    Example:
        >>> h = torch.tensor([[1.0, 1.0], [1.0, 1.0]], dtype=torch.float64)  # singular
        >>> hd, lam = damp_until_definite(h, 0.0, "layer", warn=False)
        >>> lam > 0, positive_definite(hd)
        (True, True)
    """
    return damp_until(h_eff, lam, name, lambda hd: hd if positive_definite(hd, float32) else None, warn, columns,
                      stacklevel=4)


def factored(prepare: Callable[[torch.Tensor], Any], unit: Callable[[torch.Tensor], float]):
    """An ``accept`` for :func:`damp_until`: ``(hd / unit(hd), prepare(hd / unit(hd)))``, or ``None``
    where the solver's factorisation ``prepare`` fails (``unit``: the power of 4 the solver's matrix
    is divided by)."""

    def accept(hd: torch.Tensor):
        u = unit(hd)
        scaled = hd / u if u != 1.0 else hd
        factor = prepare(scaled)
        return None if factor is None else (scaled, factor)

    return accept


@dataclass
class Ridge:
    """The set's own ridge (``start``), the one the solves add (``base``) and the largest one any
    solve needed so far (``raised``)."""

    start: float
    base: float
    raised: float

    def damp(self, h_eff: torch.Tensor, name: str, unit: float = 1.0,
             prepare: Callable[[torch.Tensor], Any] | None = None,
             memo: Callable[[Callable], Any] | None = None) -> tuple[torch.Tensor, Any]:
        """``((h_eff + lam I) / unit, factor)`` with ``lam >= base`` raised until positive definite.

        ``unit``: a power of 4 (exact). ``prepare(hd)``: the solver's factorisation of the damped,
        scaled matrix, ``None`` where it is not positive definite: it is then the definiteness test
        (else :func:`positive_definite`) and its result the ``factor`` returned (else ``None``).
        ``memo(make)`` keeps ``make()`` for the layers with the same ``h_eff``.
        """

        def make() -> tuple[torch.Tensor, float, Any]:
            if prepare is None:
                hd, lam = damp_until_definite(h_eff, self.base, name, warn=False)
                return hd / unit, lam, None
            (scaled, factor), lam = damp_until(h_eff, self.base, name, factored(prepare, lambda hd: unit), warn=False)
            return scaled, lam, factor

        hd, lam, factor = make() if memo is None else memo(make)
        self.raised = max(self.raised, lam)
        return hd, factor


def unit_scale(mean_diag: float) -> float:
    """A power of 4 near ``mean_diag`` when it lies outside ``[4**-30, 4**30]`` (else 1)."""
    if not mean_diag > 0 or 4.0**-30 <= mean_diag <= 4.0**30:
        return 1.0
    return 4.0 ** round(math.log(mean_diag, 4))


def check_engine_options(rounds: Any, damping: Any, prefix: str = "") -> None:
    """``rounds`` (of the min-max alternation) and ``damping`` (Baseline's, relative to ``mean(diag H)``).

    Raises:
        ValueError: ``rounds`` not an integer >= 0, or ``damping`` not a number >= 0.
    """
    if isinstance(rounds, bool) or not isinstance(rounds, int) or rounds < 0:
        raise ValueError(f"{prefix}rounds must be a non-negative integer, got {rounds!r}.")
    if isinstance(damping, bool) or not isinstance(damping, (int, float)) or not damping >= 0:
        raise ValueError(f"{prefix}damping must be a number >= 0 (relative to mean(diag H)), got {damping!r}.")
