"""``prune_layer``: the public contract, the alternating scheme, bad input, quality ordering."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from robop_lightning import LayerInputs, prune_layer
from robop_lightning.engine.patterns import parse_pattern
from robop_lightning.engine.solvers.refit import exact_refit
from tests.engine_helpers import _correlated, correlated_inputs, quad, random_weight

SOLVERS = ["alps", "cap", "sparsegpt", "wanda", "magnitude"]
SETS = ["baseline", "trace", "e", "cte", "minmax-trace", "minmax-e", "cvar"]


@pytest.fixture(scope="module")
def layer():
    return random_weight(16, 32, 0), correlated_inputs(24, 4, 32, 0)


@pytest.mark.parametrize("solver", SOLVERS)
@pytest.mark.parametrize("uncertainty", SETS)
def test_contract_every_solver_every_set(layer, solver, uncertainty):
    w, x = layer
    w0, x0 = w.clone(), x.clone()
    r = prune_layer(w, x, sparsity=0.6, solver=solver, uncertainty=uncertainty, rounds=2, heldout=x[:6] * 1.1)
    assert torch.equal(w, w0) and torch.equal(x, x0)  # inputs untouched
    assert r.weight.shape == w.shape and r.weight.dtype == w.dtype and r.mask.dtype == torch.bool
    assert int(r.mask.sum()) == round(0.4 * w.numel())
    assert bool((r.weight[~r.mask] == 0).all())
    assert r.sparsity == pytest.approx(0.6, abs=1 / w.numel())
    assert r.robust_error >= r.nominal_error >= 0
    assert r.heldout_error is not None and r.heldout_error >= 0
    assert (r.srank is not None) == (uncertainty in ("minmax-trace", "minmax-e", "cvar"))
    assert solver in repr(r) and r.to_dict()["solver"] == solver


@pytest.mark.parametrize("solver", ["alps", "cap", "sparsegpt", "wanda"])
def test_alternating_scheme_never_worse_than_first_round(solver):
    for uncertainty, radius in (("minmax-trace", 0.05), ("minmax-e", 0.3), ("cvar", 0.3)):
        w, x = random_weight(12, 24, 3), correlated_inputs(30, 2, 24, 3)
        r = prune_layer(w, x, sparsity=0.5, solver=solver, uncertainty=uncertainty, radius=radius, rounds=3)
        assert [h["round"] for h in r.history if isinstance(h["round"], int)] == [0, 1, 2, 3]
        first = r.history[0]["robust_loss"] / quad(LayerInputs(x).gram(), w)
        assert r.robust_error <= first * (1 + 1e-6)


def test_cvar_alpha_one_is_exactly_baseline(layer):
    w, x = layer
    for solver in SOLVERS:
        a = prune_layer(w, x, sparsity=0.5, solver=solver, uncertainty="baseline")
        b = prune_layer(w, x, sparsity=0.5, solver=solver, uncertainty="cvar", radius=1.0)
        assert torch.equal(a.mask, b.mask) and torch.equal(a.weight, b.weight)
        assert a.nominal_error == b.nominal_error
        assert b.robust_error == pytest.approx(b.nominal_error, rel=1e-6)


def test_baseline_sparsegpt_reproduces_sparsegpt_damping(layer):
    """The baseline set hands the solver exactly H + 0.01 mean(diag H) I."""
    from robop_lightning.engine.solvers import SOLVERS as table

    w, x = layer
    h = LayerInputs(x).gram()
    hd = h + 0.01 * float(h.diagonal().mean()) * torch.eye(32, dtype=torch.float64)
    ref_w, ref_mask = table["sparsegpt"](w, hd, parse_pattern("unstructured", 0.5))
    r = prune_layer(w, x, sparsity=0.5, solver="sparsegpt", uncertainty="baseline")
    assert torch.equal(r.mask, ref_mask) and torch.equal(r.weight, ref_w)
    assert r.damping == pytest.approx(0.01 * float(h.diagonal().mean()))


def test_final_refit_is_least_squares_on_the_mask():
    w, x = random_weight(8, 16, 5), correlated_inputs(40, 2, 16, 5)
    r = prune_layer(w, x, sparsity=0.5, solver="alps", uncertainty="trace", radius=0.0)  # static: one solve
    h = LayerInputs(x).gram()
    hd = h + r.damping * torch.eye(16, dtype=torch.float64)
    best = exact_refit(w.double(), hd, r.mask)
    # ALPS's PCG on its support is (close to) the least-squares optimum
    assert quad(hd, w - r.weight) <= quad(hd, w - best) * 1.001


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_dtype_preserved(dtype, layer):
    w, x = layer
    r = prune_layer(w.to(dtype), x.to(dtype), sparsity=0.5, solver="sparsegpt")
    assert r.weight.dtype == dtype and bool((r.weight[~r.mask] == 0).all())


def test_nm_and_row_patterns(layer):
    w, x = layer
    r = prune_layer(w, x, pattern="2:4", solver="alps")
    assert bool((r.mask.view(16, 8, 4).sum(-1) == 2).all()) and r.sparsity == 0.5
    r = prune_layer(w, x, sparsity=0.75, pattern="row", solver="cap")
    assert bool((r.mask.sum(1) == 8).all())


def test_sparsity_zero_keeps_everything(layer):
    w, x = layer
    r = prune_layer(w, x, sparsity=0.0, solver="alps")
    assert bool(r.mask.all()) and torch.equal(r.weight, w) and r.nominal_error == 0


def test_dead_features_and_rank_deficient_gram():
    w = random_weight(8, 32, 1)
    x = correlated_inputs(3, 2, 32, 1)  # 6 tokens, 32 features: rank <= 6
    x[..., :5] = 0  # dead inputs
    for solver in SOLVERS:
        for uncertainty in SETS:
            r = prune_layer(w, x, sparsity=0.5, solver=solver, uncertainty=uncertainty)
            assert torch.isfinite(r.weight).all() and int(r.mask.sum()) == 128
            assert 0 <= r.nominal_error <= 1.0 + 1e-6 or solver == "magnitude"


def test_all_zero_inputs_warn_and_fall_back_to_magnitude():
    w = random_weight(4, 8, 2)
    with pytest.warns(RuntimeWarning, match="all calibration inputs are zero"):
        r = prune_layer(w, torch.zeros(5, 8), sparsity=0.5, solver="alps")
    assert torch.equal(r.mask, parse_pattern("unstructured", 0.5).select(w.abs()))


def test_quality_ordering_on_correlated_uneven_inputs():
    """alps <= sparsegpt < wanda < magnitude in nominal error at 60 %, cap close to sparsegpt."""
    totals = dict.fromkeys(SOLVERS, 0.0)
    for seed in range(4):
        w, x = random_weight(32, 64, seed), correlated_inputs(64, 4, 64, seed)
        for solver in SOLVERS:
            totals[solver] += prune_layer(w, x, sparsity=0.6, solver=solver).nominal_error / 4
    assert totals["alps"] <= totals["sparsegpt"] < totals["wanda"] < totals["magnitude"]
    assert totals["cap"] <= 1.1 * totals["sparsegpt"]


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(sparsity=1.0), r"sparsity must be in \[0, 1\)"),
        (dict(sparsity=-0.1), r"sparsity must be in \[0, 1\)"),
        (dict(sparsity="half"), "sparsity must be a number"),
        (dict(pattern="3:8", sparsity=0.5), "sparsity=0.625 or sparsity=None"),
        (dict(pattern="4:3"), "0 < N < M"),
        (dict(pattern="blocky"), "unknown pattern"),
        (dict(pattern="2:5", sparsity=None), "divisible by 5"),
        (dict(solver="obs"), "unknown solver"),
        (dict(uncertainty="box"), "unknown uncertainty"),
        (dict(uncertainty="cvar", radius=2.0), r"\(0, 1\]"),
        (dict(rounds=-1), "rounds"),
        (dict(solver="sparsegpt", solver_options={"blocksz": 64}), "its options are: block_size"),
        (dict(solver="sparsegpt", solver_options=[64]), "must be a dict or SparseGPTOptions"),
        (dict(solver="cap", solver_options={"blocksize": 64}), "'blocksize' for 'cap'; its options are: block_size"),
        (dict(damping=-1.0), "damping"),
    ],
)
def test_bad_arguments_raise_clear_errors(layer, kwargs, match):
    w, x = layer
    with pytest.raises(ValueError, match=match):
        prune_layer(w, x, **kwargs)


def test_solver_options_dataclass_dict_and_old_spelling_agree(layer):
    from robop_lightning.engine.solvers.options import CapOptions, SparseGPTOptions

    w, x = layer
    by_dict = prune_layer(w, x, solver="sparsegpt", uncertainty="baseline", solver_options={"block_size": 8})
    by_type = prune_layer(w, x, solver="sparsegpt", uncertainty="baseline", solver_options=SparseGPTOptions(block_size=8))
    with pytest.warns(DeprecationWarning, match="'blocksize' is now called 'block_size'"):
        old = prune_layer(w, x, solver="sparsegpt", uncertainty="baseline", solver_options={"blocksize": 8})
    default = prune_layer(w, x, solver="sparsegpt", uncertainty="baseline")
    assert torch.equal(by_dict.weight, by_type.weight) and torch.equal(by_dict.weight, old.weight)
    assert not torch.equal(by_dict.weight, default.weight)  # the option reached the solver (block 8, not 128)
    with pytest.raises(ValueError, match="CapOptions are not options of 'sparsegpt'; pass SparseGPTOptions"):
        prune_layer(w, x, solver="sparsegpt", solver_options=CapOptions())
    assert SparseGPTOptions().block_size == 128  # the solver's own default, read from its signature


def test_bad_tensors_raise_clear_errors(layer):
    w, x = layer
    bad = x.clone()
    bad[3, 1, 7] = float("nan")
    with pytest.raises(ValueError, match="NaN or Inf"):
        prune_layer(w, bad, name="blocks.0.fc1")
    bad[3, 1, 7] = float("inf")
    with pytest.raises(ValueError, match="blocks.0.fc1"):
        prune_layer(w, bad, name="blocks.0.fc1")
    wbad = w.clone()
    wbad[0, 0] = float("nan")
    with pytest.raises(ValueError, match="weight contains NaN"):
        prune_layer(wbad, x)
    with pytest.raises(ValueError, match="in_features=32"):
        prune_layer(w, x[..., :31])
    with pytest.raises(ValueError, match="2-D"):
        prune_layer(w[0], x)
    with pytest.raises(ValueError, match="empty"):
        prune_layer(w, x[:0])
    with pytest.raises(ValueError, match="shape"):
        prune_layer(w, x.unsqueeze(0))


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    m=st.integers(1, 9),
    groups=st.integers(1, 6),
    samples=st.integers(1, 6),
    sparsity=st.sampled_from([0.0, 0.3, 0.5, 0.9]),
    pattern=st.sampled_from(["unstructured", "row", "2:4", "1:4"]),
    solver=st.sampled_from(SOLVERS),
    uncertainty=st.sampled_from(SETS),
    seed=st.integers(0, 1000),
    tokens=st.integers(1, 3),
    scale=st.sampled_from([1e-15, 1.0, 1e15]),
    damping=st.sampled_from([0.0, 0.01]),
    dtype=st.sampled_from([torch.float32, torch.bfloat16]),
)
def test_property_exact_budget_finite_unmutated(
    m, groups, samples, sparsity, pattern, solver, uncertainty, seed, tokens, scale, damping, dtype
):
    """Any shape, budget, pattern, solver and set; rank-deficient, badly scaled or undamped Grams."""
    n = 4 * groups
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(m, n, generator=g).to(dtype)
    x = torch.randn(samples, tokens, n, generator=g) * scale
    w0, x0 = w.clone(), x.clone()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        r = prune_layer(w, x, sparsity=None if ":" in pattern else sparsity, pattern=pattern,
                        solver=solver, uncertainty=uncertainty, rounds=1, damping=damping)
    pat = parse_pattern(pattern, None if ":" in pattern else sparsity)
    assert pat.validate_mask(r.mask) and r.weight.dtype == dtype
    assert torch.isfinite(r.weight).all()
    assert math.isfinite(r.nominal_error) and math.isfinite(r.robust_error)
    assert bool((r.weight[~r.mask] == 0).all())
    assert torch.equal(w, w0) and torch.equal(x, x0)
    assert r.robust_error >= r.nominal_error


@pytest.mark.parametrize("solver", SOLVERS)
@pytest.mark.parametrize("pattern", ["unstructured", "row"])
def test_prior_mask_keeps_earlier_zeros_and_exact_budget(solver, pattern):
    """Gradual schedules: 50 % then 75 %, the second step never revives a pruned weight."""
    w, x = random_weight(12, 32, 7), correlated_inputs(24, 2, 32, 7)
    first = prune_layer(w, x, sparsity=0.5, pattern=pattern, solver=solver)
    second = prune_layer(first.weight, x, sparsity=0.75, pattern=pattern, solver=solver, prior_mask=first.mask)
    assert not bool((second.mask & ~first.mask).any())
    assert parse_pattern(pattern, 0.75).validate_mask(second.mask)
    assert bool((second.weight[~second.mask] == 0).all())
    # compensating for the earlier zeros beats ignoring them (solvers that update weights)
    if solver in ("sparsegpt", "alps", "cap"):
        fresh = prune_layer(first.weight, x, sparsity=0.75, pattern=pattern, solver=solver)
        assert second.nominal_error <= fresh.nominal_error * 1.5


def test_prior_mask_validation(layer):
    w, x = layer
    with pytest.raises(ValueError, match="bool tensor shaped like the weight"):
        prune_layer(w, x, prior_mask=torch.ones(3, 3, dtype=torch.bool))
    keep = torch.zeros_like(w, dtype=torch.bool)
    keep[:, :4] = True
    with pytest.raises(ValueError, match="must not lower the sparsity"):
        prune_layer(w, x, sparsity=0.5, prior_mask=keep)


@pytest.mark.parametrize("uncertainty,radius", [("minmax-trace", 0.05), ("minmax-e", 0.2), ("cvar", 0.25)])
def test_robust_solution_beats_nominal_solution_on_the_robust_objective(uncertainty, radius):
    """Averaged over seeds, pruning for the set lowers the set's worst-case loss vs pruning nominally."""
    from robop_lightning.engine.sets import make_uncertainty

    gains = []
    for seed in range(3):
        w, x = random_weight(24, 48, seed), correlated_inputs(32, 4, 48, seed)
        nominal = prune_layer(w, x, sparsity=0.6, solver="alps")
        robust = prune_layer(w, x, sparsity=0.6, solver="alps", uncertainty=uncertainty, radius=radius)
        s = make_uncertainty(uncertainty, radius, True)
        li = LayerInputs(x)
        s.prepare(li.gram(), li, 0.0)
        denom = quad(li.gram(), w)
        gains.append(s.robust_loss(w - nominal.weight) / denom - robust.robust_error)
    assert min(gains) >= -1e-9 and sum(gains) > 0


