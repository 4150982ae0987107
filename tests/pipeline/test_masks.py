"""robop_lightning.pipeline.masks: SparsityMasks hold zeros through training and round-trip bit-packed."""

from __future__ import annotations

import pytest
import torch

from tests.engine_helpers import MLP


def test_masks_hold_zeros_through_momentum_and_unmasked_gradients():
    from robop_lightning.pipeline.masks import SparsityMasks

    torch.manual_seed(0)
    mlp = MLP()
    opt = torch.optim.SGD(mlp.parameters(), lr=0.1, momentum=0.9, weight_decay=0.01)
    for _ in range(3):  # dense steps: every weight has momentum now
        mlp(torch.randn(8, 16)).pow(2).mean().backward()
        opt.step()
        opt.zero_grad()
    mask = torch.rand(mlp.fc1.weight.shape) > 0.5
    masks = SparsityMasks({"fc1": mask})
    masks.attach(mlp, [opt])
    assert bool((opt.state[mlp.fc1.weight]["momentum_buffer"][~mask] == 0).all())
    for _ in range(3):
        mlp(torch.randn(8, 16)).pow(2).mean().backward()
        assert bool((mlp.fc1.weight.grad[~mask] == 0).all())  # masked after accumulation
        mlp.fc1.weight.grad += 1.0  # something else writes the pruned gradients: the step post-hook still wins
        opt.step()
        opt.zero_grad()
        assert bool((mlp.fc1.weight[~mask] == 0).all()) and bool((mlp.fc1.weight[mask] != 0).all())
    assert masks.holds(mlp) and masks.sparsity() == pytest.approx(1 - float(mask.float().mean()))
    masks.detach()
    assert not opt._optimizer_step_post_hooks and not mlp.fc1.weight._post_accumulate_grad_hooks
    mlp(torch.randn(8, 16)).pow(2).mean().backward()
    opt.step()
    assert not masks.holds(mlp)  # detached: nothing holds the zeros any more
    with pytest.raises(ValueError, match="different model"):
        SparsityMasks({"fc2": mask}).attach(mlp)


def test_masks_state_dict_is_bit_packed_and_round_trips():
    from robop_lightning.pipeline.masks import SparsityMasks

    g = torch.Generator().manual_seed(0)
    masks = SparsityMasks({"a": torch.rand(3, 5, generator=g) > 0.5, "b": torch.rand(32, 16, generator=g) > 0.3})
    state = masks.state_dict()
    assert state["a"]["bits"].dtype == torch.uint8 and state["a"]["bits"].numel() == 2  # 15 bits -> 2 bytes
    assert state["b"]["bits"].numel() == 64
    again = SparsityMasks.from_state_dict(state)
    assert all(torch.equal(again[n], masks[n]) for n in ("a", "b"))
    assert again.digest() == masks.digest()  # what DDP ranks compare
    flipped = again.to_dict()
    flipped["b"][0, 0] = ~flipped["b"][0, 0]
    assert SparsityMasks(flipped).digest() != masks.digest()


def test_masks_find_modules_behind_wrappers():
    """Names are matched without the wrappers FSDP1 and activation checkpointing insert."""
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

    from robop_lightning.pipeline.masks import SparsityMasks

    torch.manual_seed(0)
    mlp = MLP()
    mask = torch.rand(mlp.fc1.weight.shape) > 0.5
    mlp.fc1 = checkpoint_wrapper(mlp.fc1)  # fc1 -> fc1._checkpoint_wrapped_module
    masks = SparsityMasks({"fc1": mask})
    masks.attach(mlp)
    inner = mlp.fc1._checkpoint_wrapped_module.weight
    assert bool((inner[~mask] == 0).all()) and bool((inner[mask] != 0).all()) and masks.holds(mlp)
    masks.detach()
    with pytest.raises(ValueError, match="fc3 .masked. is not a module"):
        SparsityMasks({"fc3": mask}).attach(mlp)
