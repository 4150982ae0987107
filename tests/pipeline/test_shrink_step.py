"""robop_lightning.pipeline.shrink_step: the structured block walk (budgets, validation, undo, resume, held-out
errors, activation budget) and the callback's structured pruning.

Structured OBS maths: ``test_solvers_structured_obs.py``; module surgery and save / load: ``test_surgery.py``."""

from __future__ import annotations

import math

import pytest
import timm
import torch
from lightning.pytorch import Trainer
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from robop_lightning import RobOPCallback, prune_model
from robop_lightning.models import DeiTClassifier
from robop_lightning.engine.solvers.structured_obs import select_groups
from robop_lightning.pipeline.shrink_step import prune_model_structured
from robop_lightning.pipeline.surgery import shrink_vit_block
from tests.engine_helpers import _tiny_vit, clone_state, tiny_llama, token_batches

pytestmark = pytest.mark.usefixtures("one_thread")


# ----------------------------------------------------------------------------- validation
def test_bad_arguments_name_the_layer_and_fix():
    w, x = torch.randn(4, 6), torch.randn(20, 6)
    with pytest.raises(ValueError, match=r"fc9: remove must be an integer in \[0, 5\]"):
        select_groups(w, x, [[j] for j in range(6)], 6, name="fc9")
    with pytest.raises(ValueError, match="same positive number of columns"):
        select_groups(w, x, [[0], [1, 2]], 1)
    vit = _tiny_vit()
    with pytest.raises(ValueError, match=r"sparsity must be in \[0, 1\)"):
        prune_model_structured(vit, [torch.randn(2, 3, 32, 32)], sparsity=1.2)
    mlp = nn.Sequential(*[nn.Sequential(nn.Linear(8, 8), nn.ReLU()) for _ in range(2)])
    with pytest.raises(ValueError, match=r"0 \(Sequential\) is not a supported block for pattern='structured'"):
        prune_model(mlp, [torch.randn(4, 8)], sparsity=0.5, pattern="structured")
    with pytest.raises(ValueError, match="keep at least one head"):
        shrink_vit_block(vit.blocks[0], keep_heads=[])


# ----------------------------------------------------------------------------- budgets and failures
def test_global_budget_by_params_and_flops():
    batches = [torch.randn(8, 3, 32, 32)]
    for cost in ("params", "flops"):
        vit = _tiny_vit(1)
        report = prune_model_structured(vit, batches, sparsity=0.4, uncertainty="baseline", budget="global", cost=cost)
        achieved = report.config[f"{cost}_removed"]
        assert 0.4 <= achieved < 0.4 + 0.05  # one group past the target at most
        kept = {r["name"]: r["kept"] for r in report.layers}
        assert all(k >= 1 for k in kept.values())
        vit(torch.randn(1, 3, 32, 32))  # still runs
    assert len({r["sparsity"] for r in report.layers}) > 1  # the global ranking does not split evenly


@pytest.mark.parametrize("heads, sparsity", [(3, 0.5), (3, 0.3), (4, 0.3), (6, 0.7), (4, 0.5)])
def test_layer_budget_hits_each_blocks_share(heads, sparsity):
    """Rounding heads alone over-removes on few-head models (3 heads at 50 %: 2 of 3); the MLP makes up the rest."""
    vit = timm.create_model("deit_tiny_patch16_224", img_size=32, patch_size=8, embed_dim=16 * heads, depth=2,
                            num_heads=heads, num_classes=3).eval()  # fmt: skip

    def block_params(block):
        return sum(p.numel() for n, p in block.named_parameters() if n.startswith(("attn.qkv", "mlp.fc1")) or
                   n in ("attn.proj.weight", "mlp.fc2.weight"))  # fmt: skip

    before = [block_params(b) for b in vit.blocks]
    report = prune_model_structured(vit, [torch.randn(8, 3, 32, 32)], sparsity=sparsity, uncertainty="baseline")
    channel = 2 * 16 * heads + 1  # one MLP channel: a fc1 row with its bias and a fc2 column
    for b, n0 in zip(vit.blocks, before, strict=True):
        assert abs(n0 - block_params(b) - sparsity * n0) <= channel
        # heads rounded down or up, never further; the fewer removed when both fit
        assert heads - b.attn.num_heads in (math.floor(sparsity * heads), math.ceil(sparsity * heads))
    assert abs(report.config["params_removed"] - sparsity) < 0.01
    if (heads, sparsity) == (3, 0.5):
        assert all(b.attn.num_heads == 2 for b in vit.blocks)


