"""uncertainty="auto" / radius="auto": K-fold cross-validation over calibration samples."""

from __future__ import annotations

import copy

import pytest
import torch

from robop_lightning import LayerInputs, RobOPCallback, prune_layer, prune_model
from robop_lightning.engine.patterns import parse_pattern
from robop_lightning.engine.selection import AutoOptions, Candidate, default_candidates, select_uncertainty

pytestmark = pytest.mark.usefixtures("one_thread")

GRID = ["trace=0.001", "trace=0.01", "trace=0.1", "trace=1"]


def _data(samples, tokens, n, seed):
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(n, n, generator=g) / n**0.5 + torch.eye(n)
    return torch.randn(samples, tokens, n, generator=g) @ mix


def _weight(m, n, seed):
    return torch.randn(m, n, generator=torch.Generator().manual_seed(100 + seed))


@pytest.mark.parametrize("scorer", ["admm", "alps"])
@pytest.mark.parametrize("seed", range(3))
def test_few_noisy_samples_make_a_large_ridge_win(seed, scorer):
    """8 samples x 4 tokens for 48 inputs: the Gram is rank-deficient noise; a large ridge generalises."""
    w, x = _weight(24, 48, seed), _data(8, 4, 48, seed)
    s = select_uncertainty(w, LayerInputs(x), parse_pattern("unstructured", 0.6), GRID, scorer=scorer, rows=None)
    assert s.chosen.label in ("trace=0.1", "trace=1")
    assert s.score(s.chosen.label) < 0.8 * s.score("baseline")


@pytest.mark.parametrize("scorer", ["admm", "alps"])
@pytest.mark.parametrize("seed", range(3))
def test_abundant_clean_data_makes_a_small_radius_win(seed, scorer):
    """4096 tokens for 16 inputs: the nominal fit is right; large ridges lose."""
    w, x = _weight(24, 16, seed), _data(512, 8, 16, seed)
    s = select_uncertainty(w, LayerInputs(x), parse_pattern("unstructured", 0.6), GRID, scorer=scorer, rows=None)
    assert s.chosen.label in ("baseline", "trace=0.001", "trace=0.01")
    assert s.score("trace=1") > 1.1 * s.score(s.chosen.label)


def test_fold_errors_match_an_independent_computation():
    """Each fold error: prune on the other folds' samples, score on the fold's own Gram."""
    w, x = _weight(8, 12, 0), _data(10, 3, 12, 0)
    pat = parse_pattern("unstructured", 0.5)
    s = select_uncertainty(w, LayerInputs(x), pat, ["trace=0.05"], folds=3, scorer="sparsegpt")
    assert s.folds == 3 and set(s.errors) == {"baseline", "trace=0.05"}
    for k in range(3):
        held = x[[i for i in range(10) if i % 3 == k]]
        train = x[[i for i in range(10) if i % 3 != k]]
        ref = prune_layer(w, train, sparsity=0.5, solver="sparsegpt", uncertainty="trace", radius=0.05)
        e, hh = (w - ref.weight).double(), LayerInputs(held).gram()
        expected = float(((e @ hh) * e).sum() / ((w.double() @ hh) * w.double()).sum())
        assert s.errors["trace=0.05"][k] == pytest.approx(expected, rel=1e-6)


@pytest.mark.parametrize("select", ["mean", "worst"])
def test_chosen_never_worse_than_baseline_on_the_held_out_folds(select):
    for seed in range(3):
        w, x = _weight(16, 24, seed), _data(12, 4, 24, seed)
        r = prune_layer(w, x, sparsity=0.7, solver="sparsegpt", uncertainty="auto", auto={"select": select})
        sel = r.selection
        errs = sel["fold_errors"]
        agg = (lambda v: max(v)) if select == "worst" else (lambda v: sum(v) / len(v))
        assert agg(errs[sel["chosen"]]) <= agg(errs["baseline"])
        assert min(agg(v) for v in errs.values()) == agg(errs[sel["chosen"]])