# --------------------------------------------------------------------------- bad input (issue 8)
def _degenerate(case: str) -> torch.Tensor:
    """Calibration inputs ``(samples, tokens, 32)`` of a 16 x 32 layer that make its Gram degenerate."""
    g = torch.Generator().manual_seed(0)
    if case == "constant":  # every token the same vector: a rank-1 Gram
        return torch.full((6, 3, 32), 0.7)
    if case == "constant-per-feature":  # every feature constant, different values: rank 1 again
        return torch.linspace(-2, 2, 32).expand(6, 3, 32).clone()
    if case == "single-sample":  # one sequence of 4 tokens: CTE has one sample, E no bootstrap
        return torch.randn(1, 4, 32, generator=g)
    if case == "single-row":  # one token in total
        return torch.randn(1, 32, generator=g)
    if case == "rank-deficient":  # 2 tokens, 32 features, 5 dead
        x = torch.randn(2, 1, 32, generator=g)
        x[..., :5] = 0
        return x
    if case == "near-singular":  # rank 2 up to 1e-9 noise
        return torch.randn(10, 4, 2, generator=g) @ torch.randn(2, 32, generator=g) + 1e-9 * torch.randn(
            10, 4, 32, generator=g
        )
    if case == "tiny-scale":  # a Gram of ~1e-70: its inverse overflows float32
        return correlated_inputs(8, 2, 32, 0) * 1e-35
    if case == "huge-scale":  # a Gram of ~1e60: overflows float32
        return correlated_inputs(8, 2, 32, 0) * 1e30
    raise AssertionError(case)


