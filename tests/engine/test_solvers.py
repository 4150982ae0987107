"""Solvers against brute force, the least-squares refit, and a reference SparseGPT."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from robop_lightning.engine.gram import LayerInputs
from robop_lightning.engine.patterns import parse_pattern
from robop_lightning.engine.solvers import SOLVERS
from robop_lightning.engine.solvers.refit import exact_refit, masked_pcg
from tests.engine_helpers import correlated_inputs, quad, random_weight


def _damped(x, damping=0.01):
    h = LayerInputs(x).gram()
    return h + damping * float(h.diagonal().mean()) * torch.eye(h.shape[0], dtype=h.dtype)


def _ls_optimum(w, x2d, mask, lam):
    """Independent least squares: minimise ||X (w - w_hat)||^2 + lam ||w - w_hat||^2 on the mask, via lstsq."""
    n = w.shape[1]
    xa = torch.cat([x2d.double(), lam**0.5 * torch.eye(n, dtype=torch.float64)])
    out = torch.zeros_like(w, dtype=torch.float64)
    for i in range(w.shape[0]):
        s = mask[i]
        target = xa @ w[i].double()
        out[i, s] = torch.linalg.lstsq(xa[:, s], target.unsqueeze(1)).solution.squeeze(1)
    return out


@pytest.mark.parametrize("seed", range(3))
def test_refit_is_the_least_squares_optimum(seed):
    x = correlated_inputs(20, 3, 12, seed)
    w = random_weight(5, 12, seed)
    g = torch.Generator().manual_seed(seed)
    mask = torch.rand(5, 12, generator=g) < 0.5
    h = LayerInputs(x).gram()
    lam = 0.01 * float(h.diagonal().mean())
    ref = _ls_optimum(w, x.reshape(-1, 12), mask, lam)
    hd = h + lam * torch.eye(12, dtype=torch.float64)
    assert torch.allclose(exact_refit(w.double(), hd, mask), ref, atol=1e-8)
    assert torch.allclose(masked_pcg(w.double(), hd, mask, iters=200, tol=1e-12), ref, atol=1e-6)


def _brute_force_row(w, h, keep):
    """Best loss over all masks keeping ``keep`` per row (each row independent), with LS refit."""
    n = w.shape[1]
    total = 0.0
    for i in range(w.shape[0]):
        best = float("inf")
        for s in itertools.combinations(range(n), keep):
            mask = torch.zeros(1, n, dtype=torch.bool)
            mask[0, list(s)] = True
            fit = exact_refit(w[i : i + 1].double(), h, mask)
            best = min(best, quad(h, w[i : i + 1] - fit))
        total += best
    return total


@pytest.mark.parametrize("seed", range(3))
def test_single_removal_obs_is_exactly_optimal(seed):
    """Removing one weight per row: OBS's argmin w^2/[H^-1]_qq is the exact optimum (CAP, SparseGPT-free)."""
    x = correlated_inputs(16, 2, 8, seed)
    w = random_weight(4, 8, seed)
    hd = _damped(x)
    pat = parse_pattern("row", 1 / 8)
    w_hat, mask = SOLVERS["cap"](w, hd, pat)
    assert quad(hd, w - w_hat) == pytest.approx(_brute_force_row(w, hd, 7), rel=1e-9)


@pytest.mark.parametrize("seed", range(4))
def test_solvers_against_brute_force_on_small_rows(seed):
    x = correlated_inputs(16, 2, 8, seed)
    w = random_weight(3, 8, seed)
    hd = _damped(x)
    pat = parse_pattern("row", 0.5)
    optimum = _brute_force_row(w, hd, 4)
    losses = {}
    for name in ("alps", "cap", "sparsegpt", "wanda", "magnitude"):
        w_hat, mask = SOLVERS[name](w, hd, pat, h_diag=hd.diagonal())
        assert pat.validate_mask(mask)
        losses[name] = quad(hd, w - w_hat)
        assert losses[name] >= optimum * (1 - 1e-9)  # nothing beats the exhaustive optimum
    # ALPS as its authors run it stops as soon as the support is stable after rho was raised; on
    # 12 kept weights any flip raises rho, so it can stop within a few iterations (1.17x here at worst)
    assert losses["alps"] <= 1.2 * optimum
    assert losses["cap"] <= 1.15 * optimum
    # its weights are the least-squares refit of its mask (10 CG iterations on 4 unknowns a row)
    _, mask = SOLVERS["alps"](w, hd, pat)
    assert quad(hd, w - exact_refit(w.double(), hd, mask)) == pytest.approx(losses["alps"], rel=1e-4)