def test_the_layer_is_pruned_once_with_the_winner_on_all_samples():
    w, x = _weight(16, 24, 1), _data(12, 4, 24, 1)
    r = prune_layer(w, x, sparsity=0.6, solver="alps", uncertainty="auto")
    chosen = Candidate.parse(r.selection["chosen"])
    direct = prune_layer(w, x, sparsity=0.6, solver="alps", uncertainty=chosen.set, radius=chosen.gamma)
    assert torch.equal(r.weight, direct.weight) and torch.equal(r.mask, direct.mask)
    # radius="auto" keeps the set: only its gammas (and Baseline) compete
    t = prune_layer(w, x, sparsity=0.6, solver="alps", uncertainty="e", radius="auto")
    assert {Candidate.parse(c).set for c in t.selection["fold_errors"]} == {"baseline", "e"}


def test_default_grid_and_options():
    grid = default_candidates()
    assert grid[0] == Candidate("baseline") and {c.set for c in grid} == {"baseline", "trace", "e", "cte"}
    assert AutoOptions.coerce({"folds": 3, "candidates": ["trace=0.01"]}).candidates == ("trace=0.01",)
    with pytest.raises(ValueError, match="valid keys are candidates, folds, select, scorer, rows, screen"):
        AutoOptions.coerce({"fold": 3})
    with pytest.raises(ValueError, match="min-max extension"):
        AutoOptions.coerce({"candidates": ["cvar=0.5"]})
    w, x = _weight(4, 8, 0), _data(6, 2, 8, 0)
    with pytest.raises(ValueError, match="folds must be an integer >= 2"):
        prune_layer(w, x, uncertainty="auto", auto={"folds": 1})
    with pytest.raises(ValueError, match="select must be"):
        prune_layer(w, x, uncertainty="auto", auto={"select": "median"})
    with pytest.raises(ValueError, match="ignores the calibration data"):
        prune_layer(w, x, solver="magnitude", uncertainty="auto")
    with pytest.raises(ValueError, match="not of the extension"):
        prune_layer(w, x, uncertainty="cvar", radius="auto")
    with pytest.raises(ValueError, match="radius must be a number, None or 'auto'"):
        prune_layer(w, x, uncertainty="trace", radius="big")
    with pytest.raises(ValueError, match="not a set"):
        prune_layer(w, x, pattern="structured", uncertainty="auto")
    with pytest.warns(RuntimeWarning, match="one calibration sample"):
        r = prune_layer(w, x[:1], uncertainty="auto", solver="sparsegpt")
    assert r.selection["chosen"] == "baseline"


def _net():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(12, 24), torch.nn.ReLU(), torch.nn.Linear(24, 24), torch.nn.ReLU(),
                               torch.nn.Linear(24, 4))


def _batches():
    g = torch.Generator().manual_seed(3)
    return [torch.randn(6, 12, generator=g) for _ in range(4)]


def test_prune_model_auto_is_deterministic_and_reported():
    runs = []
    for _ in range(2):
        model = _net()
        report = prune_model(model, _batches(), sparsity=0.6, solver="alps", uncertainty="auto",
                             targets=["0", "2"], progress=False)
        runs.append((report, model))
    (r1, m1), (r2, m2) = runs
    assert [row["selection"] for row in r1.layers] == [row["selection"] for row in r2.layers]
    assert all(torch.equal(a, b) for a, b in zip(m1.state_dict().values(), m2.state_dict().values()))
    assert "set" in str(r1).splitlines()[1] and r1.config["auto"]["folds"] == 4
    assert all(row["selection"]["folds"] == 4 for row in r1.layers)


def test_resumed_auto_run_is_bit_identical(tmp_path):
    """A run interrupted after its first layer resumes to the same choice and weights."""
    ref_model = _net()
    ref = prune_model(ref_model, _batches(), sparsity=0.6, solver="sparsegpt", uncertainty="auto",
                      targets=["0", "2"], progress=False)
    def interrupted(m, batch):  # stops the run at the first forward after layer "0" was pruned
        if bool((m[0].weight == 0).any()):
            raise KeyboardInterrupt
        return m(batch)

    with pytest.raises(KeyboardInterrupt):
        prune_model(_net(), _batches(), sparsity=0.6, solver="sparsegpt", uncertainty="auto", targets=["0", "2"],
                    progress=False, resume_dir=tmp_path, forward=interrupted)
    model = _net()
    report = prune_model(model, _batches(), sparsity=0.6, solver="sparsegpt", uncertainty="auto", targets=["0", "2"],
                         progress=False, resume_dir=tmp_path)
    assert report.resumed == ["0"]
    assert [r["selection"] for r in report.layers] == [r["selection"] for r in ref.layers]
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), ref_model.state_dict().values()))


