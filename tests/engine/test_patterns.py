"""robop_lightning.engine.patterns: an N:M pattern on a layer narrower than its group names the layer and the fix."""

from __future__ import annotations

import pytest
import torch

from robop_lightning import prune_layer
from tests.engine_helpers import random_weight

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("pattern,cols", [("2:4", 2), ("2:4", 6), ("8:16", 12)])
def test_layer_narrower_than_nm_group_names_layer_and_fix(pattern, cols):
    w, x = random_weight(4, cols, 5), torch.randn(3, cols)
    match = rf"needs in_features divisible by {pattern.split(':')[1]}, but blocks\.1\.proj has in_features={cols}\. " \
            r"Use pattern='unstructured' or 'row' for this layer, or leave it out of the targets"
    with pytest.raises(ValueError, match=match):
        prune_layer(w, x, pattern=pattern, name="blocks.1.proj")
