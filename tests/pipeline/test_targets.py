"""robop_lightning.pipeline.targets: finding a model's repeated blocks and resolving the target linears."""

from __future__ import annotations

import pytest

from robop_lightning.pipeline.targets import find_blocks, resolve_targets
from tests.engine_helpers import MLP, linear_names, tiny_llama, tiny_vit


def test_block_discovery_and_default_targets():
    vit, llama, mlp = tiny_vit(), tiny_llama(), MLP()
    name, blocks = find_blocks(vit)
    assert name == "blocks" and [b for b, _ in blocks] == ["blocks.0", "blocks.1"]
    name, blocks = find_blocks(llama)
    assert name == "model.layers" and len(blocks) == 2
    assert find_blocks(mlp) is None

    vit_targets = resolve_targets(vit, None, None, ["blocks.0", "blocks.1"])
    assert vit_targets == [n for n in linear_names(vit) if n.startswith("blocks.")]
    assert len(vit_targets) == 8 and "head" not in vit_targets
    assert resolve_targets(mlp, None, None, None) == ["fc1", "fc2"]  # head left dense
    assert resolve_targets(vit, ["re:mlp"], ["blocks.1"], None) == ["blocks.0.mlp.fc1", "blocks.0.mlp.fc2"]
    with pytest.raises(ValueError, match="matches no nn.Linear"):
        resolve_targets(vit, ["blocks.7"], None, None)
    with pytest.raises(ValueError, match="ignore entry"):
        resolve_targets(vit, None, ["re:nothing_like_this"], ["blocks.0"])
    with pytest.raises(ValueError, match="not a submodule"):
        find_blocks(vit, "encoder.layers")
