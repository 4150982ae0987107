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

__all__ = ["paired_bootstrap", "perplexity_ratio_ci", "accuracy_difference_ci"]


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


def format_ci(estimate: float, low: float, high: float, fmt: str = "{:.3f}") -> str:
    """``"0.962 [0.941, 0.985]"``."""
    if any(math.isnan(v) for v in (estimate, low, high)):
        return "n/a"
    return f"{fmt.format(estimate)} [{fmt.format(low)}, {fmt.format(high)}]"