def test_callback_takes_auto_in_a_real_trainer(tmp_path):
    import lightning.pytorch as pl
    from torch.utils.data import DataLoader, TensorDataset

    class Net(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = _net()

        def forward(self, x):
            return self.net(x)

        def training_step(self, batch, _):
            return torch.nn.functional.cross_entropy(self(batch[0]), batch[1])

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.01)

    g = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.randn(48, 12, generator=g), torch.randint(0, 4, (48,), generator=g))
    robop = RobOPCallback(sparsity=0.5, solver="sparsegpt", uncertainty="trace", radius="auto", targets=["net.0", "net.2"],
                          auto={"folds": 3, "select": "worst"}, calibration_batches=4, verbose=False, progress=False)
    trainer = pl.Trainer(max_epochs=1, callbacks=[robop], logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path)
    model = Net()
    trainer.fit(model, DataLoader(data, batch_size=6))
    rows = robop.reports[-1].layers
    assert [r["selection"]["folds"] for r in rows] == [3, 3] and all(r["selection"]["select"] == "worst" for r in rows)
    for name, mask in robop.masks.to_dict().items():  # zeros held through fine-tuning
        assert bool((model.get_submodule(name).weight[~mask] == 0).all())


def test_a_row_sample_scores_like_all_rows():
    """Scoring on a subset of output rows: same fold errors when the subset is every row, close otherwise."""
    w, x = _weight(64, 24, 2), _data(12, 4, 24, 2)
    pat = parse_pattern("row", 0.6)  # per-row budget: a row's result does not depend on the other rows
    full = select_uncertainty(w, LayerInputs(x), pat, GRID, scorer="sparsegpt", rows=None)
    same = select_uncertainty(w, LayerInputs(x), pat, GRID, scorer="sparsegpt", rows=64)
    assert same.errors == full.errors
    half = select_uncertainty(w, LayerInputs(x), pat, GRID, scorer="sparsegpt", rows=32)
    keep = torch.linspace(0, 63, 32).round().long()
    alone = select_uncertainty(w[keep], LayerInputs(x), pat, GRID, scorer="sparsegpt", rows=None)
    assert half.errors == alone.errors  # exactly the evenly spaced rows
    for label in full.errors:
        assert half.score(label) == pytest.approx(full.score(label), rel=0.3)
    with pytest.raises(ValueError, match="rows must be a positive integer"):
        select_uncertainty(w, LayerInputs(x), pat, GRID, rows=0)


def _fold_spectrum(x, n):
    h = LayerInputs(x).gram()
    lam, q = torch.linalg.eigh(h)
    return h, lam.clamp_min(0), q


@pytest.mark.parametrize("pattern, sparsity", [("unstructured", 0.6), ("2:4", None), ("row", 0.5)])
def test_admm_scorer_fits_each_candidate_under_its_own_gram(pattern, sparsity):
    """The batched scorer's output for a candidate: on the pattern, and the exact least-squares fit
    of its own support under H + ridge I + c H^(1/2) (an independent float64 refit)."""
    from robop_lightning.engine.selection import _admm_scores
    from robop_lightning.engine.solvers.refit import exact_refit

    torch.manual_seed(0)
    n, m = 8, 6
    x, w = _data(10, 3, n, 4), _weight(m, n, 4)
    h, lam, q = _fold_spectrum(x, n)
    root = (q * lam.sqrt()) @ q.T
    shifts = [(0.01 * float(h.diagonal().mean()), 0.0), (0.0, 0.5), (2.0, 0.1)]
    pat = parse_pattern(pattern, sparsity)
    out = _admm_scores(w.double(), lam, q, h, root, shifts, pat, None)
    assert out.shape == (3, m, n)
    for (ridge, c), w_hat in zip(shifts, out):
        mask = w_hat != 0
        assert int(mask.sum()) == pat.keep_count(m, n)
        h_c = h + ridge * torch.eye(n, dtype=h.dtype) + c * root
        torch.testing.assert_close(w_hat, exact_refit(w.double(), h_c, mask), rtol=1e-6, atol=1e-8)


