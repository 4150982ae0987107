"""ALPS step for step: the solver against a transcription of its authors' iteration.

The reference below is written from the procedure of ``ALPS_admm`` in the authors' code
(github.com/mazumder-lab/ALPS, ``alps.py``), in their arithmetic: a float32 normalised Gram, a
float64 ``eigh``, the resolvent formed in float64 and rounded to float32 at every check, float32
iterates, ``topk`` projections, the schedule's tests in their order, and an unpreconditioned CG with
their stop test. It takes the already damped Gram (the engine damps; the authors add 1 % of
``mean(diag H)`` first, as the engine's Baseline does).
"""

from __future__ import annotations

import pytest
import torch

from robop_lightning.engine.gram import LayerInputs
from robop_lightning.engine.patterns import parse_pattern
from robop_lightning.engine.solvers import SOLVERS
from tests.engine_helpers import correlated_inputs, quad, random_weight


def _project(x, kept, nm):
    """The authors' projection in the (inputs, rows) layout: zero the smallest |x| (``topk`` of ``-x^2``)."""
    n, m = x.shape
    if nm is None:
        flat = x.reshape(-1).clone()
        drop = torch.topk(-flat**2, flat.numel() - kept).indices
        flat[drop] = 0
        return flat.reshape(n, m)
    keep_n, group = nm
    groups = x.T.reshape(-1, group).clone()  # M consecutive inputs of a row
    drop = torch.topk(-groups**2, group - keep_n, dim=1).indices
    groups.scatter_(1, drop, 0.0)
    return groups.reshape(m, n).T


def _authors_cg(a, rhs, supp, x0, rtol=1e-4, maxiter=10):
    """Their CG on the support: no preconditioner, masked residual, stop when every row of the
    *unmasked* residual ``A X - rhs`` is below ``rtol`` times that row of ``rhs``."""
    x = x0.clone()
    r = (rhs - a @ x) * supp
    p = r.clone()
    rz_old = None
    stop = rtol * rhs.norm(dim=1)
    for it in range(maxiter):
        z = r
        if it:
            beta = (r * z).sum(0) / torch.where(rz_old == 0, torch.full_like(rz_old, 1e-8), rz_old)
            p = z + beta * p
        rz_old = (r * z).sum(0)
        ap = a @ p
        den = (p * ap).sum(0)
        alpha = rz_old / torch.where(den == 0, torch.full_like(den, 1e-8), den)
        x = x + alpha * p
        r = (r - alpha * ap) * supp
        if bool(((a @ x - rhs).norm(dim=1) <= stop).all()):
            break
    return x


def authors_alps(w, h, kept, nm=None, rho=0.1, max_iter=300, update_iter=3, switch_iter=30, trace=None):
    """ALPS as its authors run it, on a damped Gram ``h``; returns ``(weights, keep-mask)``."""
    xtx = h.float()
    norm = xtx.diagonal().sqrt() + 1e-8
    xtx = ((xtx / norm).T / norm).T  # columns, then rows
    b_orig = (w.float() * norm).T.contiguous()  # (inputs, rows)
    rhs0 = (b_orig.T @ xtx).T  # their YtX^T = H~ B0
    lam, q = torch.linalg.eigh(xtx.double())

    def resolvent(r):
        return (q @ ((1 / (lam + r)) * q).T).float()

    inv = resolvent(rho)
    d = _project(b_orig, kept, nm)
    d_init = d.clone()
    supp_prev = (d == 0).float()
    b = b_orig.clone()
    v = torch.zeros_like(b)
    raised = False
    for i in range(max_iter):
        b = inv @ (rhs0 - v + rho * d)
        d = _project((v + rho * b) / rho, kept, nm)
        v = v + rho * (b - d)
        if (i + 1) % update_iter:
            continue
        supp = (d == 0).float()
        change = float(((supp - supp_prev) ** 2).sum())
        if trace is not None:
            trace.append((i + 1, rho, int(change)))
        if change / kept > 0.1:
            raised, rho = True, rho * 1.3
        elif change / kept > 0.005:
            raised, rho = True, rho * 1.2
        elif change > 0.5:
            if raised:
                rho *= 1.1
            else:
                rho /= 5
                b, d, v = b_orig.clone(), d_init.clone(), torch.zeros_like(b)
        elif raised:
            break
        else:
            rho /= 5
        supp_prev = supp
        rho = min(rho, 1e6)
        inv = resolvent(rho)
        if i >= switch_iter and change / kept < 3e-4:
            break
    b = _project(b, kept, nm)
    mask = b != 0
    b = _authors_cg(xtx, rhs0, mask.float(), b)
    return (b.T / norm).float() * mask.T, mask.T


def _problem(rows, cols, seed, spread=1.0):
    x = correlated_inputs(8, 6, cols, seed, spread=spread)
    w = random_weight(rows, cols, seed)
    h = LayerInputs(x).gram()
    return w, h + 0.01 * float(h.diagonal().mean()) * torch.eye(cols, dtype=h.dtype)


