"""robop_lightning.engine.solvers.structured_obs: group selection against brute force, compensation, uncertainty sets."""

from __future__ import annotations

import itertools

import pytest
import torch

from robop_lightning.engine.solvers.structured_obs import compensate, select_groups
from tests.engine_helpers import _correlated

pytestmark = pytest.mark.usefixtures("one_thread")


def _subset_loss(w, h, cols):
    """Exact loss of removing ``cols`` with the best update of the rest: tr(W_S [(H^-1)_SS]^-1 W_S^T)."""
    hinv = torch.linalg.inv(h)
    ws = w[:, cols]
    return float(torch.trace(ws @ torch.linalg.inv(hinv[cols][:, cols]) @ ws.T))


def test_greedy_is_optimal_for_uncorrelated_inputs():
    # orthogonal input columns: saliencies do not interact, so greedy OBS is the brute-force optimum
    g = torch.Generator().manual_seed(0)
    q, _ = torch.linalg.qr(torch.randn(200, 10, dtype=torch.float64, generator=g))
    x = q * torch.linspace(0.5, 3.0, 10, dtype=torch.float64)
    w = torch.randn(5, 10, dtype=torch.float64, generator=g)
    h = x.T @ x
    r = select_groups(w, x, [[j] for j in range(10)], 4, damping=0.0)
    best = min(itertools.combinations(range(10), 4), key=lambda s: _subset_loss(w, h, list(s)))
    assert sorted(r.removed) == sorted(best)


@pytest.mark.parametrize("seed", range(4))
def test_heads_match_brute_force_and_loss_is_exact(seed):
    x, g = _correlated(300, 12, seed)
    w = torch.randn(6, 12, dtype=torch.float64, generator=g)
    h = x.T @ x
    total = float(torch.trace(w @ h @ w.T))
    heads = [[2 * i, 2 * i + 1] for i in range(6)]  # six "heads" of two columns

    def loss_of(removed):
        return _subset_loss(w, h, [c for i in removed for c in heads[i]])

    optimum = min(loss_of(s) for s in itertools.combinations(range(6), 3))
    greedy = select_groups(w, x, heads, 3, damping=0.0, swap_limit=0)
    assert greedy.nominal_error == pytest.approx(loss_of(greedy.removed) / total, rel=1e-8)  # exact, not estimated
    assert greedy.trajectory[-1] == pytest.approx(loss_of(greedy.removed) / total, rel=1e-8)
    assert optimum - 1e-9 <= loss_of(greedy.removed) <= 1.8 * optimum  # greedy structured OBS: near
    refined = select_groups(w, x, heads, 3, damping=0.0)  # + exact 1-swap local search (few groups)
    assert loss_of(refined.removed) == pytest.approx(optimum, rel=1e-9)
    assert refined.nominal_error == pytest.approx(optimum / total, rel=1e-8)


@pytest.mark.parametrize("with_bias", [False, True])
def test_compensation_equals_lstsq_on_kept_columns(with_bias):
    x, g = _correlated(400, 9, 7)
    x = x + 0.7  # a non-zero input mean: the bias correction has something to do
    w = torch.randn(4, 9, dtype=torch.float64, generator=g)
    b = torch.randn(4, dtype=torch.float64, generator=g) if with_bias else None
    r = select_groups(w, x.view(40, 10, 9), [[j] for j in range(9)], 4, damping=0.0, bias=b)
    keep = r.kept_columns
    xa = torch.cat([x, torch.ones(400, 1, dtype=x.dtype)], 1) if with_bias else x
    wa = torch.cat([w, b[:, None]], 1) if with_bias else w
    cols = torch.cat([keep, torch.tensor([9])]) if with_bias else keep
    ref = torch.linalg.lstsq(xa[:, cols], xa @ wa.T).solution.T
    torch.testing.assert_close(r.weight, ref[:, : keep.numel()], rtol=1e-7, atol=1e-9)
    if with_bias:
        torch.testing.assert_close(r.bias, ref[:, -1], rtol=1e-7, atol=1e-9)
        no_bias = select_groups(w, x.view(40, 10, 9), [[j] for j in range(9)], 4, damping=0.0)
        assert r.nominal_error < no_bias.nominal_error or not torch.equal(r.kept_columns, no_bias.kept_columns)
    # and the public helper agrees
    new, _ = compensate(w, x.T @ x, keep)
    torch.testing.assert_close(new, torch.linalg.lstsq(x[:, keep], x @ w.T).solution.T, rtol=1e-7, atol=1e-9)


def test_uncertainty_sets_and_cvar_alpha_one_is_baseline():
    x, g = _correlated(240, 16, 3)
    w = torch.randn(8, 16, dtype=torch.float64, generator=g)
    inputs = x.view(24, 10, 16)
    groups = [[j] for j in range(16)]
    base = select_groups(w, inputs, groups, 6)
    same = select_groups(w, inputs, groups, 6, uncertainty="cvar", radius=1.0)
    assert sorted(base.removed) == sorted(same.removed)
    torch.testing.assert_close(base.weight, same.weight)
    for name in ("minmax-trace", "minmax-e", "cvar"):
        r = select_groups(w, inputs, groups, 6, uncertainty=name)
        assert r.robust_error >= r.nominal_error > 0
        assert len(r.history) == 4  # nominal solve + 3 alternating rounds
        assert r.weight.shape == (8, 10)
    for name in ("trace", "e", "cte"):  # the authors' sets: one solve on H + D, no alternation
        r = select_groups(w, inputs, groups, 6, uncertainty=name, radius=0.05)
        assert r.robust_error > r.nominal_error > 0
        assert r.history == [] and r.weight.shape == (8, 10)