CASES = [
    "constant", "constant-per-feature", "single-sample", "single-row", "rank-deficient", "near-singular",
    "tiny-scale", "huge-scale",
]


@pytest.mark.usefixtures("one_thread")  # as in test_bad_input.py, where it applied to the whole module
@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("solver", SOLVERS)
def test_degenerate_calibration_data_works_for_every_set(case, solver):
    """Constant data, one sample (CTE over a single sample), rank-deficient, near-singular and
    badly scaled Grams: exact budget, finite weights, nothing mutated, for every set and pattern."""
    w = random_weight(16, 32, 0)
    x = _degenerate(case)
    w0, x0 = w.clone(), x.clone()
    for uncertainty in SETS:
        for pattern, sparsity in (("unstructured", 0.6), ("row", 0.5), ("2:4", None)):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)  # raised damping is reported, not an error
                r = prune_layer(w, x, sparsity=sparsity, pattern=pattern, solver=solver, uncertainty=uncertainty,
                                rounds=2, name="blocks.0.fc1")
            where = (case, solver, uncertainty, pattern)
            assert parse_pattern(pattern, sparsity).validate_mask(r.mask), where
            assert torch.isfinite(r.weight).all() and bool((r.weight[~r.mask] == 0).all()), where
            assert 0 <= r.nominal_error <= r.robust_error < float("inf"), where
            assert torch.equal(w, w0) and torch.equal(x, x0), where