def test_failure_restores_the_model_exactly():
    vit = _tiny_vit()
    before = {k: v.clone() for k, v in vit.state_dict().items()}

    class Boom(RuntimeError):
        pass

    def explode(module, args):
        if explode.armed:
            raise Boom("calibration broke")

    explode.armed = False
    vit.blocks[1].attn.proj.register_forward_pre_hook(explode)
    calls = []
    vit.blocks[1].register_forward_pre_hook(lambda m, a: calls.append(1))
    explode.armed = True
    with pytest.raises(Boom):
        prune_model_structured(vit, [torch.randn(4, 3, 32, 32)], sparsity=0.5, uncertainty="baseline")
    assert vit.blocks[0].attn.num_heads == 4 and vit.blocks[0].mlp.fc1.out_features == 192
    after = vit.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert not hasattr(vit.blocks[0], "_robop_structured")


# ----------------------------------------------------------------------------- Lightning
def _tiny_classifier():
    torch.manual_seed(0)
    return DeiTClassifier(
        "deit_tiny_patch16_224", num_classes=4, img_size=28, in_chans=1, lr=1e-3,
        model_kwargs=dict(patch_size=7, embed_dim=32, depth=2, num_heads=4),
    )


def _trainer(callback, **kw):
    return Trainer(
        max_epochs=1, callbacks=[callback], logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, accelerator="cpu", **kw,
    )


def test_callback_shrinks_then_fine_tunes_and_checkpoint_loads(tmp_path):
    g = torch.Generator().manual_seed(0)
    data = DataLoader(TensorDataset(torch.rand(64, 1, 28, 28, generator=g), torch.randint(0, 4, (64,), generator=g)),
                      batch_size=16)
    model = _tiny_classifier()
    dense_params = sum(p.numel() for p in model.parameters())
    robop = RobOPCallback(
        sparsity=0.5, pattern="structured", uncertainty="cvar", calibration_batches=2, verbose=False, progress=False,
        structured_options={"budget": "layer"},
    )
    trainer = _trainer(robop)
    trainer.fit(model, data)
    blk = model.model.blocks[0]
    assert blk.attn.num_heads == 2 and blk.mlp.fc1.out_features == 64
    assert sum(p.numel() for p in model.parameters()) < dense_params
    # the optimizer was rebuilt around the new parameters and really trained them
    opt_params = {id(p) for group in trainer.optimizers[0].param_groups for p in group["params"]}
    assert {id(p) for p in model.parameters()} <= opt_params
    assert trainer.global_step == 4 and robop.pruned
    assert trainer.optimizers[0].state[blk.attn.proj.weight]["step"] == 4
    path = tmp_path / "shrunk.ckpt"
    trainer.save_checkpoint(path)
    again = DeiTClassifier.load_from_checkpoint(path, map_location="cpu", pretrained=False).eval()
    x = torch.rand(3, 1, 28, 28)
    with torch.no_grad():
        torch.testing.assert_close(again(x), model.eval()(x), rtol=0, atol=0)


def test_callback_validate_shrinks_and_refuses_mid_fit():
    data = DataLoader(TensorDataset(torch.rand(32, 1, 28, 28), torch.randint(0, 4, (32,))), batch_size=16)
    model = _tiny_classifier()
    robop = RobOPCallback(sparsity=0.5, pattern="structured", uncertainty="baseline", calibration_dataloader="val",
                          calibration_batches=1, verbose=False, progress=False)
    _trainer(robop).validate(model, data)
    assert model.model.blocks[1].attn.num_heads == 2
    with pytest.raises(ValueError, match="prune_at='start'"):
        RobOPCallback(pattern="structured", prune_at=1)
    with pytest.raises(ValueError, match="unknown structured_options"):
        RobOPCallback(pattern="structured", structured_options={"budjet": "global"})


