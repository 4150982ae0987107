"""Bad input, everywhere (issue 8): each case either works (exact sparsity, finite weights, inputs
untouched) or raises ``ValueError`` naming the layer and the fix. Engine level first, then prune_model."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

from robop_lightning import prune_layer
from robop_lightning.model import prune_model
from robop_lightning.patterns import parse_pattern
from tests.engine_helpers import correlated_inputs, random_weight

pytestmark = pytest.mark.usefixtures("one_thread")  # many small solves: ~50x faster than two busy threads

SOLVERS = ["alps", "cap", "sparsegpt", "wanda", "magnitude"]
SETS = ["baseline", "trace", "e", "cte", "minmax-trace", "minmax-e", "cvar"]


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


# --------------------------------------------------------------------------- engine: degenerate data
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


@pytest.mark.parametrize("solver", ["alps", "cap", "sparsegpt"])
@pytest.mark.parametrize("uncertainty", SETS)
def test_singular_gram_raises_damping_once_and_says_so(solver, uncertainty):
    """No damping on a rank-2 Gram: the damping is increased automatically, one warning per layer
    names the layer and both values, and the result reports the damping actually used."""
    w, x = random_weight(8, 16, 1), torch.randn(2, 1, 16, generator=torch.Generator().manual_seed(1))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        # no damping at all: damping=0 for the extension, gamma=0 for the authors' sets (their D replaces it)
        zero = dict(damping=0.0) if uncertainty in ("minmax-trace", "minmax-e", "cvar") else dict(radius=0.0)
        r = prune_layer(w, x, sparsity=0.5, solver=solver, uncertainty=uncertainty, name="blocks.3.fc2", **zero)
    messages = [str(c.message) for c in caught if issubclass(c.category, RuntimeWarning)]
    assert len(messages) == 1, messages
    assert messages[0].startswith("blocks.3.fc2: the damped Gram was not positive definite; damping raised from 0 to ")
    assert "larger `damping`" in messages[0]
    assert r.damping > 0 and f"{r.damping:.3g}" in messages[0]
    assert int(r.mask.sum()) == 64 and torch.isfinite(r.weight).all()


@pytest.mark.parametrize("solver", ["wanda", "magnitude"])
def test_diagonal_solvers_need_no_damping(solver):
    w, x = random_weight(8, 16, 1), torch.randn(2, 1, 16, generator=torch.Generator().manual_seed(1))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no warning at all
        r = prune_layer(w, x, sparsity=0.5, solver=solver, damping=0.0)
    assert r.damping == 0 and int(r.mask.sum()) == 64


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


# --------------------------------------------------------------------------- engine: dtypes, devices, budgets
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


@pytest.mark.parametrize("pattern,cols", [("2:4", 2), ("2:4", 6), ("8:16", 12)])
def test_layer_narrower_than_nm_group_names_layer_and_fix(pattern, cols):
    w, x = random_weight(4, cols, 5), torch.randn(3, cols)
    match = rf"needs in_features divisible by {pattern.split(':')[1]}, but blocks\.1\.proj has in_features={cols}\. " \
            r"Use pattern='unstructured' or 'row' for this layer, or leave it out of the targets"
    with pytest.raises(ValueError, match=match):
        prune_layer(w, x, pattern=pattern, name="blocks.1.proj")


# --------------------------------------------------------------------------- prune_model
class Net(nn.Module):
    """fc1 -> dropout -> fc2 -> head, no repeated blocks (pruned linear by linear)."""

    def __init__(self, hidden: int = 32, bias: bool = True, p: float = 0.0) -> None:
        super().__init__()
        self.fc1 = nn.Linear(16, hidden, bias=bias)
        self.drop = nn.Dropout(p)
        self.fc2 = nn.Linear(hidden, 16, bias=bias)
        self.head = nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.fc2(self.drop(torch.relu(self.fc1(x))))))


def _net(**kwargs) -> Net:
    torch.manual_seed(0)
    return Net(**kwargs)


def _batches(n: int = 3, size: int = 8, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(size, 16, generator=g) for _ in range(n)]


def _state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _unchanged(model: nn.Module, before: dict[str, torch.Tensor]) -> bool:
    after = model.state_dict()
    return after.keys() == before.keys() and all(torch.equal(after[k], v) for k, v in before.items())


def _tiny_llama(tie: bool) -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=64, tie_word_embeddings=tie)
    return LlamaForCausalLM(config).eval()


def _token_batches() -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    return [{"input_ids": torch.randint(0, 64, (2, 8), generator=g)} for _ in range(2)]


@pytest.mark.parametrize(
    "case,calibration",
    [
        ("constant", [torch.ones(8, 16)] * 2),
        ("all-zero", [torch.zeros(8, 16)] * 2),
        ("single sample", [torch.randn(1, 16, generator=torch.Generator().manual_seed(0))]),
        ("single unbatched sample", [torch.randn(16, generator=torch.Generator().manual_seed(0))]),
        ("batches of different sizes", [torch.randn(1, 16), torch.randn(7, 16)]),
    ],
)
@pytest.mark.parametrize("solver,uncertainty", [("cap", "cvar"), ("alps", "minmax-e"), ("sparsegpt", "minmax-trace"), ("alps", "e"), ("cap", "trace")])
def test_prune_model_on_degenerate_calibration_works(case, calibration, solver, uncertainty):
    model = _net()
    data = [b.clone() for b in calibration]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        report = prune_model(model, data, sparsity=0.5, solver=solver, uncertainty=uncertainty, progress=False)
    assert all(torch.equal(a, b) for a, b in zip(data, calibration))  # batches untouched
    assert [r["name"] for r in report.layers] == ["fc1", "fc2"]
    for name, mask in report.masks.items():
        weight = model.get_submodule(name).weight
        assert int(mask.sum()) == weight.numel() // 2 and torch.isfinite(weight).all()
        assert bool((weight[~mask] == 0).all())


@pytest.mark.parametrize("sparsity", [0.0, 0.99])
def test_prune_model_sparsity_zero_and_099(sparsity):
    model = _net()
    before = _state(model)
    report = prune_model(model, _batches(), sparsity=sparsity, solver="cap", uncertainty="cvar", progress=False)
    if sparsity == 0.0:
        assert _unchanged(model, before) and all(bool(m.all()) for m in report.masks.values())
    else:
        for name, mask in report.masks.items():
            weight = model.get_submodule(name).weight
            assert int(mask.sum()) == round(0.01 * weight.numel()) == int((weight != 0).sum())  # 5 of 512


@pytest.mark.parametrize(
    "where,make_bad",
    [
        ("fc1", lambda model, data: data[1].__setitem__((3, 2), float("nan"))),
        ("fc1", lambda model, data: data[0].__setitem__((0, 0), float("inf"))),
        ("fc2", lambda model, data: model.drop.register_forward_hook(lambda m, i, out: out.masked_fill(out > 0, float("inf")))),
    ],
    ids=["nan-in-batch", "inf-in-batch", "inf-activation"],
)
def test_nan_inf_names_the_layer_and_restores_weights(where, make_bad):
    model, data = _net(), _batches()
    before = _state(model)
    make_bad(model, data)
    with pytest.raises(ValueError, match=rf"^{where}: calibration inputs contains NaN or Inf values.*calibrate in float32"):
        prune_model(model, data, solver="sparsegpt", uncertainty="cvar", progress=False)
    assert _unchanged(model, before)


def test_layer_narrower_than_nm_group_fails_before_any_work():
    """A 2-wide layer under 2:4: refused up front with the layer's name and the fix, no forward run."""

    class Narrow(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc1, self.fc2, self.head = nn.Linear(16, 2), nn.Linear(2, 8), nn.Linear(8, 4)

        def forward(self, x):
            return self.head(self.fc2(self.fc1(x)))

    model = Narrow()
    before = _state(model)
    calls = []
    model.register_forward_pre_hook(lambda m, a: calls.append(1))
    with pytest.raises(ValueError, match=r"but fc2 has in_features=2\. Use pattern='unstructured' or 'row'"):
        prune_model(model, _batches(), pattern="2:4", sparsity=None, solver="alps", uncertainty="cvar")
    assert calls == [] and _unchanged(model, before)
    report = prune_model(model, _batches(), pattern="2:4", sparsity=None, solver="alps", ignore=["fc2"])
    assert list(report.masks) == ["fc1"] and bool((report.masks["fc1"].view(2, 4, 4).sum(-1) == 2).all())


def test_tied_embedding_and_lm_head():
    """lm_head tied to the embedding: targeting it is refused (it would prune the embedding too);
    the default targets (the blocks) prune fine and leave the tied pair untouched."""
    model = _tiny_llama(tie=True)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    before = _state(model)
    with pytest.raises(
        ValueError,
        match=r"^lm_head: its weight is tied to model\.embed_tokens\.weight .*Leave lm_head out of the targets, or "
        r"untie the weights first .*tie_word_embeddings=False",
    ):
        prune_model(model, _token_batches(), targets=["lm_head"], solver="sparsegpt", uncertainty="cvar")
    assert _unchanged(model, before)
    report = prune_model(model, _token_batches(), solver="sparsegpt", uncertainty="cvar", progress=False)
    assert len(report.masks) == 14 and report.totals["sparsity"] == pytest.approx(0.5)
    assert torch.equal(model.model.embed_tokens.weight, before["model.embed_tokens.weight"])
    assert model.lm_head.weight is model.model.embed_tokens.weight
    # untied (the stock fix): lm_head prunes, the embedding keeps every entry
    untied = _tiny_llama(tie=False)
    report = prune_model(untied, _token_batches(), targets=["lm_head"], solver="sparsegpt", uncertainty="cvar")
    assert int(report.masks["lm_head"].sum()) == 64 * 32 // 2
    assert not bool((untied.model.embed_tokens.weight == 0).any())


def test_weights_shared_between_layers():
    model = _net(hidden=16)
    model.fc2.weight = model.fc1.weight  # both 16 x 16, one tensor
    before = _state(model)
    with pytest.raises(
        ValueError,
        match=r"^fc1: its weight is the same tensor as fc2\.weight \(weights shared between layers\).*Untie them "
        r"first .*ignore=\['fc1', 'fc2'\]",
    ):
        prune_model(model, _batches(), solver="cap", uncertainty="cvar")
    assert _unchanged(model, before)
    with pytest.raises(ValueError, match=r"^fc1: its weight is tied to fc2\.weight"):  # one of the two: still shared
        prune_model(model, _batches(), solver="cap", uncertainty="cvar", ignore=["fc2"])
    report = prune_model(model, _batches(), solver="cap", uncertainty="cvar", ignore=["fc1", "fc2"], targets=["head"])
    assert list(report.masks) == ["head"] and torch.equal(model.fc1.weight, before["fc1.weight"])
    model.fc2.weight = nn.Parameter(model.fc1.weight.detach().clone())  # untied: both prune
    report = prune_model(model, _batches(), solver="cap", uncertainty="cvar")
    assert list(report.masks) == ["fc1", "fc2"] and not torch.equal(report.masks["fc1"], report.masks["fc2"])


@pytest.mark.parametrize("solver,uncertainty", [("alps", "cvar"), ("wanda", "baseline")])
def test_modules_without_bias(solver, uncertainty):
    model = _net(bias=False)
    report = prune_model(model, _batches(), solver=solver, uncertainty=uncertainty, progress=False)
    assert model.fc1.bias is None and report.totals["sparsity"] == pytest.approx(0.5)
    assert all(torch.isfinite(model.get_submodule(n).weight).all() for n in report.masks)


def test_frozen_parameters_are_pruned_and_stay_frozen():
    from robop_lightning.masks import SparsityMasks

    model = _net()
    model.fc1.requires_grad_(False)
    report = prune_model(model, _batches(), solver="sparsegpt", uncertainty="cvar", progress=False)
    assert not model.fc1.weight.requires_grad and model.fc2.weight.requires_grad
    assert int(report.masks["fc1"].sum()) == 256 and bool((model.fc1.weight[~report.masks["fc1"]] == 0).all())
    # fine-tuning the rest: the frozen layer has no gradient hook, its zeros stay and so do fc2's
    masks = SparsityMasks(report.masks)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.1, weight_decay=0.1)
    masks.attach(model, [opt])
    for x in _batches():
        model(x).pow(2).sum().backward()
        opt.step()
        opt.zero_grad()
    assert masks.holds(model)
    masks.detach()