@pytest.mark.usefixtures("one_thread")  # as in test_bad_input.py, where it applied to the whole module
def test_all_zero_inputs_warn_once_per_layer_for_every_solver_and_set():
    w = random_weight(4, 8, 2)
    expected = parse_pattern("unstructured", 0.5).select(w.abs())
    for solver in SOLVERS:
        for uncertainty in SETS:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                r = prune_layer(w, torch.zeros(3, 2, 8), sparsity=0.5, solver=solver, uncertainty=uncertainty,
                                name="fc")
            assert [str(c.message)[:36] for c in caught] == ["fc: all calibration inputs are zero;"]
            assert torch.equal(r.mask, expected) and torch.equal(r.weight, w * expected), (solver, uncertainty)


@pytest.mark.usefixtures("one_thread")  # as in test_bad_input.py, where it applied to the whole module
@pytest.mark.parametrize(
    "weight_dtype,input_dtype",
    [
        (torch.bfloat16, torch.float32),
        (torch.float16, torch.bfloat16),
        (torch.float32, torch.float16),
        (torch.float64, torch.bfloat16),
    ],
)
def test_mismatched_dtypes_work(weight_dtype, input_dtype):
    """The Gram is always float64 and the result takes the weight's dtype, whatever the inputs'."""
    w, x = random_weight(16, 32, 3).to(weight_dtype), correlated_inputs(8, 4, 32, 3).to(input_dtype)
    for solver in SOLVERS:
        r = prune_layer(w, x, sparsity=0.5, solver=solver, uncertainty="cvar", heldout=x[:2].double())
        assert r.weight.dtype == weight_dtype and int(r.mask.sum()) == 256
        assert torch.isfinite(r.weight).all() and bool((r.weight[~r.mask] == 0).all())
        assert r.heldout_error is not None and r.heldout_error >= 0