# --------------------------------------------------------------------------- the shared block walk (issue 15)
def _same_state(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_structured_pruning_resumes_bit_identically_after_ctrl_c(tmp_path):
    job = dict(sparsity=0.5, uncertainty="trace", budget="layer")
    reference = tiny_llama(layers=3, vocab=64)
    ref_report = prune_model_structured(reference, token_batches(), **job)

    model, resume = tiny_llama(layers=3, vocab=64), tmp_path / "resume"
    dense = clone_state(model)

    def ctrl_c(module, args):  # Ctrl-C while block 1's MLP is calibrated (its attention already shrunk)
        raise KeyboardInterrupt

    handle = model.model.layers[1].mlp.down_proj.register_forward_pre_hook(ctrl_c)
    with pytest.raises(KeyboardInterrupt):
        prune_model_structured(model, token_batches(), resume_dir=resume, **job)
    handle.remove()
    assert _same_state(clone_state(model), dense)  # every shape and weight as it was
    assert model.model.layers[1].self_attn.k_proj.out_features == 16

    report = prune_model_structured(model, token_batches(), resume_dir=resume, **job)
    assert report.resumed == ["model.layers.0.self_attn.o_proj", "model.layers.0.mlp.down_proj"]
    assert _same_state(clone_state(model), clone_state(reference))
    strip = lambda rows: [{k: v for k, v in r.items() if k != "seconds"} for r in rows]  # noqa: E731
    assert strip(report.layers) == strip(ref_report.layers)
    assert report.config["params_removed"] == ref_report.config["params_removed"]
    again = tiny_llama(layers=3, vocab=64)  # a finished directory: everything loaded, nothing recomputed
    calls = []
    again.model.layers[0].mlp.down_proj.register_forward_pre_hook(lambda m, a: calls.append(1))
    third = prune_model_structured(again, token_batches(), resume_dir=resume, **job)
    assert calls == [] and len(third.resumed) == 6
    assert _same_state(clone_state(again), clone_state(reference))


def test_structured_heldout_errors_are_the_error_on_the_held_out_samples():
    model = tiny_llama(layers=2, vocab=64)
    report = prune_model(model, token_batches(), sparsity=0.5, pattern="structured", uncertainty="baseline",
                         heldout_fraction=0.25, targets=["re:down_proj"])
    rows = report.layers
    assert all(r["heldout_error"] is not None and r["heldout_error"] >= 0 for r in rows)
    # recompute layer 0's: the MLP's held-out inputs are the last quarter of the samples (2 of 8)
    dense = tiny_llama(layers=2, vocab=64)
    captured = []
    dense.model.layers[0].mlp.down_proj.register_forward_pre_hook(lambda m, a: captured.append(a[0]))
    with torch.no_grad():
        for b in token_batches():
            dense(**b, use_cache=False)
    x = torch.cat(captured)  # (8, 12, 64)
    held = x[6:].reshape(-1, 64).double()
    mlp = model.model.layers[0].mlp
    kept = sorted(set(range(64)) - set(rows[0]["removed"]))
    w_dense = dense.model.layers[0].mlp.down_proj.weight.detach().double()
    err = held @ w_dense.T - held[:, kept] @ mlp.down_proj.weight.detach().double().T
    expected = float(err.pow(2).sum() / (held @ w_dense.T).pow(2).sum())
    assert rows[0]["heldout_error"] == pytest.approx(expected, rel=1e-4)


def test_structured_activation_budget_keeps_the_result():
    a, b = tiny_llama(layers=3, vocab=64), tiny_llama(layers=3, vocab=64)
    ra = prune_model_structured(a, token_batches(), sparsity=0.5, uncertainty="trace")
    rb = prune_model_structured(b, token_batches(), sparsity=0.5, uncertainty="trace", activation_budget="4KB")
    assert [r["removed"] for r in ra.layers] == [r["removed"] for r in rb.layers]
    for (k, v), w in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        torch.testing.assert_close(v, w, rtol=1e-5, atol=1e-6, msg=k)
