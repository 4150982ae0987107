"""robop_lightning.engine.alternation: the one robust loop, tested with a fake solver and a fake set."""

from __future__ import annotations

import torch

from robop_lightning.engine.damping import damp_until_definite, positive_definite
from robop_lightning.engine.alternation import alternate, clamp_robust, frank_wolfe_step, quad, relative_error
from robop_lightning.engine.sets import base as sets_base


class FakeSet:
    """A dynamic set whose worst case is ``E^T E`` and whose robust loss is ``||E||_F^2``."""

    dynamic = True

    def worst_case(self, e):
        return (e.T @ e).double()

    def robust_loss(self, e):
        return float(e.double().pow(2).sum())


def test_alternate_follows_frank_wolfe_and_keeps_the_best_round():
    h0 = torch.eye(3, dtype=torch.float64)
    errors = [torch.full((2, 3), v) for v in (3.0, 1.0, 2.0, 1.0)]  # round 1 is best; round 3 ties it
    seen_h, seen_prev = [], []

    def solve(h_k, previous):
        seen_h.append(h_k.clone())
        seen_prev.append(previous)
        k = len(seen_h) - 1
        return f"s{k}", errors[k]

    uset = FakeSet()
    best, history = alternate(solve, h0, uset, rounds=3, nominal=lambda e: -1.0,
                              describe=lambda prev, cur: {"changed": float(prev != cur)})
    # H_k+1 = (1 - g_k) H_k + g_k worst_case(E_k), g_k = 2/(k+2), computed independently
    h = h0
    for k in range(3):
        g = 2 / (k + 2)
        h = (1 - g) * h + g * (errors[k].T @ errors[k]).double()
        assert torch.allclose(seen_h[k + 1], h)
    assert torch.equal(seen_h[0], h0)
    assert seen_prev == [None, "s0", "s1", "s2"]  # warm start: the previous round's solution
    assert best.solution == "s1" and best.robust_loss == 6.0  # the tie in round 3 keeps round 1
    assert torch.allclose(best.h, seen_h[1])
    assert [r["round"] for r in history] == [0, 1, 2, 3]
    assert [r["robust_loss"] for r in history] == [54.0, 6.0, 24.0, 6.0]
    assert history[0]["changed"] == 0.0 and history[1]["changed"] == 1.0
    assert all(r["nominal_loss"] == -1.0 for r in history)
    assert frank_wolfe_step(0) == 1.0 and frank_wolfe_step(2) == 0.5


def test_zero_rounds_is_one_solve():
    calls = []
    best, history = alternate(lambda h, p: (calls.append(p) or "only", torch.ones(1, 2)), torch.eye(2), FakeSet(), 0,
                              nominal=lambda e: 0.0)
    assert calls == [None] and best.solution == "only" and len(history) == 1


def test_relative_error_is_the_reconstruction_error_of_the_inputs():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(50, 6, dtype=torch.float64, generator=g)
    w, e = torch.randn(4, 6, generator=g), torch.randn(4, 6, generator=g) * 0.1
    direct = float((x @ e.double().T).pow(2).sum() / (x @ w.double().T).pow(2).sum())
    assert abs(relative_error(x.T @ x, w, e) - direct) < 1e-12 * direct
    assert quad(x.T @ x, e) >= 0
    assert relative_error(torch.zeros(6, 6, dtype=torch.float64), w, e) == 0.0


def test_the_loop_and_the_sets_measure_errors_with_one_function():
    assert quad is sets_base.quad  # tr(E H E^T) is written once, beside the sets
    g = torch.Generator().manual_seed(1)
    h, e = torch.randn(5, 5, dtype=torch.float64, generator=g), torch.randn(3, 5, generator=g)
    h = h @ h.T
    assert abs(quad(h, e) - float(torch.einsum("ij,jk,ik->", e.double(), h, e.double()))) < 1e-12 * quad(h, e)


def test_clamp_robust_only_absorbs_rounding():
    assert clamp_robust(1.0, 1.0 - 1e-9) == 1.0  # rounding: reported equal
    assert clamp_robust(1.0, 0.9) == 0.9  # a real gap is kept (and would be a bug upstream)
    assert clamp_robust(1.0, 2.0) == 2.0
    assert clamp_robust(0.0, -1e-12) == 0.0  # absolute tolerance near zero


def test_damping_can_spare_the_bias_column():
    h = torch.ones(3, 3, dtype=torch.float64)  # rank one
    h[2, 2] = 4.0
    hd, lam = damp_until_definite(h, 0.0, "layer", warn=False, columns=2, float32=False)
    assert lam > 0 and positive_definite(hd, float32=False)
    assert hd[2, 2] == 4.0 and hd[0, 0] == 1.0 + lam  # only the feature columns were damped


def test_a_singular_gram_under_e_no_longer_explodes_the_compensation():
    """A LayerNorm without bias makes the inputs of qkv / fc1 rank-deficient (mean zero). The authors'
    E adds ``c H^(1/2)``, zero on the same null direction; Cholesky passed on rounding noise and CAP's
    updates reached 1e37 (NaN in the next block). The blow-up is detected and the damping raised."""
    import warnings

    import timm

    from robop_lightning import prune_model

    torch.manual_seed(0)
    vit = timm.create_model("deit_tiny_patch16_224", img_size=32, patch_size=8, embed_dim=48, depth=2, num_heads=4,
                            num_classes=3).eval()
    g = torch.Generator().manual_seed(1)
    images = [torch.randn(8, 3, 32, 32, generator=g) for _ in range(2)]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        report = prune_model(vit, images, sparsity=0.5, solver="cap", uncertainty="e", heldout_fraction=0.25)
    assert any("blocks.0.attn.qkv: the damped Gram was not positive definite" in str(w.message) for w in caught)
    assert all(torch.isfinite(p).all() for p in vit.parameters())
    assert all(r["nominal_error"] < 0.5 for r in report.layers)  # was 2e74 on blocks.0.attn.qkv