@pytest.mark.usefixtures("one_thread")  # as in test_bad_input.py, where it applied to the whole module
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_mismatched_devices_work():
    """Weight on the GPU, inputs on the CPU (how prune_model keeps activations): result on the GPU."""
    w, x = random_weight(16, 32, 3).cuda(), correlated_inputs(8, 4, 32, 3)
    for solver in SOLVERS:
        for uncertainty in SETS:
            r = prune_layer(w, x, sparsity=0.5, solver=solver, uncertainty=uncertainty)
            assert r.weight.device == w.device and r.mask.device == w.device and int(r.mask.sum()) == 256
            ref = prune_layer(w.cpu(), x, sparsity=0.5, solver=solver, uncertainty=uncertainty)
            assert (r.mask.cpu() != ref.mask).float().mean() < 0.05


@pytest.mark.usefixtures("one_thread")  # as in test_bad_input.py, where it applied to the whole module
@pytest.mark.parametrize("solver", SOLVERS)
@pytest.mark.parametrize("uncertainty", SETS)
def test_sparsity_zero_and_099(solver, uncertainty):
    w, x = random_weight(16, 32, 4), correlated_inputs(8, 4, 32, 4)
    r = prune_layer(w, x, sparsity=0.0, solver=solver, uncertainty=uncertainty)
    assert bool(r.mask.all()) and torch.equal(r.weight, w) and r.nominal_error == 0 and r.sparsity == 0
    r = prune_layer(w, x, sparsity=0.99, solver=solver, uncertainty=uncertainty)
    assert int(r.mask.sum()) == 5  # round(0.01 * 512)
    assert torch.isfinite(r.weight).all() and int((r.weight != 0).sum()) <= 5
    r = prune_layer(w, x, sparsity=0.99, pattern="row", solver=solver, uncertainty=uncertainty)
    assert int(r.mask.sum()) == 0 and bool((r.weight == 0).all())  # round(0.32) = 0 per row: all zero


