"""robop_lightning.engine.gram: LayerInputs reduces activations to Grams in chunks and bootstraps the ellipsoid radius."""

from __future__ import annotations

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
