"""robop_lightning.engine.damping: a singular Gram gets its damping raised once, with a warning; diagonal solvers need none."""

from __future__ import annotations

import warnings

import pytest
import torch

from robop_lightning import prune_layer
from tests.engine_helpers import random_weight

pytestmark = pytest.mark.usefixtures("one_thread")  # many small solves: ~50x faster than two busy threads

SETS = ["baseline", "trace", "e", "cte", "minmax-trace", "minmax-e", "cvar"]


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
