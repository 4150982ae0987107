"""robop_lightning.config: every argument of a pruning job is checked up front, the model left untouched."""

from __future__ import annotations

import pytest
import torch

from robop_lightning.pipeline.prune import prune_model
from tests.engine_helpers import clone_state, images, tiny_vit


def test_input_validation():
    vit = tiny_vit()
    before = clone_state(vit)
    with pytest.raises(ValueError, match="calibration is empty"):
        prune_model(vit, [], solver="wanda")
    with pytest.raises(ValueError, match="unknown solver"):
        prune_model(vit, images(1), solver="obs")
    with pytest.raises(ValueError, match="sparsity"):
        prune_model(vit, images(1), sparsity=1.5)
    with pytest.raises(TypeError, match="unexpected keyword"):
        prune_model(vit, images(1), solver="wanda", blocksize=3)
    with pytest.raises(ValueError, match="heldout_fraction"):
        prune_model(vit, images(1), solver="wanda", uncertainty="baseline", heldout_fraction=0.9)
    after = vit.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