def test_train_mode_with_dropout_calibrates_in_eval_mode():
    """Dropout (p=0.5) in train mode would make calibration random: prune_model runs the model in
    eval mode (the same result as an eval-mode model, every time) and restores train mode."""
    results = []
    for train in (True, True, False):
        model = _net(p=0.5).train(train)
        torch.manual_seed(len(results))  # a different dropout stream each time: it must not matter
        report = prune_model(model, _batches(), solver="cap", uncertainty="cvar", progress=False)
        assert all(m.training == train for m in model.modules())
        results.append((_state(model), report.masks))
    for state, masks in results[1:]:
        assert all(torch.equal(state[k], results[0][0][k]) for k in state)
        assert all(torch.equal(masks[n], results[0][1][n]) for n in masks)


@pytest.mark.parametrize(
    "model_dtype,data_dtype", [(torch.bfloat16, torch.float32), (torch.float32, torch.float64)]
)
def test_calibration_dtype_mismatch_names_layer_and_fix(model_dtype, data_dtype):
    model = _net().to(model_dtype)
    before = _state(model)
    have, want = str(data_dtype)[6:], str(model_dtype)[6:]
    with pytest.raises(
        ValueError,
        match=rf"^fc1: the model's forward failed on a calibration batch \(.*\)\. The batch holds {have} tensors but "
        rf"the layers to prune are {want}: cast the calibration data to the model's dtype \(batch\.to\(torch\.{want}\)\)",
    ):
        prune_model(model, [b.to(data_dtype) for b in _batches()], solver="cap", uncertainty="cvar")
    assert _unchanged(model, before)
    report = prune_model(model, [b.to(model_dtype) for b in _batches()], solver="cap", uncertainty="cvar")
    assert model.fc1.weight.dtype == model_dtype and report.totals["sparsity"] == pytest.approx(0.5)
    assert all(torch.isfinite(model.get_submodule(n).weight).all() for n in report.masks)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cpu_batches_for_a_gpu_model_are_moved():
    model = _net().cuda()
    ref = copy.deepcopy(model).cpu()
    report = prune_model(model, _batches(), solver="sparsegpt", uncertainty="cvar", progress=False)
    ref_report = prune_model(ref, _batches(), solver="sparsegpt", uncertainty="cvar", progress=False)
    assert model.fc1.weight.is_cuda and report.masks["fc1"].device.type == "cpu"
    for name, mask in report.masks.items():
        assert (mask != ref_report.masks[name]).float().mean() < 0.05