# (rows, cols, seed, spread of the input scales, rho0, pattern, sparsity): 16x24 layers at 50 / 70 %
# and 2:4; 8x24 (n >= 2 m: the solver's two-product path); 32x64 with milder scales (k > 200, so a
# few flips are below 0.005 k: rho x1.1 and early stops); and rho0 = 20 there (restarts).
CASES = [(16, 24, seed, 1.0, 0.1, "unstructured", sp) for seed in range(8) for sp in (0.5, 0.7)] \
    + [(16, 24, seed, 1.0, 0.1, "2:4", None) for seed in range(4)] \
    + [(8, 24, seed, 1.0, 0.1, "unstructured", 0.6) for seed in range(4)] \
    + [(32, 64, seed, 0.3, 0.1, "unstructured", 0.5) for seed in range(4)] \
    + [(32, 64, seed, 0.3, 20.0, "unstructured", 0.5) for seed in (2, 6, 8, 10)]


@pytest.mark.parametrize("rows,cols,seed,spread,rho0,pattern,sparsity", CASES)
def test_alps_is_the_authors_iteration(rows, cols, seed, spread, rho0, pattern, sparsity):
    w, h = _problem(rows, cols, seed, spread)
    pat = parse_pattern(pattern, sparsity)
    kept = pat.keep_count(rows, cols)
    ref_w, ref_mask = authors_alps(w, h, kept, nm=(pat.n, pat.m) if pat.kind == "nm" else None, rho=rho0)
    w_hat, mask = SOLVERS["alps"](w, h, pat, rho0=rho0, fallback=False)
    assert torch.equal(mask, ref_mask)
    torch.testing.assert_close(w_hat, ref_w, rtol=1e-3, atol=1e-4)
    assert quad(h, w - w_hat) == pytest.approx(quad(h, w - ref_w), rel=1e-4)
    # at the authors' 1 % damping the magnitude fallback (on by default) changes nothing
    assert torch.equal(SOLVERS["alps"](w, h, pat, rho0=rho0)[1], ref_mask)


def test_the_cases_cover_every_branch_of_the_schedule():
    """The problems above raise rho by 1.3, 1.2 and 1.1, restart, stop on a stable support after a
    raise before iteration 30, and stop by the late test: the comparison exercises the whole schedule."""
    seen = set()
    for rows, cols, seed, spread, rho0, pattern, sparsity in CASES:
        w, h = _problem(rows, cols, seed, spread)
        pat = parse_pattern(pattern, sparsity)
        hist: list = []
        SOLVERS["alps"](w, h, pat, rho0=rho0, fallback=False, history=hist)
        kept, raised = pat.keep_count(rows, cols), False
        for rec in hist:
            ratio = rec["flips"] / kept
            if ratio > 0.005:
                seen.add("x1.3" if ratio > 0.1 else "x1.2")
                raised = True
            elif rec["flips"]:
                seen.add("x1.1" if raised else "restart")
            elif raised:
                seen.add("early stop" if rec["iteration"] <= 30 else "stable stop")
        if hist[-1]["flips"] and hist[-1]["iteration"] > 30:
            seen.add("late stop")
    assert {"x1.3", "x1.2", "x1.1", "restart", "early stop"} <= seen, seen


def test_the_fallback_never_returns_a_worse_fit_than_the_authors_iteration():
    """Under a large ridge (H~ near a scaled identity) ADMM can stop on a support worse than its
    normalised-magnitude start; the fallback then returns the start (lower loss), else ADMM's."""
    changed = 0
    for seed in range(8):
        w, h = _problem(16, 24, seed, 2.0)
        h = h + 3.0 * float(h.diagonal().mean()) * torch.eye(24, dtype=h.dtype)
        pat = parse_pattern("unstructured", 0.5)
        plain, mask_plain = SOLVERS["alps"](w, h, pat, fallback=False)
        assert torch.equal(mask_plain, authors_alps(w, h, pat.keep_count(16, 24))[1])
        best, mask = SOLVERS["alps"](w, h, pat)
        assert quad(h, w - best) <= quad(h, w - plain) * (1 + 1e-6)
        changed += not torch.equal(mask, mask_plain)
    assert changed >= 1


def test_alps_on_an_identity_gram_finds_the_magnitude_optimum():
    """With H = I the optimum keeps the largest |w|. The authors' iteration stops on a worse support
    (it is a heuristic on a non-convex set); the fallback returns the optimum."""
    w = random_weight(32, 64, 4)
    h = torch.eye(64, dtype=torch.float64)
    pat = parse_pattern("unstructured", 0.5)
    best = pat.select(w.abs())
    w_hat, mask = SOLVERS["alps"](w, h, pat)
    assert torch.equal(mask, best)
    assert torch.allclose(w_hat, w * mask, atol=1e-5)
    plain, mask_plain = SOLVERS["alps"](w, h, pat, fallback=False)
    assert torch.equal(mask_plain, authors_alps(w, h, pat.keep_count(32, 64))[1])
    assert quad(h, w - plain) > quad(h, w - w_hat)
