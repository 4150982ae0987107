"""robop_lightning.engine.gram: LayerInputs reduces activations to Grams in chunks and bootstraps the ellipsoid radius."""

from __future__ import annotations

import pytest
import torch

import robop_lightning.engine.gram as gram_module
from robop_lightning.engine.gram import LayerInputs
from tests.engine_helpers import correlated_inputs


def test_chunked_gram_equals_direct(monkeypatch):
    x = correlated_inputs(37, 5, 24, 4)
    direct = (x.reshape(-1, 24).double().T @ x.reshape(-1, 24).double())
    monkeypatch.setattr(gram_module, "_CHUNK_ELEMENTS", 24 * 5 * 3)  # 3 samples per chunk
    li = LayerInputs(x)
    assert list(li._sample_chunks())[:2] == [(0, 3), (3, 6)]
    assert torch.allclose(li.gram(), direct, rtol=1e-5)


def test_bootstrap_radius_shrinks_with_more_samples():
    few = LayerInputs(correlated_inputs(8, 4, 12, 0)).bootstrap_radius()
    many = LayerInputs(correlated_inputs(512, 4, 12, 0)).bootstrap_radius()
    assert 0 < many < few
    assert LayerInputs(correlated_inputs(1, 4, 12, 0)).bootstrap_radius() == 0.0


@pytest.mark.parametrize("shape", [(5, 5), (300, 300), (3, 530, 530)])
def test_symmetrized_in_tiles_equals_the_whole_transposed_sum(shape):
    """The CPU's in-place tiled symmetrisation gives (H + H^T) / 2 exactly, for one Gram or a stack of them
    (widths below, at and across the tile of 256)."""
    from robop_lightning.engine.gram import _symmetrized

    h = torch.randn(*shape, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    expected = 0.5 * (h + h.transpose(-1, -2))
    out = _symmetrized(h)
    assert out is h and torch.equal(out, expected)
