"""Llama-7B-sized layers (4096 x 11008): the engine works at real sizes (slow; run with -m slow)."""

from __future__ import annotations

import pytest
import torch

from robop_lightning import prune_layer


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