def _reference_sparsegpt(w, h, sparsity, blocksize, percdamp=0.01):
    """Straightforward SparseGPT: per-column OBS updates applied to all later columns at once
    (no lazy batching), mask per block by w^2 / U_ii^2 with an exact count."""
    w = w.double().clone()
    n = w.shape[1]
    h = h.double().clone()
    h += percdamp * h.diagonal().mean() * torch.eye(n, dtype=torch.float64)
    u = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)
    pruned = torch.zeros_like(w, dtype=torch.bool)
    for i1 in range(0, n, blocksize):
        i2 = min(i1 + blocksize, n)
        tmp = w[:, i1:i2] ** 2 / u.diagonal()[i1:i2] ** 2
        k = int(round(tmp.numel() * sparsity))
        idx = torch.topk(tmp.reshape(-1), k, largest=False).indices
        blockmask = torch.zeros(tmp.numel(), dtype=torch.bool)
        blockmask[idx] = True
        pruned[:, i1:i2] = blockmask.view_as(tmp)
        for j in range(i1, i2):
            q = w[:, j].clone()
            q[pruned[:, j]] = 0
            err = (w[:, j] - q) / u[j, j]
            w[:, j:] -= err[:, None] * u[j, j:][None, :]
            w[:, j] = q
    return w, ~pruned