def test_admm_scorer_scores_candidates_independently():
    """Candidates stacked in one batch get what each would get alone."""
    from robop_lightning.engine.selection import _admm_scores

    x, w = _data(12, 4, 16, 5), _weight(10, 16, 5)
    h, lam, q = _fold_spectrum(x, 16)
    h, lam, q = h.float(), lam.float(), q.float()
    root = (q * lam.sqrt()) @ q.T
    shifts = [(0.1, 0.0), (0.0, 0.3), (5.0, 0.0)]
    pat = parse_pattern("unstructured", 0.5)
    together = _admm_scores(w, lam, q, h, root, shifts, pat, None)
    for i, shift in enumerate(shifts):
        alone = _admm_scores(w, lam, q, h, root, [shift], pat, None)[0]
        torch.testing.assert_close(together[i], alone, rtol=1e-5, atol=1e-6)
        assert torch.equal(together[i] != 0, alone != 0)


def test_admm_scorer_honours_a_prior_mask():
    w, x = _weight(16, 24, 3), _data(12, 4, 24, 3)
    prior = torch.rand(16, 24, generator=torch.Generator().manual_seed(0)) < 0.6
    r = prune_layer(w, x, sparsity=0.7, solver="alps", uncertainty="auto", prior_mask=prior)
    assert r.selection["scorer"] == "admm"
    assert not bool((r.mask & ~prior).any())


def test_screening_keeps_baseline_and_the_best_of_a_first_pass():
    """A solver scorer first scores every candidate on rows // 4 rows, then decides among the best
    `screen` and Baseline on all `rows` rows; the decision equals scoring those finalists alone."""
    w, x = _weight(64, 24, 2), _data(16, 4, 24, 2)
    pat = parse_pattern("unstructured", 0.6)
    grid = ["trace=0.001", "trace=0.01", "trace=0.1", "trace=1", "e=1", "e=3"]
    s = select_uncertainty(w, LayerInputs(x), pat, grid, scorer="cap", rows=32, screen=2)
    assert set(s.screened) == {"baseline", *grid} and "baseline" in s.errors and len(s.errors) == 3
    first = {c: sum(v) / len(v) for c, v in s.screened.items() if c != "baseline"}
    assert set(s.errors) - {"baseline"} == set(sorted(first, key=first.get)[:2])  # the two best of the first pass
    alone = select_uncertainty(w, LayerInputs(x), pat, [c for c in s.errors if c != "baseline"], scorer="cap",
                               rows=32)
    assert alone.errors == s.errors and alone.chosen == s.chosen
    assert s.score(s.chosen.label) <= s.score("baseline")
    # the screening rows really are a quarter: its errors differ from the decision's
    assert s.screened["baseline"] != s.errors["baseline"]
    # no screening for the admm scorer, or when the grid is no larger than screen + Baseline
    assert not select_uncertainty(w, LayerInputs(x), pat, grid, scorer="admm", rows=32, screen=2).screened
    assert not select_uncertainty(w, LayerInputs(x), pat, grid[:2], scorer="cap", rows=32, screen=2).screened
    with pytest.raises(ValueError, match="screen must be a positive integer or None"):
        select_uncertainty(w, LayerInputs(x), pat, grid, scorer="cap", screen=0)
    # through prune_layer: the default screens CAP's own scorer, and the report keeps both passes
    r = prune_layer(w, x, sparsity=0.6, solver="cap", uncertainty="auto")
    assert len(r.selection["screen_errors"]) == len(default_candidates()) and len(r.selection["fold_errors"]) == 4


def test_screening_keeps_baseline_wherever_the_grid_lists_it():
    w, x = _weight(64, 24, 3), _data(16, 4, 24, 3)
    pat = parse_pattern("unstructured", 0.6)
    grid = ["trace=1", "e=3", "baseline", "trace=0.1", "e=1"]
    s = select_uncertainty(w, LayerInputs(x), pat, grid, scorer="sparsegpt", rows=32, screen=1)
    assert "baseline" in s.errors and len(s.errors) == 2 and s.score(s.chosen.label) <= s.score("baseline")
    for bad in (0, 2.5, True, "3"):
        with pytest.raises(ValueError, match="auto screen must be a positive integer or None"):
            AutoOptions.coerce({"screen": bad})
    with pytest.raises(ValueError, match="auto rows must be a positive integer or None"):
        AutoOptions.coerce({"rows": "x"})
