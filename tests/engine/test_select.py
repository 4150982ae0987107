"""The exact k-th value selection behind the solvers' masks: the radix select against a sort, and the
solvers' masks and weights unchanged when it replaces NumPy's introselect."""

from __future__ import annotations

import importlib

import pytest
import torch

from robop_lightning.engine.patterns import parse_pattern
from robop_lightning.engine.solvers._select import kth_smallest, radix_kth_smallest
from tests.engine.test_solvers import _damped
from tests.engine_helpers import correlated_inputs, random_weight


def _awkward(n: int, dtype: torch.dtype, seed: int) -> torch.Tensor:
    """Values with many ties, both zeros, both infinities, subnormals and a wide range of exponents."""
    g = torch.Generator().manual_seed(seed)
    spread = torch.exp(4 * torch.randn(n, generator=g, dtype=torch.float64))
    x = torch.randn(n, generator=g, dtype=torch.float64) * spread
    x[: n // 4] = x[: n // 4].round()  # ties
    x[n // 4 : n // 4 + 5] = -0.0
    x[n // 4 + 5 : n // 4 + 9] = 0.0
    x[-3:] = torch.tensor([float("inf"), -float("inf"), 1e-310])
    return x[torch.randperm(n, generator=g)].to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("seed", range(3))
def test_radix_select_returns_the_kth_value_of_a_sort(dtype, seed):
    x = _awkward(1500 + 97 * seed, dtype, seed)
    ordered = x.sort().values
    for k in (1, 2, 400, 750, 1499, x.numel()):
        got = radix_kth_smallest(x, k)
        assert got.dtype == dtype and got.shape == ()
        assert float(got) == float(ordered[k - 1]), (k, got, ordered[k - 1])
        assert float(kth_smallest(x, k)) == float(ordered[k - 1])


def test_radix_select_orders_nan_last_as_numpy_does():
    x = torch.tensor([2.0, float("nan"), -1.0, 3.0])
    assert [float(radix_kth_smallest(x, k)) for k in (1, 2, 3)] == [-1.0, 2.0, 3.0]
    assert torch.isnan(radix_kth_smallest(x, 4))


def test_kth_smallest_rejects_a_count_outside_the_tensor():
    with pytest.raises(ValueError, match="outside"):
        kth_smallest(torch.ones(3), 4)
    with pytest.raises(ValueError, match="outside"):
        kth_smallest(torch.ones(3), 0)


@pytest.mark.parametrize("solver", ["alps", "sparsegpt"])
def test_solvers_give_the_same_result_with_the_radix_select(solver, monkeypatch):
    """The accelerator's selection (forced here on the CPU) returns the same threshold as NumPy's, so
    masks and weights are bit-identical."""
    x = correlated_inputs(96, 3, 80, 7)
    h = _damped(x)
    w = random_weight(48, 80, 7)
    pattern = parse_pattern("unstructured", 0.6)
    module = importlib.import_module(f"robop_lightning.engine.solvers.{solver}")
    fn = getattr(module, solver)
    w_cpu, keep_cpu = fn(w, h, pattern)
    calls = []

    def radix(values, k):
        calls.append(k)
        return radix_kth_smallest(values, k)

    monkeypatch.setattr(importlib.import_module("robop_lightning.engine.solvers._select"), "kth_smallest", radix)
    w_radix, keep_radix = fn(w, h, pattern)
    assert calls, "the solver did not select through kth_smallest"
    assert torch.equal(keep_cpu, keep_radix) and torch.equal(w_cpu, w_radix)
    assert int(keep_cpu.sum()) == pattern.keep_count(48, 80)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_radix_select_on_cuda_equals_kthvalue():
    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(3_000_000, device="cuda", generator=g).abs()
    x[:1000] = x[1000:2000]  # ties
    for k in (1, 1_500_000, 2_999_999):
        assert float(kth_smallest(x, k)) == float(torch.kthvalue(x, k).values)