@pytest.mark.parametrize("seed,blocksize", [(0, 16), (1, 16), (0, 32), (1, 64)])
def test_sparsegpt_matches_reference_numerics(seed, blocksize):
    """Blocks of 32 and 64 run the grouped in-block updates (sub-blocks of 16) against the reference's per-column ones."""
    x = correlated_inputs(64, 4, 64, seed)
    w = random_weight(16, 64, seed)
    h = LayerInputs(x).gram()
    ref_w, ref_mask = _reference_sparsegpt(w, h, 0.5, blocksize=blocksize)
    hd = h + 0.01 * float(h.diagonal().mean()) * torch.eye(64, dtype=torch.float64)
    w_hat, mask = SOLVERS["sparsegpt"](w, hd, parse_pattern("unstructured", 0.5), block_size=blocksize)
    assert torch.equal(mask, ref_mask)
    assert torch.allclose(w_hat.double(), ref_w, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("name", ["alps", "cap", "sparsegpt", "wanda", "magnitude"])
@pytest.mark.parametrize("pattern,sparsity", [("unstructured", 0.6), ("row", 0.6), ("2:4", None), ("1:4", None)])
def test_every_solver_every_pattern_exact_budget(name, pattern, sparsity):
    x = correlated_inputs(24, 2, 32, 0)
    w = random_weight(12, 32, 0)
    hd = _damped(x)
    pat = parse_pattern(pattern, sparsity)
    w_hat, mask = SOLVERS[name](w, hd, pat, h_diag=hd.diagonal())
    assert pat.validate_mask(mask)
    assert bool((w_hat[~mask] == 0).all())
    assert torch.isfinite(w_hat).all()


def test_cap_block_approximation_and_chunks_agree_with_full():
    x = correlated_inputs(24, 2, 48, 1)
    w = random_weight(10, 48, 1)
    hd = _damped(x)
    pat = parse_pattern("unstructured", 0.5)
    full, mfull = SOLVERS["cap"](w, hd, pat)
    chunked, mchunk = SOLVERS["cap"](w, hd, pat, chunk_bytes=1)  # one problem per chunk
    assert torch.equal(mfull, mchunk) and torch.allclose(full, chunked, atol=1e-6)
    # a block-diagonal curvature with one block equal to the whole layer is the full solver
    same, msame = SOLVERS["cap"](w, hd, pat, block_size=48)
    assert torch.equal(mfull, msame)
    # blocks of 16 that do not divide 40: padding handled, budget exact
    blk, mblk = SOLVERS["cap"](w[:, :40], hd[:40, :40], pat, block_size=16)
    assert pat.validate_mask(mblk)
    # the block approximation is worse than (or equal to) full curvature in nominal loss
    assert quad(hd, w - full) <= quad(hd, w - SOLVERS["cap"](w, hd, pat, block_size=8)[0]) * (1 + 1e-9)


def test_cap_truncated_first_pass_is_exact_when_rows_need_very_different_counts():
    """Rows scaled by 1e-3..1e3 need from almost none to almost all removals: the saturated
    problems are re-run in full and the result equals a full elimination of every row."""
    x = correlated_inputs(24, 2, 64, 3)
    w = random_weight(16, 64, 3) * torch.logspace(-3, 3, 16)[:, None]
    hd = _damped(x)
    pat = parse_pattern("unstructured", 0.5)
    quick, mq = SOLVERS["cap"](w, hd, pat)
    full, mf = SOLVERS["cap"](w, hd, pat, truncate=False)
    assert torch.equal(mq, mf) and torch.allclose(quick, full)
    assert int((~mq[0]).sum()) > 0.9 * 64  # the tiny row really went past the first pass's depth


@pytest.mark.parametrize("spec", ["unstructured", "row", "2:4", "prior"])
def test_cap_grouped_prunes_each_layer_as_cap_alone(spec):
    """G layers with their own Grams (and their own unstructured threshold) in one batched
    elimination: each equals CAP on that layer alone, bit for bit, whatever the chunking."""
    from robop_lightning.engine.solvers.cap import cap_grouped

    grams = torch.stack([_damped(correlated_inputs(24, 2, 32, seed)) for seed in range(3)])
    ws = torch.stack([random_weight(12, 32, seed) * (1 + seed) for seed in range(3)])  # different scales
    pat = parse_pattern("unstructured" if spec == "prior" else spec, None if ":" in spec else 0.6)
    prior = (torch.rand(12, 32, generator=torch.Generator().manual_seed(9)) > 0.3) if spec == "prior" else None
    for chunk_bytes, trajectory_bytes in ((1 << 26, 1 << 31), (1, 1 << 31), (1 << 26, 1)):
        # all problems together, one problem per chunk; no stored trajectory (the chosen steps replayed)
        out, masks = cap_grouped(ws, grams, pat, prior=prior, chunk_bytes=chunk_bytes,
                                 trajectory_bytes=trajectory_bytes)
        for g in range(3):
            alone, mask = SOLVERS["cap"](ws[g], grams[g], pat, prior=prior)
            assert torch.equal(masks[g], mask) and torch.equal(out[g], alone), (spec, g)
            assert pat.validate_mask(mask)


def test_wanda_ranks_within_each_output_row_as_published():
    """Wanda's comparison group is the output row (its paper, lib/prune.py, llm-compressor): at 50 %
    every row loses exactly half of its inputs, those of lowest |W_ij| ||X_j||; the layer-wide
    ranking stays available as group="layer"."""
    x = correlated_inputs(24, 2, 32, 0)
    w = random_weight(12, 32, 0)
    h = LayerInputs(x).gram()
    pat = parse_pattern("unstructured", 0.5)
    _, mask = SOLVERS["wanda"](w, h, pat, h_diag=h.diagonal())
    assert ((~mask).sum(1) == 16).all()
    # the published rule, computed directly: sort each row's scores, prune the lowest int(cols * s)
    scores = w.abs() * h.diagonal().float().sqrt()[None, :]
    pruned = torch.zeros_like(mask)
    pruned.scatter_(1, torch.sort(scores, dim=-1, stable=True).indices[:, :16], True)
    assert torch.equal(mask, ~pruned)
    # the layer-wide variant: one threshold over the layer, rows end unequal
    _, layer = SOLVERS["wanda"](w, h, pat, h_diag=h.diagonal(), group="layer")
    assert torch.equal(layer, pat.select(scores)) and len(set((~layer).sum(1).tolist())) > 1
    with pytest.raises(ValueError, match="group must be"):
        SOLVERS["wanda"](w, h, pat, group="column")


def test_wanda_row_group_spreads_an_uneven_budget_within_one_per_row():
    x = correlated_inputs(24, 2, 32, 1)
    w = random_weight(12, 32, 1)
    h = LayerInputs(x).gram()
    pat = parse_pattern("unstructured", 0.6)  # 153.6 -> 154 kept of 384: 12 rows x 12, 10 rows get 13
    _, mask = SOLVERS["wanda"](w, h, pat, h_diag=h.diagonal())
    kept = mask.sum(1)
    assert int(kept.sum()) == pat.keep_count(12, 32) and set(kept.tolist()) == {12, 13}
    # the rows keeping 13 are those whose 13th best score is highest
    scores = w.abs() * h.diagonal().float().sqrt()[None, :]
    thirteenth = torch.sort(scores, dim=1, descending=True).values[:, 12]
    assert set(torch.nonzero(kept == 13).flatten().tolist()) == set(torch.topk(thirteenth, 10).indices.tolist())
    # within a row, the kept weights are its best
    for i in range(12):
        assert float(scores[i][mask[i]].min()) >= float(scores[i][~mask[i]].max())


# --------------------------------------------------------------------------- SparseGPT's pieces
def test_upper_inverse_factor_is_the_cholesky_factor_of_the_inverse():
    """One factorisation of the reversed Gram gives the reference's chol(chol_inverse(chol(H)), upper)."""
    from robop_lightning.engine.solvers.sparsegpt import upper_inverse_factor

    for n in (48, 600):  # 600: the triangular inverse recurses (leaves of 256 and less)
        x = correlated_inputs(2 * n // 3, 2, n, 5, spread=2.0)  # uneven scales: condition number ~1e8
        h = LayerInputs(x).gram()
        h = h + 1e-6 * float(h.diagonal().mean()) * torch.eye(n, dtype=torch.float64)
        u = upper_inverse_factor(h)
        ref = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)
        assert bool((u.tril(-1) == 0).all()) and bool((u.diagonal() > 0).all())
        assert torch.allclose(u, ref, rtol=1e-6, atol=1e-9 * float(ref.abs().max()))
        assert torch.allclose(u.T @ u @ h, torch.eye(n, dtype=torch.float64), atol=1e-6)


@pytest.mark.parametrize("seed", range(3))
def test_smallest_picks_an_exact_count_with_ties_to_the_lowest_index(seed):
    from robop_lightning.engine.solvers.sparsegpt import smallest

    g = torch.Generator().manual_seed(seed)
    scores = torch.randint(0, 6, (7, 20), generator=g).float()  # many ties
    scores[0, :3] = -math.inf  # forced first (a prior mask)
    for k in (0, 1, 37, 140):
        mask = smallest(scores, k)
        assert int(mask.sum()) == k
        # a brute-force order: by value, then by flat index
        order = sorted(range(scores.numel()), key=lambda i: (float(scores.view(-1)[i]), i))
        assert sorted(mask.view(-1).nonzero().flatten().tolist()) == sorted(order[:k])
    counts = torch.randint(0, 21, (7,), generator=g)
    per_row = smallest(scores, counts, dim=1)
    assert per_row.sum(1).tolist() == counts.tolist()
    for r in range(7):
        order = sorted(range(20), key=lambda j: (float(scores[r, j]), j))
        assert per_row[r].nonzero().flatten().tolist() == sorted(order[: int(counts[r])])
    same = smallest(scores, torch.tensor(5), dim=1)
    assert same.sum(1).tolist() == [5] * 7 and torch.equal(same, smallest(scores, torch.full((7,), 5), dim=1))


@pytest.mark.parametrize("pattern,sparsity", [("unstructured", 0.5), ("2:4", None), ("1:3", None)])
def test_sparsegpt_sub_blocks_only_regroup_the_sums(pattern, sparsity):
    """The sweep's sub-blocks (a column's update reaches the rest of the block one product per 16
    columns) give the per-column sweep's masks and its weights up to float32 rounding."""
    from robop_lightning.engine.solvers.sparsegpt import _sweep, upper_inverse_factor

    n = 63 if pattern == "1:3" else 64  # 1:3: groups straddle the sub-blocks of 16 (rounded up to 18)
    x = correlated_inputs(64, 4, n, 2)
    w = random_weight(40, n, 2)
    u = upper_inverse_factor(_damped(x)).float()
    pat = parse_pattern(pattern, sparsity)
    g = torch.Generator().manual_seed(0)
    start = torch.rand(40, n, generator=g) < 0.5 if pat.kind != "nm" else torch.zeros(40, n, dtype=torch.bool)
    runs = {}
    for sub in (16, n):  # n: one sub-block, every update applied column by column
        runs[sub] = _sweep(w.clone(), u, start.clone(), pat, None, sub=sub)
    (wg, mg, eg), (wp, mp, ep) = runs[16], runs[n]
    assert torch.equal(mg, mp) and (pat.kind != "nm" or pat.validate_mask(~mg))
    assert bool((wg[mg] == 0).all())
    assert torch.allclose(wg, wp, rtol=1e-5, atol=1e-5 * float(wp.abs().max()))
    assert torch.allclose(eg, ep, rtol=1e-5, atol=1e-5 * float(ep.abs().max()))
    assert not torch.equal(wg, wp)  # the grouping did change the rounding: both paths ran
