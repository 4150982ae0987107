"""The extension's min-max sets: each closed-form worst case equals a numerical maximisation over its set.

The authors' closed-form sets are tested in ``test_uncertainty_closed_form.py``."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.optimize import linprog

from robop_lightning.engine.gram import LayerInputs
from robop_lightning.engine.sets import CVaR as CTE
from robop_lightning.engine.sets import MinMaxEllipsoid as Ellipsoid
from robop_lightning.engine.sets import MinMaxTrace as Trace
from robop_lightning.engine.sets import cvar_weights, make_uncertainty
from tests.engine_helpers import correlated_inputs, quad


def _setup(seed=0, m=6, n=10, samples=12, tokens=3):
    x = correlated_inputs(samples, tokens, n, seed)
    li = LayerInputs(x)
    h = li.gram()
    g = torch.Generator().manual_seed(seed + 7)
    e = torch.randn(m, n, generator=g, dtype=torch.float64)
    return li, h, e


def _inner(hp, e):
    return float(torch.sum(hp * (e.T @ e)))


@pytest.mark.parametrize("seed", range(3))
def test_trace_coupled_worst_case_is_the_maximum(seed):
    li, h, e = _setup(seed)
    s = Trace(rho=0.05, coupled=True)
    s.prepare(h, li, 0.0)
    closed = s.robust_loss(e)
    hp = s.worst_case(e)
    # the maximiser lies in the set (PSD perturbation of trace r) and attains the closed form
    d = hp - h
    assert torch.linalg.eigvalsh(d).min() > -1e-9 * s.r
    assert float(d.trace()) == pytest.approx(s.r, rel=1e-9)
    assert _inner(hp, e) == pytest.approx(closed, rel=1e-6)
    # numerical maximisation: gradient ascent over D = r L L^T / tr(L L^T), many random starts
    g = torch.Generator().manual_seed(seed)
    best = -np.inf
    gram = e.T @ e
    for _ in range(8):
        lmat = torch.randn(h.shape[0], 3, generator=g, dtype=torch.float64, requires_grad=True)
        opt = torch.optim.Adam([lmat], lr=0.05)
        for _ in range(300):
            dd = lmat @ lmat.T
            val = s.r * torch.sum(dd * gram) / dd.trace()
            opt.zero_grad()
            (-val).backward()
            opt.step()
        best = max(best, float(val.detach()) + quad(h, e))
    assert best <= closed * (1 + 1e-6)
    assert best == pytest.approx(closed, rel=1e-4)
    # and the top singular value from SVD
    assert closed - quad(h, e) == pytest.approx(s.r * float(torch.linalg.matrix_norm(e, ord=2)) ** 2, rel=1e-6)


@pytest.mark.parametrize("seed", range(3))
def test_ellipsoid_coupled_worst_case_beats_random_search(seed):
    li, h, e = _setup(seed)
    s = Ellipsoid(rho=0.2, coupled=True)
    s.prepare(h, li, 0.0)
    closed = s.robust_loss(e)
    hp = s.worst_case(e)
    assert _inner(hp, e) == pytest.approx(closed, rel=1e-6)
    # the maximiser is in the set: S^-1 (H' - H) S^-1 is symmetric with Frobenius norm r
    sd = h.diagonal().sqrt()
    delta = (hp - h) / torch.outer(sd, sd)
    assert torch.allclose(delta, delta.T)
    assert float(torch.linalg.matrix_norm(delta)) == pytest.approx(s.r, rel=1e-9)
    assert torch.linalg.eigvalsh(hp).min() > 0  # PSD automatically
    # random search over the sphere of symmetric Delta: never above, and close with local refinement
    g = torch.Generator().manual_seed(seed)
    n = h.shape[0]
    best = -np.inf
    for _ in range(2000):
        a = torch.randn(n, n, generator=g, dtype=torch.float64)
        a = a + a.T
        a = s.r * a / torch.linalg.matrix_norm(a)
        val = quad(h, e) + float(torch.sum(a * ((e * sd) .T @ (e * sd))))
        best = max(best, val)
    assert best <= closed * (1 + 1e-6)
    # perturbing the maximiser inside the set lowers the value
    for _ in range(50):
        a = delta + 0.1 * s.r * torch.randn(n, n, generator=g, dtype=torch.float64)
        a = (a + a.T) / 2
        a = s.r * a / torch.linalg.matrix_norm(a)
        val = quad(h, e) + float(torch.sum(a * ((e * sd).T @ (e * sd))))
        assert val <= closed * (1 + 1e-6)


@pytest.mark.parametrize("alpha", [0.1, 0.25, 0.5, 0.77, 1.0])
def test_cte_closed_form_matches_linear_program(alpha):
    li, h, e = _setup(1, samples=13)
    s = CTE(alpha)
    s.prepare(h, li, 0.0)
    losses = li.sample_losses(e).numpy()
    n = losses.size
    res = linprog(-losses, A_eq=np.ones((1, n)), b_eq=[1.0], bounds=[(0, 1.0 / (alpha * n))] * n, method="highs")
    assert res.status == 0
    lp_value = -res.fun * n
    assert s.robust_loss(e) == pytest.approx(lp_value, rel=1e-7)
    q = cvar_weights(torch.as_tensor(losses), alpha)
    assert float(q.sum()) == pytest.approx(1.0)
    assert float(q.max()) <= 1.0 / (alpha * n) + 1e-12 and float(q.min()) >= 0
    if alpha < 1:
        # the worst-case Gram is the q-weighted Gram: <H(q), G> equals the CVaR value
        assert _inner(s.worst_case(e), e) == pytest.approx(lp_value, rel=1e-6)


def test_cte_alpha_one_is_nominal_and_samples_not_tokens():
    li, h, e = _setup(2, samples=9, tokens=5)
    s = CTE(1.0)
    s.prepare(h, li, 0.0)
    assert not s.dynamic
    assert s.robust_loss(e) == pytest.approx(quad(h, e), rel=1e-6)
    # per-sample losses sum over the sample's tokens
    x = li.x.double()
    manual = torch.stack([(x[i] @ e.T).pow(2).sum() for i in range(9)])
    assert torch.allclose(li.sample_losses(e), manual, rtol=1e-5)


@pytest.mark.parametrize("cls", [Trace, Ellipsoid])
def test_per_row_forms_are_the_sum_of_row_wise_maxima(cls):
    li, h, e = _setup(3)
    s = cls(rho=0.03, coupled=False)
    s.prepare(h, li, 0.0)
    assert not s.dynamic
    # per-row robust loss == sum over rows of the coupled worst case of that single row
    row_sum = 0.0
    for i in range(e.shape[0]):
        c = cls(rho=0.03, coupled=True)
        c.prepare(h, li, 0.0)
        row_sum += c.robust_loss(e[i : i + 1])
    assert s.robust_loss(e) == pytest.approx(row_sum, rel=1e-6)
    # and the effective matrix is the closed-form damping
    assert quad(s.effective(), e) == pytest.approx(s.robust_loss(e), rel=1e-6)
    # per-row >= coupled
    c = cls(rho=0.03, coupled=True)
    c.prepare(h, li, 0.0)
    assert s.robust_loss(e) >= c.robust_loss(e) * (1 - 1e-6)


def test_sets_contain_the_nominal_gram():
    li, h, e = _setup(4)
    for s in (make_uncertainty("baseline"), Trace(0.1), Trace(0.1, False), Ellipsoid(0.1), Ellipsoid(0.1, False), CTE(0.3)):
        s.prepare(h, li, 0.01 * float(h.diagonal().mean()))
        assert s.robust_loss(e) >= quad(h, e) * (1 - 1e-7)


@pytest.mark.parametrize(
    "name,radius,coupled,match",
    [
        ("nope", None, None, "unknown uncertainty"),
        ("minmax-trace", -0.1, None, "minmax-trace radius"),
        ("minmax-e", -1.0, None, "minmax-e radius"),
        ("cvar", 0.0, None, r"\(0, 1\]"),
        ("cvar", 1.5, None, r"\(0, 1\]"),
        ("cvar", 0.5, False, "per-row cvar"),
        ("trace", -0.1, None, "gamma must be >= 0"),
        ("baseline", -0.1, None, "gamma must be >= 0"),
        ("trace", 0.01, True, "per-row closed form"),
        ("e", None, "yes", "coupled must be"),
        ("trace", float("nan"), None, "finite"),
    ],
)
def test_bad_radius_and_names(name, radius, coupled, match):
    with pytest.raises(ValueError, match=match):
        make_uncertainty(name, radius, coupled)
