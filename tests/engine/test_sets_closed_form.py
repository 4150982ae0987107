"""The authors' four sets (SPEC §2a): ``D`` against independent formulas, one solve on ``H + D``."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from robop_lightning import prune_layer
from robop_lightning.engine.gram import LayerInputs
from robop_lightning.engine.patterns import parse_pattern
from robop_lightning.engine.solvers import SOLVERS
from robop_lightning.engine.sets import closed_form_damping, make_uncertainty
from tests.engine_helpers import correlated_inputs, random_weight

pytestmark = pytest.mark.usefixtures("one_thread")


def _data(seed=0, samples=12, tokens=5, n=24, m=10):
    return random_weight(m, n, seed), correlated_inputs(samples, tokens, n, seed)


def _independent_d(name, x, gamma):
    """``D`` from the definitions, computed from ``X`` in numpy (not from the library's Gram)."""
    xs = x.reshape(-1, x.shape[-1]).double().numpy()
    big_n, n = xs.shape
    h = xs.T @ xs
    frob = float((xs**2).sum())  # tr(X^T X) = ||X||_F^2
    if name == "baseline":
        return gamma * np.mean((xs**2).sum(0)) * np.eye(n)
    if name == "trace":
        return gamma * frob / math.sqrt(big_n) * np.eye(n)
    if name == "cte":
        return gamma * np.eye(n)
    # H^(1/2) = V diag(s) V^T from the SVD of X (X = U S V^T, H = V S^2 V^T)
    _, sv, vt = np.linalg.svd(xs, full_matrices=False)
    root = vt.T @ np.diag(sv) @ vt
    assert np.allclose(root @ root, h, rtol=1e-8, atol=1e-8 * np.abs(h).max())
    return gamma * math.sqrt(frob / big_n) * root


@pytest.mark.parametrize("name", ["baseline", "trace", "e", "cte"])
@pytest.mark.parametrize("gamma", [0.003, 0.1])
def test_d_matches_the_definition(name, gamma):
    _, x = _data(1)
    li = LayerInputs(x)
    ridge, matrix = closed_form_damping(name, li.gram(), li.num_tokens, gamma)
    d = ridge * torch.eye(x.shape[-1], dtype=torch.float64) + (0 if matrix is None else matrix)
    ref = torch.as_tensor(_independent_d(name, x, gamma))
    torch.testing.assert_close(d, ref, rtol=1e-9, atol=1e-9 * float(ref.abs().max()))
    if name == "e":
        assert matrix is not None and ridge == 0.0
        assert torch.linalg.eigvalsh(matrix).min() > -1e-9 * float(matrix.abs().max())  # PSD


def test_e_clamps_negative_eigenvalues_and_counts_global_tokens():
    # a Gram with an exact null space: H^(1/2) has the same null space, no NaN from sqrt(-eps)
    x = torch.randn(3, 2, 8, dtype=torch.float64)
    x[..., :3] = 0
    li = LayerInputs(x)
    _, matrix = closed_form_damping("e", li.gram(), li.num_tokens, 1.0)
    assert torch.isfinite(matrix).all() and float(matrix[:3].abs().max()) < 1e-6
    assert li.num_tokens == 6  # N = samples x tokens
    assert LayerInputs(torch.randn(7, 8)).num_tokens == 7


@pytest.mark.parametrize("solver", ["alps", "sparsegpt", "cap"])
@pytest.mark.parametrize("name", ["trace", "e", "cte"])
def test_one_solve_on_h_plus_d_replaces_the_baseline_damping(solver, name):
    """The engine hands the solver exactly ``H + D`` (no Baseline damping on top) and solves once."""
    w, x = _data(2)
    gamma = 0.05
    r = prune_layer(w, x, sparsity=0.6, solver=solver, uncertainty=name, radius=gamma)
    assert r.history == []  # one solve, no alternation
    ref_d = torch.as_tensor(_independent_d(name, x, gamma))
    h = LayerInputs(x).gram()
    ref_w, ref_mask = SOLVERS[solver](w.float(), h + ref_d, parse_pattern("unstructured", 0.6))
    assert torch.equal(r.mask, ref_mask)
    torch.testing.assert_close(r.weight, ref_w.to(w.dtype), rtol=1e-4, atol=1e-5)
    # its robust error is the nominal error under H + D
    err = (w - r.weight).double()
    robust = float(((err @ (h + ref_d)) * err).sum()) / float(((w.double() @ h) * w.double()).sum())
    assert r.robust_error == pytest.approx(robust, rel=1e-6)


@pytest.mark.parametrize("solver", ["alps", "sparsegpt"])
@pytest.mark.parametrize("pattern,sparsity", [("unstructured", 0.7), ("2:4", None)])
def test_trace_is_baseline_with_rescaled_gamma(solver, pattern, sparsity):
    """``trace, gamma=g`` == ``baseline, gamma = g n / sqrt(N)``; ``cte, gamma=c mean(diag H)`` == ``baseline, c``."""
    w, x = _data(3, samples=20, tokens=4, n=32, m=12)
    big_n, n = 20 * 4, 32
    g = 0.004
    trace = prune_layer(w, x, sparsity=sparsity, pattern=pattern, solver=solver, uncertainty="trace", radius=g)
    base = prune_layer(w, x, sparsity=sparsity, pattern=pattern, solver=solver, uncertainty="baseline",
                       radius=g * n / math.sqrt(big_n))
    assert trace.damping == pytest.approx(base.damping, rel=1e-12)
    # the two ridges agree to the last bit or two of float64: the float32 results are identical
    assert torch.equal(trace.mask, base.mask) and torch.equal(trace.weight, base.weight)
    c = 0.02
    mean_diag = float(LayerInputs(x).gram().diagonal().mean())
    cte = prune_layer(w, x, sparsity=sparsity, pattern=pattern, solver=solver, uncertainty="cte", radius=c * mean_diag)
    base = prune_layer(w, x, sparsity=sparsity, pattern=pattern, solver=solver, uncertainty="baseline", radius=c)
    assert torch.equal(cte.mask, base.mask) and torch.equal(cte.weight, base.weight)


def test_baseline_radius_is_the_damping():
    w, x = _data(4)
    a = prune_layer(w, x, sparsity=0.5, solver="sparsegpt", uncertainty="baseline", damping=0.05)
    b = prune_layer(w, x, sparsity=0.5, solver="sparsegpt", uncertainty="baseline", radius=0.05)
    assert torch.equal(a.weight, b.weight) and a.damping == pytest.approx(b.damping, rel=1e-15)


def test_default_gamma_and_aliases():
    w, x = _data(5)
    default = prune_layer(w, x, sparsity=0.5, solver="sparsegpt", uncertainty="trace")
    explicit = prune_layer(w, x, sparsity=0.5, solver="sparsegpt", uncertainty="trace", radius=0.01)
    assert torch.equal(default.weight, explicit.weight) and default.uncertainty == "trace(gamma=0.01)"
    for alias in ("ellipsoid", "eigh", "E"):
        r = prune_layer(w, x, sparsity=0.5, solver="sparsegpt", uncertainty=alias, radius=0.5)
        assert r.uncertainty == "e(gamma=0.5)"


def test_wanda_scores_with_the_robust_diagonal():
    """Wanda ranks |W_ij| sqrt((H + D)_jj) under a robust set, the published sqrt(H_jj) under Baseline."""
    w, x = _data(6)
    li = LayerInputs(x)
    h = li.gram()
    for name, gamma in (("baseline", 0.01), ("e", 2.0)):
        r = prune_layer(w, x, sparsity=0.5, solver="wanda", uncertainty=name, radius=gamma)
        d = h.diagonal() if name == "baseline" else (h + torch.as_tensor(_independent_d(name, x, gamma))).diagonal()
        score = w.abs().double() * d.sqrt()[None, :]
        keep = torch.zeros_like(r.mask)  # Wanda as published: the best half of every output row
        keep.scatter_(1, score.topk(r.mask.shape[1] // 2, dim=1).indices, True)
        assert torch.equal(r.mask, keep)


@pytest.mark.parametrize("solver", ["alps", "sparsegpt", "cap"])
def test_a_huge_trace_ridge_is_magnitude_pruning(solver):
    """As the Trace ridge dominates H, every OBS-type solver tends to magnitude pruning (SPEC §2b note)."""
    w, x = _data(7)
    mag = prune_layer(w, x, sparsity=0.6, solver="magnitude")
    big = prune_layer(w, x, sparsity=0.6, solver=solver, uncertainty="trace", radius=1e6)
    small = prune_layer(w, x, sparsity=0.6, solver=solver, uncertainty="trace", radius=1e-4)
    assert torch.equal(big.mask, mag.mask)
    assert not torch.equal(small.mask, mag.mask)
    assert small.nominal_error < big.nominal_error


def test_coupled_is_refused_for_the_authors_sets():
    w, x = _data(8)
    with pytest.raises(ValueError, match="per-row closed form"):
        prune_layer(w, x, uncertainty="trace", coupled=True)
    assert make_uncertainty("minmax-trace").coupled and not make_uncertainty("minmax-trace", coupled=False).dynamic


@pytest.mark.parametrize("name, gamma", [("baseline", 0.01), ("trace", 0.05), ("e", 0.7), ("cte", 3.0)])
def test_every_set_is_a_spectral_shift_of_the_gram(name, gamma):
    """closed_form_spectrum's (ridge, c): Q diag(lam + ridge + c sqrt(lam)) Q^T is exactly H + D."""
    from robop_lightning.engine.sets.closed_form import closed_form_damping, closed_form_spectrum

    x = torch.randn(40, 10, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    h = x.T @ x
    ridge, c = closed_form_spectrum(name, float(h.diagonal().mean()), float(h.diagonal().sum()), 40, gamma)
    lam, q = torch.linalg.eigh(h)
    lam = lam.clamp_min(0)
    shifted = (q * (lam + ridge + c * lam.sqrt())) @ q.T
    d_ridge, d_matrix = closed_form_damping(name, h, 40, gamma)
    expected = h + d_ridge * torch.eye(10, dtype=h.dtype) + (0 if d_matrix is None else d_matrix)
    torch.testing.assert_close(shifted, expected, rtol=1e-10, atol=1e-9)
