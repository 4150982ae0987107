"""RobOPCallback beside the rest of Lightning (issue 8): ModelCheckpoint and ``ckpt_path`` resume,
EarlyStopping, gradient accumulation, bf16 mixed precision, ``torch.compile``'d submodules and
repeated ``fit`` calls, with real Trainers on a tiny Hugging Face Llama in ``CausalLMModule``."""

from __future__ import annotations

import time

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import Callback, EarlyStopping, ModelCheckpoint
from torch.utils.data import DataLoader
from transformers import LlamaConfig, LlamaForCausalLM

from robop_lightning.callback import RobOPCallback
from robop_lightning.models import CausalLMModule

pytestmark = pytest.mark.usefixtures("one_thread")

TARGETS = 14  # q, k, v, o, gate, up, down in each of 2 blocks


def _llama(seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    return LlamaForCausalLM(
        LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                    num_key_value_heads=2, vocab_size=64)
    )


def _module(seed: int = 0) -> CausalLMModule:
    # AdamW with weight decay: momentum and decay both move pruned weights unless something stops them
    return CausalLMModule(_llama(seed), lr=1e-2, weight_decay=0.1)


def _loader(n: int = 32, seed: int = 0) -> DataLoader:
    ids = torch.randint(0, 64, (n, 16), generator=torch.Generator().manual_seed(seed))
    return DataLoader(ids, batch_size=4)  # n / 4 batches, fixed order


def _robop() -> RobOPCallback:
    return RobOPCallback(sparsity=0.5, solver="sparsegpt", uncertainty="cvar", calibration_batches=2, verbose=False)


def _trainer(tmp_path, callbacks, **kwargs) -> pl.Trainer:
    options = dict(accelerator="cpu", devices=1, max_epochs=1, logger=False, enable_progress_bar=False,
                   enable_model_summary=False, enable_checkpointing=False, default_root_dir=tmp_path)
    options.update(kwargs)
    return pl.Trainer(callbacks=callbacks, **options)


class ZeroWatch(Callback):
    """After every optimizer step: every pruned weight exactly zero; before it: their gradients zero."""

    def __init__(self, robop: RobOPCallback) -> None:
        self.robop, self.steps, self.batches = robop, 0, 0

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        for name, mask in self.robop.masks.items():
            grad = pl_module.get_submodule(name).weight.grad
            assert grad is None or bool((grad[~mask] == 0).all()), name
        self.steps += 1

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        assert self.robop.masks.holds(pl_module), f"a pruned weight moved by batch {self.batches}"
        self.batches += 1


def _weights(module: pl.LightningModule, robop: RobOPCallback) -> dict[str, torch.Tensor]:
    return {n: module.get_submodule(n).weight.detach().clone() for n in robop.masks}


def _masks_equal(a, b) -> bool:
    return list(a) == list(b) and all(torch.equal(a[n], b[n]) for n in a)


# --------------------------------------------------------------------------- checkpoints
def test_model_checkpoint_holds_zeros_and_ckpt_path_resume_keeps_the_masks(tmp_path):
    pl.seed_everything(0, verbose=False)
    module, robop = _module(), _robop()
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    _trainer(tmp_path, [robop, ZeroWatch(robop), ckpt], enable_checkpointing=True).fit(module, _loader())
    assert len(robop.masks) == TARGETS and robop.masks.sparsity() == pytest.approx(0.5)
    saved = robop.masks.to_dict()

    # the checkpoint: stock (dense) keys and shapes, zeros in it, the masks in the callback's state
    checkpoint = torch.load(ckpt.last_model_path, weights_only=False)
    stock = CausalLMModule(_llama(), lr=1e-2, weight_decay=0.1).state_dict()
    assert checkpoint["state_dict"].keys() == stock.keys()
    assert all(checkpoint["state_dict"][k].shape == v.shape for k, v in stock.items())
    for name, mask in saved.items():
        assert bool((checkpoint["state_dict"][f"{name}.weight"][~mask] == 0).all()), name
    state = next(v for k, v in checkpoint["callbacks"].items() if "RobOPCallback" in k)
    assert state["done"] == ["start"]
    reloaded = CausalLMModule.load_from_checkpoint(ckpt.last_model_path, model=_llama(1), strict=True)
    assert robop.masks.holds(reloaded)

    # resume into a fresh dense module with a fresh callback: restored, not pruned again, zeros held
    resumed, second = _module(seed=1), _robop()
    watch = ZeroWatch(second)
    _trainer(tmp_path, [second, watch], max_epochs=2).fit(resumed, _loader(), ckpt_path=ckpt.last_model_path)
    assert watch.batches == 8 and watch.steps == 8  # epoch 1 only, every step checked
    assert len(second.reports) == 1 and second._done == ["start"]
    assert _masks_equal(second.masks.to_dict(), saved) and second.masks.holds(resumed)