# --------------------------------------------------------------------------- pattern='structured'
@pytest.mark.usefixtures("one_thread")  # as in test_structured.py, where it applied to the whole module
def test_prune_layer_structured_zeroes_whole_columns():
    x, g = _correlated(128, 16, 5)
    w = torch.randn(8, 16, generator=g)
    r = prune_layer(w, x.float(), sparsity=0.25, pattern="structured", uncertainty="trace")
    assert int((r.mask.sum(0) == 0).sum()) == 4 and bool((r.mask == r.mask[:1]).all())
    assert bool((r.weight[~r.mask] == 0).all()) and r.pattern == "structured"


# --------------------------------------------------------------------------- Llama-7B-sized layers (slow; run with -m slow)
@pytest.mark.slow
@pytest.mark.parametrize("solver", ["magnitude", "wanda", "sparsegpt"])
def test_down_proj_sized_layer(solver):
    g = torch.Generator().manual_seed(0)
    w = torch.randn(4096, 11008, generator=g, dtype=torch.bfloat16)
    x = torch.randn(8, 64, 11008, generator=g, dtype=torch.bfloat16)  # 512 tokens: a rank-deficient Gram
    x[..., :16] = 0  # dead inputs
    r = prune_layer(w, x, sparsity=0.5, solver=solver, uncertainty="baseline")
    assert r.weight.dtype == torch.bfloat16 and int(r.mask.sum()) == w.numel() // 2
    assert torch.isfinite(r.weight.float()).all() and 0 < r.nominal_error < 1


@pytest.mark.slow
def test_alps_and_cte_on_a_4096_wide_layer():
    g = torch.Generator().manual_seed(1)
    w = torch.randn(512, 4096, generator=g)
    x = torch.randn(16, 64, 4096, generator=g)
    r = prune_layer(w, x, sparsity=0.5, solver="alps", uncertainty="cvar", rounds=1,
                    solver_options={"max_iter": 30})
    assert int(r.mask.sum()) == w.numel() // 2 and r.robust_error >= r.nominal_error > 0
