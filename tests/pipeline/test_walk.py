"""robop_lightning.pipeline.walk: the block walk's undo transaction, error naming, eval mode and train-mode restore."""

from __future__ import annotations

import pytest
import torch

from robop_lightning.pipeline.prune import prune_model
from tests.engine_helpers import _batches, _net, _state, _unchanged, clone_state, images, no_hooks_left, tiny_vit


def test_nan_activations_leave_every_weight_bit_identical():
    vit, batches = tiny_vit(), images(2)
    before = clone_state(vit)
    vit.blocks[1].mlp.act.register_forward_hook(lambda m, i, out: out * float("nan"))
    with pytest.raises(ValueError, match=r"blocks\.1\.mlp\.fc2") as info:
        prune_model(vit, batches, solver="sparsegpt", uncertainty="baseline")
    assert "NaN" in str(info.value)
    after = vit.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    vit.blocks[1].mlp.act._forward_hooks.clear()
    assert no_hooks_left(vit)


def test_keyboard_interrupt_restores_weights():
    vit, batches = tiny_vit(), images(2)
    before = clone_state(vit)

    def interrupt(module, args):
        raise KeyboardInterrupt

    handle = vit.blocks[1].register_forward_pre_hook(interrupt)
    with pytest.raises(KeyboardInterrupt):
        prune_model(vit, batches, solver="wanda", uncertainty="baseline")
    handle.remove()
    after = vit.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert no_hooks_left(vit)


def test_training_mode_restored():
    vit = tiny_vit().train()
    prune_model(vit, images(1), solver="magnitude", uncertainty="baseline")
    assert all(m.training for m in vit.modules())


@pytest.mark.usefixtures("one_thread")  # as in test_bad_input.py, where it applied to the whole module
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


@pytest.mark.usefixtures("one_thread")  # as in test_bad_input.py, where it applied to the whole module
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


@pytest.mark.usefixtures("one_thread")  # as in test_bad_input.py, where it applied to the whole module
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