def test_repeated_fit_does_not_prune_twice_and_keeps_the_masks(tmp_path):
    pl.seed_everything(0, verbose=False)
    module, robop = _module(), _robop()
    _trainer(tmp_path, [robop]).fit(module, _loader())
    saved, before = robop.masks.to_dict(), _weights(module, robop)
    for _ in range(2):  # new trainers (new optimizers), the same module and callback
        watch = ZeroWatch(robop)
        _trainer(tmp_path, [robop, watch]).fit(module, _loader())
        assert watch.steps == 8
    assert len(robop.reports) == 1 and robop._done == ["start"]
    assert _masks_equal(robop.masks.to_dict(), saved) and robop.masks.holds(module)
    after = _weights(module, robop)
    assert any(not torch.equal(after[n], before[n]) for n in after)  # it did train (kept weights moved)


# --------------------------------------------------------------------------- trainer features
def test_early_stopping_leaves_zeros_intact(tmp_path):
    pl.seed_everything(0, verbose=False)
    module, robop = _module(), _robop()
    watch = ZeroWatch(robop)
    # stop as soon as the validation perplexity is below a threshold it always meets: after epoch 0
    stop = EarlyStopping(monitor="val/ppl", mode="min", stopping_threshold=1e9)
    trainer = _trainer(tmp_path, [robop, watch, stop], max_epochs=5)
    trainer.fit(module, _loader(), _loader(8, seed=1))
    assert trainer.should_stop and stop.stopped_epoch == 0 and trainer.current_epoch == 1
    assert watch.steps == 8 and len(robop.reports) == 1
    assert robop.masks.holds(module) and robop.masks.sparsity() == pytest.approx(0.5)
    assert not robop.masks.attached  # teardown removed the hooks; the zeros stay


@pytest.mark.parametrize(
    "options,steps",
    [
        (dict(accumulate_grad_batches=2), 4),
        (dict(accumulate_grad_batches=3, gradient_clip_val=0.5), 3),  # 8 batches: 3 + 3 + a partial 2
        (dict(precision="bf16-mixed"), 8),
        (dict(precision="bf16-mixed", accumulate_grad_batches=2, gradient_clip_val=0.5), 4),
    ],
    ids=["accumulate-2", "accumulate-3-clip", "bf16-mixed", "bf16-accumulate-clip"],
)
def test_accumulation_and_mixed_precision_keep_zeros_exactly(tmp_path, options, steps):
    pl.seed_everything(0, verbose=False)
    module, robop = _module(), _robop()
    watch = ZeroWatch(robop)
    _trainer(tmp_path, [robop, watch], **options).fit(module, _loader())
    assert watch.batches == 8 and watch.steps == steps
    for name, mask in robop.masks.items():
        weight = module.get_submodule(name).weight
        assert weight.dtype == torch.float32  # mixed precision keeps float32 master weights
        assert bool((weight[~mask] == 0).all()) and int(mask.sum()) == mask.numel() // 2, name
        assert float((weight[mask] == 0).float().mean()) < 0.01  # the kept weights are not zeroed


# --------------------------------------------------------------------------- torch.compile
def test_compiled_submodule_is_pruned_through_its_original_module(tmp_path):
    """A ``torch.compile``'d block MLP works: its linears are found under ``_orig_mod``, pruned, and
    the compiled forward (parameters are graph inputs) sees the pruned weights while training."""
    pl.seed_everything(0, verbose=False)
    module, robop = _module(), _robop()
    layers = module.model.model.layers
    layers[0].mlp = torch.compile(layers[0].mlp)
    watch = ZeroWatch(robop)
    start = time.perf_counter()
    _trainer(tmp_path, [robop, watch], max_steps=3).fit(module, _loader())
    seconds = time.perf_counter() - start
    assert watch.steps == 3 and len(robop.masks) == TARGETS
    assert "model.model.layers.0.mlp._orig_mod.down_proj" in robop.masks
    assert robop.masks.holds(module) and robop.masks.sparsity() == pytest.approx(0.5)
    x = torch.randn(2, 5, 32)
    with torch.no_grad():
        torch.testing.assert_close(layers[0].mlp(x), layers[0].mlp._orig_mod(x))
    assert seconds < 60, seconds
