"""Paired bootstrap intervals against a direct, loop-based computation."""

from __future__ import annotations

import math

import pytest
import torch

from robop_lightning.robustness.stats import (
    accuracy_difference_ci,
    crossed_difference_ci,
    crossed_ratio_ci,
    format_ci,
    paired_bootstrap,
    perplexity_ratio_ci,
)


def _loop_interval(nll_a, nll_b, tokens, resamples, seed, level=0.95):
    """The same resamples drawn by index, each ratio computed by plain Python sums."""
    n = len(tokens)
    gen = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, n, (resamples, n), generator=gen).tolist()
    values = []
    for row in idx:
        num = sum(nll_a[i] - nll_b[i] for i in row)
        den = sum(tokens[i] for i in row)
        values.append(math.exp(num / den))
    v = torch.tensor(values, dtype=torch.float64)
    tail = (1 - level) / 2
    return torch.quantile(v, torch.tensor([tail, 1 - tail], dtype=torch.float64)).tolist()


def test_perplexity_ratio_matches_a_direct_computation():
    g = torch.Generator().manual_seed(0)
    tokens = [128] * 20
    nll_b = (torch.rand(20, generator=g) * 100 + 500).tolist()
    nll_a = [b + float(torch.randn(1, generator=g)) * 5 - 3 for b in nll_b]
    est, low, high = perplexity_ratio_ci(nll_a, nll_b, tokens, resamples=300, seed=3)
    assert est == pytest.approx(math.exp((sum(nll_a) - sum(nll_b)) / sum(tokens)), rel=1e-12)
    ref_low, ref_high = _loop_interval(nll_a, nll_b, tokens, 300, 3)
    assert low == pytest.approx(ref_low, rel=1e-10) and high == pytest.approx(ref_high, rel=1e-10)
    assert low <= est <= high


def test_identical_models_and_a_uniformly_worse_one():
    tokens = [10, 12, 8, 10]
    nll = [20.0, 30.0, 11.0, 25.0]
    assert perplexity_ratio_ci(nll, nll, tokens) == (1.0, 1.0, 1.0)
    worse = [v + 0.1 * t for v, t in zip(nll, tokens)]  # +0.1 nats on every token
    est, low, high = perplexity_ratio_ci(worse, nll, tokens)
    assert est == pytest.approx(math.exp(0.1)) and low == pytest.approx(math.exp(0.1))
    assert high == pytest.approx(math.exp(0.1))


def test_accuracy_difference():
    a = [1, 1, 0, 1, 1, 0, 1, 1]
    b = [1, 0, 0, 1, 0, 0, 1, 1]
    est, low, high = accuracy_difference_ci(a, b, resamples=500)
    assert est == pytest.approx(2 / 8) and low >= 0 and high <= 5 / 8
    assert accuracy_difference_ci([1] * 5, [0] * 5) == (1.0, 1.0, 1.0)


def test_deterministic_and_checked():
    stat = lambda c: c[:, 0] / c.sum(1)  # noqa: E731
    assert paired_bootstrap(stat, 7, seed=1) == paired_bootstrap(stat, 7, seed=1)
    with pytest.raises(ValueError, match="same length"):
        perplexity_ratio_ci([1.0, 2.0], [1.0], [1, 1])
    with pytest.raises(ValueError, match="level"):
        paired_bootstrap(stat, 3, level=1.5)
    assert format_ci(0.9612, 0.94, 0.981) == "0.961 [0.940, 0.981]"


def _loop_crossed(nll_a, nll_b, tokens, resamples, seed, level=0.95):
    """The two-way resamples drawn by index (windows first, then draws), ratios by plain sums."""
    draws, n = len(nll_a), len(tokens)
    gen = torch.Generator().manual_seed(seed)
    windows = torch.randint(0, n, (resamples, n), generator=gen).tolist()
    picked = torch.randint(0, draws, (resamples, draws), generator=gen).tolist()
    values = []
    for rows, cols in zip(picked, windows):
        num = sum(nll_a[d][w] - nll_b[d][w] for d in rows for w in cols)
        den = sum(tokens[w] for _ in rows for w in cols)
        values.append(math.exp(num / den))
    v = torch.tensor(values, dtype=torch.float64)
    tail = (1 - level) / 2
    return torch.quantile(v, torch.tensor([tail, 1 - tail], dtype=torch.float64)).tolist()


def _draws(g, shifts, windows=16):
    tokens = [64] * windows
    base = (torch.rand(windows, generator=g) * 100 + 300).tolist()
    nll_b = [[b + float(torch.randn(1, generator=g)) for b in base] for _ in shifts]
    nll_a = [[b + s * 64 + float(torch.randn(1, generator=g)) * 3 for b in row] for row, s in zip(nll_b, shifts)]
    return nll_a, nll_b, tokens


def test_crossed_ratio_matches_a_direct_computation_and_reduces_to_the_paired_one():
    g = torch.Generator().manual_seed(1)
    nll_a, nll_b, tokens = _draws(g, [-0.02, 0.01, -0.05])
    est, low, high = crossed_ratio_ci(nll_a, nll_b, tokens, resamples=200, seed=4)
    pooled = sum(a - b for ra, rb in zip(nll_a, nll_b) for a, b in zip(ra, rb)) / (3 * sum(tokens))
    assert est == pytest.approx(math.exp(pooled), rel=1e-12)
    ref_low, ref_high = _loop_crossed(nll_a, nll_b, tokens, 200, 4)
    assert low == pytest.approx(ref_low, rel=1e-10) and high == pytest.approx(ref_high, rel=1e-10)
    one = crossed_ratio_ci(nll_a[:1], nll_b[:1], tokens, resamples=200, seed=4)
    assert one == pytest.approx(perplexity_ratio_ci(nll_a[0], nll_b[0], tokens, resamples=200, seed=4), rel=1e-12)


def test_crossed_interval_widens_with_the_spread_between_draws():
    """Same windows and per-window noise; draws that disagree (one helps, one hurts) must give a
    wider interval than draws that agree, while pooling the windows alone cannot see the difference."""
    agree = _draws(torch.Generator().manual_seed(2), [-0.01, -0.01, -0.01, -0.01])
    disagree = _draws(torch.Generator().manual_seed(2), [-0.10, 0.08, -0.09, 0.07])
    width = lambda ci: ci[2] - ci[1]  # noqa: E731
    w_agree, w_disagree = width(crossed_ratio_ci(*agree)), width(crossed_ratio_ci(*disagree))
    assert w_disagree > 2 * w_agree, (w_agree, w_disagree)
    flat = lambda d: ([x for row in d[0] for x in row], [x for row in d[1] for x in row], d[2] * 4)  # noqa: E731
    assert width(perplexity_ratio_ci(*flat(disagree))) < 0.5 * w_disagree


def test_crossed_difference_and_shapes():
    assert crossed_difference_ci([[1, 1, 0]] * 2, [[1, 0, 0]] * 2, resamples=300)[0] == pytest.approx(1 / 3)
    assert crossed_difference_ci([[1, 0], [1, 0]], [[1, 0], [1, 0]]) == (0.0, 0.0, 0.0)
    with pytest.raises(ValueError, match="draws, units"):
        crossed_ratio_ci([1.0, 2.0], [1.0, 2.0], [1, 1])
    with pytest.raises(ValueError, match="draws, units"):
        crossed_ratio_ci([[1.0, 2.0]], [[1.0, 2.0]], [1, 1, 1])
