"""Paired confidence intervals for comparing two pruned models on the same evaluation units.

Two models evaluated on the same windows (or images) are compared *paired*: the bootstrap
resamples the units, and both models' statistics are recomputed on the same resample, so the
interval reflects the difference between the models, not the spread of the data. Percentile
bootstrap, a fixed seed (the interval is reproducible).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch

__all__ = ["paired_bootstrap", "perplexity_ratio_ci", "accuracy_difference_ci", "crossed_bootstrap",
           "crossed_ratio_ci", "crossed_difference_ci"]


def paired_bootstrap(
    statistic: Callable[[torch.Tensor], torch.Tensor],
    units: int,
    resamples: int = 2000,
    level: float = 0.95,
    seed: int = 0,
) -> tuple[float, float, float]:
    """``(estimate, low, high)`` of ``statistic`` by the percentile bootstrap over ``units``.

    Args:
        statistic: maps a ``(R, units)`` tensor of resample counts (how often each unit is drawn)
            to ``R`` values; called once with the all-ones row for the estimate.
        units: number of evaluation units (windows, images).
    """
    if units < 1:
        raise ValueError("paired_bootstrap needs at least one unit.")
    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1), got {level}.")
    estimate = float(statistic(torch.ones(1, units, dtype=torch.float64))[0])
    gen = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, units, (resamples, units), generator=gen)
    counts = torch.zeros(resamples, units, dtype=torch.float64).scatter_add_(
        1, idx, torch.ones(resamples, units, dtype=torch.float64)
    )
    values = statistic(counts)
    tail = (1 - level) / 2
    low, high = torch.quantile(values, torch.tensor([tail, 1 - tail], dtype=torch.float64)).tolist()
    return estimate, low, high


def perplexity_ratio_ci(
    nll_a: Sequence[float], nll_b: Sequence[float], tokens: Sequence[float], **kwargs
) -> tuple[float, float, float]:
    """Perplexity of model A over that of model B on the same windows, with a paired interval.

    Args:
        nll_a, nll_b: summed token negative log-likelihood of each window, per model.
        tokens: scored tokens of each window.

    ``ppl = exp(sum nll / sum tokens)``; the ratio is ``exp((sum nll_a - sum nll_b) / sum tokens)``.

    Example:
        >>> perplexity_ratio_ci([2.0, 2.0], [2.0, 2.0], [1, 1])[0]
        1.0
    """
    a, b, t = (torch.as_tensor(v, dtype=torch.float64) for v in (nll_a, nll_b, tokens))
    if not a.shape == b.shape == t.shape or a.dim() != 1:
        raise ValueError("nll_a, nll_b and tokens must be 1-D sequences of the same length (one per window).")
    diff = a - b
    return paired_bootstrap(lambda c: torch.exp((c @ diff) / (c @ t)), a.numel(), **kwargs)


def accuracy_difference_ci(
    correct_a: Sequence[float], correct_b: Sequence[float], **kwargs
) -> tuple[float, float, float]:
    """Accuracy of model A minus that of model B on the same inputs (0/1 per input), paired interval."""
    a, b = (torch.as_tensor(v, dtype=torch.float64) for v in (correct_a, correct_b))
    if a.shape != b.shape or a.dim() != 1:
        raise ValueError("correct_a and correct_b must be 1-D sequences of the same length (one per input).")
    diff = a - b
    return paired_bootstrap(lambda c: (c @ diff) / c.sum(1), a.numel(), **kwargs)


def crossed_bootstrap(
    statistic: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    draws: int,
    units: int,
    resamples: int = 2000,
    level: float = 0.95,
    seed: int = 0,
) -> tuple[float, float, float]:
    """``(estimate, low, high)`` of ``statistic`` by a two-way percentile bootstrap over calibration
    draws and evaluation units.

    Every draw (a separately calibrated and pruned pair of models) is scored on the same units, so
    draws and units are *crossed*, not nested: each resample draws ``draws`` draws with replacement
    and ``units`` units with replacement, and uses the same units for every draw. The interval then
    covers both the spread of the calibration draw and that of the evaluation sample. With one draw
    it is :func:`paired_bootstrap` (the same resamples for the same seed).

    Args:
        statistic: maps resample counts ``(R, draws)`` and ``(R, units)`` to ``R`` values; called
            once with all-ones rows for the estimate.
        draws: number of calibration draws.
        units: number of evaluation units (windows, images).
    """
    if draws < 1 or units < 1:
        raise ValueError("crossed_bootstrap needs at least one draw and one unit.")
    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1), got {level}.")
    ones = lambda n: torch.ones(1, n, dtype=torch.float64)  # noqa: E731
    estimate = float(statistic(ones(draws), ones(units))[0])
    gen = torch.Generator().manual_seed(seed)

    def counts(n: int) -> torch.Tensor:
        idx = torch.randint(0, n, (resamples, n), generator=gen)
        hits = torch.ones(resamples, n, dtype=torch.float64)
        return torch.zeros(resamples, n, dtype=torch.float64).scatter_add_(1, idx, hits)

    unit_counts = counts(units)  # first, so that one draw reproduces paired_bootstrap
    values = statistic(counts(draws), unit_counts)
    tail = (1 - level) / 2
    low, high = torch.quantile(values, torch.tensor([tail, 1 - tail], dtype=torch.float64)).tolist()
    return estimate, low, high


def _per_draw(name: str, *arrays: Sequence) -> list[torch.Tensor]:
    out = [torch.as_tensor(v, dtype=torch.float64) for v in arrays]
    shape = out[0].shape
    out = [v.expand(shape) if v.dim() == 1 and len(shape) == 2 and v.shape[0] == shape[1] else v for v in out]
    if len(shape) != 2 or any(v.shape != shape for v in out):
        raise ValueError(f"{name}: pass one row per calibration draw and one column per evaluation unit, "
                         "the same units in every row (shapes (draws, units)).")
    return out


def crossed_ratio_ci(
    nll_a: Sequence, nll_b: Sequence, tokens: Sequence, **kwargs
) -> tuple[float, float, float]:
    """Perplexity of model A over model B pooled over calibration draws, with a two-way interval.

    Args:
        nll_a, nll_b: ``(draws, windows)``: summed token NLL of each window, for the models pruned
            from each calibration draw (row ``d`` of both comes from the same draw).
        tokens: scored tokens of each window, ``(windows,)`` or ``(draws, windows)``.

    The pooled ratio is ``exp(sum (nll_a - nll_b) / sum tokens)`` over every draw and window; the
    interval is :func:`crossed_bootstrap`'s.

    Example:
        >>> round(crossed_ratio_ci([[3.0, 3.0], [1.0, 1.0]], [[2.0, 2.0], [2.0, 2.0]], [1, 1])[0], 6)
        1.0
    """
    a, b, t = _per_draw("crossed_ratio_ci", nll_a, nll_b, tokens)
    diff = a - b
    return crossed_bootstrap(
        lambda cd, cw: torch.exp(torch.einsum("rd,dw,rw->r", cd, diff, cw) / torch.einsum("rd,dw,rw->r", cd, t, cw)),
        *a.shape, **kwargs)


def crossed_difference_ci(correct_a: Sequence, correct_b: Sequence, **kwargs) -> tuple[float, float, float]:
    """Accuracy of A minus that of B pooled over calibration draws (``(draws, inputs)`` of 0/1, or
    fractions), with :func:`crossed_bootstrap`'s interval.

    Example:
        >>> crossed_difference_ci([[1, 1], [0, 1]], [[1, 0], [1, 0]])[0]
        0.25
    """
    a, b = _per_draw("crossed_difference_ci", correct_a, correct_b)
    diff = a - b
    return crossed_bootstrap(
        lambda cd, cw: torch.einsum("rd,dw,rw->r", cd, diff, cw) / (cd.sum(1) * cw.sum(1)), *a.shape, **kwargs)


def format_ci(estimate: float, low: float, high: float, fmt: str = "{:.3f}") -> str:
    """``"0.962 [0.941, 0.985]"``."""
    if any(math.isnan(v) for v in (estimate, low, high)):
        return "n/a"
    return f"{fmt.format(estimate)} [{fmt.format(low)}, {fmt.format(high)}]"
