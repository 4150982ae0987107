"""RobOPCallback with real Trainers on tiny modules (CPU): fit, resume, validate, schedule, CLI, DDP."""

from __future__ import annotations

import dataclasses
import inspect
import os
import sys
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch import nn
from torch.utils.data import DataLoader, Dataset, DistributedSampler, TensorDataset

from robop_lightning.callback import RobOPCallback
from robop_lightning.pipeline.masks import SparsityMasks
from tests.engine_helpers import run_child, tiny_llama



# --------------------------------------------------------------------------- tiny modules and data
def _vit():
    from timm.models.vision_transformer import VisionTransformer

    return VisionTransformer(img_size=16, patch_size=4, embed_dim=32, depth=2, num_heads=2, num_classes=4)


class Classifier(pl.LightningModule):
    """MLP (``net.fc1``, ``net.fc2``, ``net.head``) or tiny ViT classifier."""

    def __init__(self, arch: str = "mlp", lr: float = 1e-2) -> None:
        super().__init__()
        self.save_hyperparameters()
        if arch == "mlp":
            self.net = nn.Sequential()
            self.net.add_module("fc1", nn.Linear(16, 64))
            self.net.add_module("act1", nn.ReLU())
            self.net.add_module("fc2", nn.Linear(64, 64))
            self.net.add_module("act2", nn.ReLU())
            self.net.add_module("head", nn.Linear(64, 4))
        else:
            self.net = _vit()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.cross_entropy(self(x), y)

    def validation_step(self, batch, batch_idx):
        x, y = batch
        logits = self(x)
        self.log("val_loss", nn.functional.cross_entropy(logits, y))
        self.log("val_acc", (logits.argmax(-1) == y).float().mean())

    test_step = validation_step

    def configure_optimizers(self):
        # AdamW: momentum and decoupled weight decay both move pruned weights if nothing stops them
        return torch.optim.AdamW(self.parameters(), lr=self.hparams.lr, weight_decay=0.1)


class CausalLM(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.model = tiny_llama().train()

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=input_ids).logits

    def training_step(self, batch, batch_idx):
        return self.model(input_ids=batch["input_ids"], labels=batch["input_ids"]).loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1, momentum=0.9, weight_decay=0.01)


class _Tokens(Dataset):
    def __init__(self, n: int = 32, length: int = 12) -> None:
        self.ids = torch.randint(0, 128, (n, length), generator=torch.Generator().manual_seed(0))

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i]}


def _blobs(n: int, seed: int, arch: str = "mlp") -> TensorDataset:
    """Linearly separable 4-class data (images for the ViT)."""
    g = torch.Generator().manual_seed(seed)
    dim = 16 if arch == "mlp" else 3 * 16 * 16
    w = torch.randn(dim, 4, generator=torch.Generator().manual_seed(123))
    x = torch.randn(n, dim, generator=g)
    y = (x @ w).argmax(-1)
    return TensorDataset(x if arch == "mlp" else x.view(n, 3, 16, 16), y)


class BlobData(pl.LightningDataModule):
    def __init__(self, arch: str = "mlp", n: int = 256, batch_size: int = 32) -> None:
        super().__init__()
        self.arch, self.n, self.batch_size = arch, n, batch_size

    def train_dataloader(self):
        return DataLoader(_blobs(self.n, 0, self.arch), batch_size=self.batch_size, shuffle=False)

    def val_dataloader(self):
        return DataLoader(_blobs(128, 1, self.arch), batch_size=64)

    test_dataloader = val_dataloader  # Lightning's test-loader hook (not a pytest test): the validation blobs


class TokenData(pl.LightningDataModule):
    def train_dataloader(self):
        return DataLoader(_Tokens(), batch_size=4)


def _trainer(tmp_path, callbacks, **kwargs) -> pl.Trainer:
    options = dict(
        accelerator="cpu",
        devices=1,
        max_epochs=1,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        default_root_dir=tmp_path,
    )
    options.update(kwargs)
    return pl.Trainer(callbacks=callbacks, **options)


def _pruned_zero(module: nn.Module, masks: SparsityMasks) -> bool:
    return all(bool((module.get_submodule(n).weight[~m] == 0).all()) for n, m in masks.items())


def _accuracy(model: Classifier, arch: str = "mlp") -> float:
    x, y = _blobs(128, 1, arch).tensors
    with torch.no_grad():
        return float((model(x).argmax(-1) == y).float().mean())


class _WeightWatch(Callback):
    """Asserts after every optimizer step that pruned weights are zero; records weights per epoch."""

    def __init__(self, robop: RobOPCallback) -> None:
        self.robop, self.steps, self.zeros_per_epoch = robop, 0, {}

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        if self.robop.masks is not None:  # gradient clipping comes next: pruned gradients must be 0
            for name, mask in self.robop.masks.items():
                grad = pl_module.get_submodule(name).weight.grad
                assert grad is None or bool((grad[~mask] == 0).all())

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if self.robop.masks is not None:
            assert _pruned_zero(pl_module, self.robop.masks), f"pruned weight non-zero after step {self.steps}"
        self.steps += 1
        w = pl_module.get_submodule(next(iter(self.robop.masks))).weight if self.robop.masks else None
        self.zeros_per_epoch[trainer.current_epoch] = None if w is None else float((w == 0).float().mean())


# --------------------------------------------------------------------------- fit
def test_fit_prunes_at_start_then_recovers_with_zeros_held(tmp_path):
    pl.seed_everything(0)
    model = Classifier("mlp")
    _trainer(tmp_path, [], max_epochs=4).fit(model, datamodule=BlobData())
    dense_acc = _accuracy(model)
    assert dense_acc > 0.85
    head = model.net.head.weight.detach().clone()

    robop = RobOPCallback(
        sparsity=0.5, solver="sparsegpt", uncertainty="baseline", calibration_batches=4, verbose=False
    )
    watch = _WeightWatch(robop)
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    trainer = _trainer(
        tmp_path,
        [robop, watch, ckpt],
        max_epochs=2,
        accumulate_grad_batches=2,
        gradient_clip_val=0.5,
        precision="bf16-mixed",
        enable_checkpointing=True,
    )
    trainer.fit(model, datamodule=BlobData())

    assert watch.steps == 16 and robop.pruned and list(robop.masks) == ["net.fc1", "net.fc2"]
    for name, mask in robop.masks.items():
        weight = model.get_submodule(name).weight
        assert int(mask.sum()) == mask.numel() // 2
        assert bool((weight[~mask] == 0).all()) and bool((weight[mask] != 0).all())
    assert not torch.equal(model.net.head.weight, head)  # the head was fine-tuned, not pruned
    assert float((model.net.head.weight == 0).float().mean()) < 0.05
    assert _accuracy(model) > dense_acc - 0.1

    # the checkpoint is dense-shaped with the stock keys and loads strictly into the stock class
    path = ckpt.last_model_path
    checkpoint = torch.load(path, weights_only=False)
    assert set(checkpoint["state_dict"]) == set(Classifier("mlp").state_dict())
    reloaded = Classifier.load_from_checkpoint(path, strict=True)
    for name, mask in robop.masks.items():
        assert torch.equal(reloaded.get_submodule(name).weight, model.get_submodule(name).weight)
        assert bool((reloaded.get_submodule(name).weight[~mask] == 0).all())
    state = next(v for k, v in checkpoint["callbacks"].items() if "RobOPCallback" in k)
    assert state["done"] == ["start"] and set(state["masks"]) == {"net.fc1", "net.fc2"}
    packed = SparsityMasks.from_state_dict(state["masks"])  # bit-packed: 1/8 of a bool tensor
    assert state["masks"]["net.fc1"]["bits"].numel() == 64 * 16 // 8
    assert all(torch.equal(packed[n], robop.masks[n]) for n in robop.masks)


@pytest.mark.parametrize("kind", ["vit", "llama"])
def test_fit_on_timm_vit_and_hf_llama_holds_zeros(tmp_path, kind):
    pl.seed_everything(0)
    model, data = (
        (Classifier("vit"), BlobData("vit", n=64, batch_size=8)) if kind == "vit" else (CausalLM(), TokenData())
    )
    robop = RobOPCallback(sparsity=0.5, solver="wanda", uncertainty="baseline", calibration_batches=2, verbose=False)
    watch = _WeightWatch(robop)
    trainer = _trainer(tmp_path, [robop, watch], max_steps=4, accumulate_grad_batches=2, gradient_clip_val=1.0)
    trainer.fit(model, datamodule=data)
    expected = 8 if kind == "vit" else 14
    assert len(robop.masks) == expected and watch.steps == 8
    assert all("head" not in n for n in robop.masks)
    assert _pruned_zero(model, robop.masks)
    assert robop.masks.sparsity() == pytest.approx(0.5)
    path = tmp_path / "model.ckpt"
    trainer.save_checkpoint(path)
    cls = Classifier if kind == "vit" else CausalLM
    reloaded = cls.load_from_checkpoint(path, strict=True)
    assert _pruned_zero(reloaded, robop.masks)


def test_resume_does_not_prune_twice_and_reinstalls_masks(tmp_path):
    pl.seed_everything(0)
    model = Classifier("mlp")
    first = RobOPCallback(
        sparsity=0.5, solver="sparsegpt", uncertainty="baseline", calibration_batches=2, verbose=False
    )
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    _trainer(tmp_path, [first, ckpt], max_epochs=1, enable_checkpointing=True).fit(model, datamodule=BlobData())
    saved = first.masks.to_dict()
    _trainer(tmp_path, [first], max_epochs=1).fit(model, datamodule=BlobData())  # same callback, fit again
    assert len(first.reports) == 1 and all(torch.equal(first.masks[n], saved[n]) for n in saved)

    resumed = Classifier("mlp")  # dense and random: weights and masks must come from the checkpoint
    second = RobOPCallback(
        sparsity=0.5, solver="sparsegpt", uncertainty="baseline", calibration_batches=2, verbose=False
    )
    watch = _WeightWatch(second)
    trainer = _trainer(tmp_path, [second, watch], max_epochs=2)
    trainer.fit(resumed, datamodule=BlobData(), ckpt_path=ckpt.last_model_path)
    assert watch.steps == 8  # only epoch 1 ran, every step checked
    assert len(second.reports) == 1 and second._done == ["start"]  # restored, not pruned again
    assert all(torch.equal(second.masks[n], saved[n]) for n in saved)
    assert _pruned_zero(resumed, second.masks)


def test_resume_from_ckpt_path_needs_no_stack_inspection(tmp_path):
    """A resumed fit learns what was pruned from the restored state (Lightning restores before
    on_fit_start). Strategies that shard after setup decide in setup from the public trainer.ckpt_path:
    set in advance, the restore is known and nothing is pruned; otherwise they prune on whole weights
    and a restored pruned state replaces the result, with a warning that says how to skip the work."""
    from types import SimpleNamespace

    from lightning.pytorch.strategies import ModelParallelStrategy

    pl.seed_everything(0)
    first = RobOPCallback(sparsity=0.5, solver="wanda", uncertainty="baseline", calibration_batches=2, verbose=False)
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    _trainer(tmp_path, [first, ckpt], max_steps=2, enable_checkpointing=True).fit(Classifier(), datamodule=BlobData())
    resumed, second = Classifier(), RobOPCallback(solver="wanda", uncertainty="baseline", verbose=False)
    calls = []
    prune = second._prune
    second._prune = lambda *args: calls.append(args[-1]) or prune(*args)
    _trainer(tmp_path, [second], max_steps=4).fit(resumed, datamodule=BlobData(), ckpt_path=ckpt.last_model_path)
    assert calls == [] and second._done == ["start"] and len(second.reports) == 1
    assert all(torch.equal(second.masks[n], first.masks[n]) for n in first.masks)
    assert _pruned_zero(resumed, second.masks)

    sharded = SimpleNamespace(strategy=ModelParallelStrategy.__new__(ModelParallelStrategy), ckpt_path=None)
    third = RobOPCallback(solver="wanda")
    third._prune = lambda *args: calls.append(args[-1])
    sharded.ckpt_path = ckpt.last_model_path  # trainer.ckpt_path = path, then trainer.fit(model)
    third.setup(sharded, Classifier(), "fit")
    assert calls == []  # restored after the sharding: not pruned in setup
    sharded.ckpt_path = None  # fit(model) or fit(model, ckpt_path=path): not known in setup
    third.setup(sharded, Classifier(), "fit")
    assert calls == ["start"] and third._pruned_in_setup  # pruned on whole weights in setup
    with pytest.warns(RuntimeWarning, match="trainer.ckpt_path = path"):
        third.load_state_dict(second.state_dict())  # fit(ckpt_path=...) restores a pruned state over it
    assert third._done == ["start"] and all(torch.equal(third.masks[n], first.masks[n]) for n in first.masks)


def test_prune_at_epoch_end(tmp_path):
    pl.seed_everything(0)
    model = Classifier("mlp")
    robop = RobOPCallback(
        sparsity=0.5, solver="wanda", uncertainty="baseline", prune_at=0, calibration_batches=2, verbose=False
    )
    watch = _WeightWatch(robop)
    logger = CSVLogger(tmp_path, name="logs")
    _trainer(tmp_path, [robop, watch], max_epochs=2, logger=logger).fit(model, datamodule=BlobData())
    assert robop._done == ["epoch_end:0"]
    assert watch.zeros_per_epoch[0] is None  # epoch 0 trained dense
    assert watch.zeros_per_epoch[1] == pytest.approx(0.5)
    logged = Path(logger.log_dir, "metrics.csv").read_text().splitlines()
    header, rows = logged[0].split(","), [line.split(",") for line in logged[1:]]
    for key in ("robop/sparsity", "robop/net.fc1/sparsity", "robop/net.fc2/nominal_error"):
        values = [r[header.index(key)] for r in rows if r[header.index(key)]]
        assert len(values) == 1 and 0 <= float(values[0]) <= 1, key
    assert float(next(r[header.index("robop/sparsity")] for r in rows if r[header.index("robop/sparsity")])) == 0.5


def test_prune_at_epoch_missed_by_a_checkpoint_is_caught_up_on_resume(tmp_path):
    """A checkpoint saved at validation end comes before the epoch-end pruning: resuming must prune."""
    pl.seed_everything(0)
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True, save_on_train_epoch_end=False)
    first = RobOPCallback(solver="wanda", uncertainty="baseline", prune_at=1, calibration_batches=2, verbose=False)
    _trainer(tmp_path, [first, ckpt], max_epochs=2, enable_checkpointing=True).fit(Classifier(), datamodule=BlobData())
    assert first._done == ["epoch_end:1"]
    state = torch.load(ckpt.last_model_path, weights_only=False)
    assert next(v for k, v in state["callbacks"].items() if "RobOPCallback" in k)["done"] == []  # saved before

    resumed = Classifier()
    second = RobOPCallback(solver="wanda", uncertainty="baseline", prune_at=1, calibration_batches=2, verbose=False)
    watch = _WeightWatch(second)
    trainer = _trainer(tmp_path, [second, watch], max_epochs=3)
    trainer.fit(resumed, datamodule=BlobData(), ckpt_path=ckpt.last_model_path)
    assert second._done == ["epoch_end:1"] and len(second.reports) == 1
    assert watch.zeros_per_epoch == {2: pytest.approx(0.5)}  # pruned before the first resumed step


def test_gradual_schedule_keeps_earlier_zeros(tmp_path):
    pl.seed_everything(0)
    model = Classifier("mlp")
    robop = RobOPCallback(
        pattern="unstructured",
        solver="sparsegpt",
        uncertainty="baseline",
        schedule={0: 0.5, 1: 0.6, 2: 0.75},
        calibration_batches=2,
        verbose=False,
    )
    seen = {}

    class Snap(Callback):
        def on_train_epoch_end(self, trainer, pl_module):
            seen[trainer.current_epoch] = {n: m.clone() for n, m in robop.masks.items()}

    _trainer(tmp_path, [robop, Snap()], max_epochs=3).fit(model, datamodule=BlobData())
    assert [round(r.totals["sparsity"], 2) for r in robop.reports] == [0.5, 0.6, 0.75]
    for epoch, target in ((0, 0.5), (1, 0.6), (2, 0.75)):
        for name, mask in seen[epoch].items():
            assert 1 - float(mask.float().mean()) == pytest.approx(target, abs=0.01)
            if epoch:
                assert not bool((mask & ~seen[epoch - 1][name]).any())  # nothing pruned comes back
    assert _pruned_zero(model, robop.masks)


# --------------------------------------------------------------------------- validate / test
def test_validate_prunes_then_evaluates(tmp_path):
    pl.seed_everything(0)
    model = Classifier("mlp")
    _trainer(tmp_path, [], max_epochs=3).fit(model, datamodule=BlobData())
    dense = _trainer(tmp_path, []).validate(model, datamodule=BlobData(), verbose=False)[0]
    robop = RobOPCallback(sparsity=0.75, solver="magnitude", uncertainty="baseline", calibration_dataloader="val", verbose=False)
    pruned = _trainer(tmp_path, [robop]).validate(model, datamodule=BlobData(), verbose=False)[0]
    again = _trainer(tmp_path, []).validate(model, datamodule=BlobData(), verbose=False)[0]
    assert pruned == again != dense  # the metrics are those of the pruned model
    assert robop.masks.sparsity() == pytest.approx(0.75)
    tested = _trainer(tmp_path, [robop]).test(model, datamodule=BlobData(), verbose=False)[0]
    assert tested["val_loss"] == pytest.approx(again["val_loss"])  # already pruned: not pruned again
    assert len(robop.reports) == 1

    # calibration="train" with loaders passed straight to validate(): no train loader to be found
    loader = BlobData().val_dataloader()
    with pytest.raises(MisconfigurationException, match="found no dataloader"):
        _trainer(tmp_path, [RobOPCallback(solver="wanda")]).validate(Classifier("mlp"), loader, verbose=False)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_fp16_amp_on_cuda_holds_zeros(tmp_path):
    pl.seed_everything(0)
    model = Classifier("mlp")
    robop = RobOPCallback(
        sparsity=0.5, solver="sparsegpt", uncertainty="baseline", calibration_batches=2, verbose=False
    )
    watch = _WeightWatch(robop)
    trainer = _trainer(
        tmp_path,
        [robop, watch],
        accelerator="gpu",
        precision="16-mixed",
        max_epochs=2,
        accumulate_grad_batches=2,
        gradient_clip_val=0.5,
    )
    trainer.fit(model, datamodule=BlobData())
    assert watch.steps == 16 and _pruned_zero(model, robop.masks)


# --------------------------------------------------------------------------- configuration
@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"sparsity": 1.2}, "sparsity"),
        ({"solver": "obc"}, "unknown solver"),
        ({"uncertainty": "box"}, "unknown uncertainty"),
        ({"uncertainty": "cvar", "radius": 2.0}, "alpha"),
        ({"targets": "blocks"}, "list of module names"),
        ({"calibration_batches": 0}, "calibration_batches"),
        ({"calibration": "my loader"}, "calibration_dataloader must name"),
        ({"prune_at": "end"}, "prune_at"),
        ({"schedule": {0: 0.6, 2: 0.5}}, "must not decrease"),
        ({"schedule": {"x": 0.5}}, "epoch numbers"),
        ({"schedule": {0: 0.5}, "prune_at": 1}, "either prune_at"),
        ({"pattern": "2:4", "sparsity": 0.7}, "2:4"),
        ({"heldout_fraction": 1.0}, "heldout_fraction"),
    ],
)
def test_init_validation(kwargs, match):
    with pytest.raises(ValueError, match=match):
        RobOPCallback(**kwargs)


def test_config_instead_of_the_pruning_keywords():
    from robop_lightning.config import PruneConfig

    keywords = dict(sparsity=0.6, solver="sparsegpt", uncertainty="ellipsoid", targets=["re:fc"], damping=0.05)
    by_keywords = RobOPCallback(**keywords, calibration_batches=2)
    by_config = RobOPCallback(config=PruneConfig(**keywords), calibration_batches=2)
    assert by_config.config == by_keywords.config and by_config.uncertainty == "e" and by_config.sparsity == 0.6
    assert by_config.targets == ["re:fc"] and by_config.calibration_batches == 2
    assert RobOPCallback(config=dict(keywords)).config == by_keywords.config  # YAML: a dict of its fields
    assert RobOPCallback(config=PruneConfig(solver="wanda"), schedule={0: 0.3, 2: 0.6}).sparsity == 0.6
    structured = RobOPCallback(config=PruneConfig(pattern="structured", solver_options={"budget": "global"}))
    assert structured.structured_options == {"budget": "global"}
    with pytest.raises(ValueError, match="either as config=PruneConfig.*not both: got config= and damping, sparsity"):
        RobOPCallback(config=PruneConfig(), sparsity=0.7, damping=0.1)
    with pytest.raises(ValueError, match="unknown config 'sparsit'"):
        RobOPCallback(config={"sparsit": 0.5})
    with pytest.raises(ValueError, match="curvature='fisher'.*does not take: schedule"):
        RobOPCallback(config=PruneConfig(solver="cap", curvature="fisher"), schedule={0: 0.5})
    # every PruneConfig field is a keyword, and "not both" compares the keywords with PruneConfig's defaults
    parameters = inspect.signature(RobOPCallback).parameters
    for field in dataclasses.fields(PruneConfig):
        assert field.name in parameters, f"RobOPCallback has no keyword {field.name} (a PruneConfig field)"
        assert parameters[field.name].default == field.default, field.name


def test_sharded_strategies_refuse_a_schedule(tmp_path):
    from lightning.pytorch.strategies import FSDPStrategy

    class CPUFSDP(FSDPStrategy):  # Lightning's FSDP needs CUDA; the refusal comes before any sharding
        pass

    environ = dict(os.environ)
    try:
        trainer = _trainer(tmp_path, [RobOPCallback(solver="wanda", schedule={0: 0.3, 1: 0.5})], strategy=CPUFSDP())
        with pytest.raises(Exception, match="Under CPUFSDP RobOPCallback prunes once, in setup"):
            trainer.fit(Classifier("mlp"), datamodule=BlobData())

        class Deferred(Classifier):  # the usual large-model pattern: layers built in configure_model
            def __init__(self) -> None:
                super().__init__("mlp")
                self.net = None

            def configure_model(self) -> None:
                self.net = Classifier("mlp").net

        trainer = _trainer(tmp_path, [RobOPCallback(solver="wanda")], strategy=CPUFSDP())
        with pytest.raises(Exception, match="has no nn.Linear yet .built in configure_model"):
            trainer.fit(Deferred(), datamodule=BlobData())
    finally:  # the strategy set up a (one-process) process group and its variables before the refusal
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
        os.environ.clear()
        os.environ.update(environ)


def test_lightning_cli_yaml(tmp_path, monkeypatch):
    pytest.importorskip("jsonargparse")
    monkeypatch.setattr(sys, "argv", ["cli"])  # LightningCLI also reads the command line
    from lightning.pytorch.cli import LightningCLI

    config = tmp_path / "config.yaml"
    config.write_text(
        f"""
seed_everything: 0
trainer:
  accelerator: cpu
  devices: 1
  max_epochs: 1
  logger: false
  enable_checkpointing: false
  enable_progress_bar: false
  default_root_dir: {tmp_path}
  callbacks:
    - class_path: robop_lightning.callback.RobOPCallback
      init_args:
        sparsity: 0.5
        solver: sparsegpt
        uncertainty: trace
        radius: 0.01
        targets: ["re:fc"]
        ignore: [net.fc2]
        calibration_batches: 2
        verbose: false
"""
    )
    cli = LightningCLI(Classifier, BlobData, args=["fit", "--config", str(config)], save_config_callback=None)
    robop = next(c for c in cli.trainer.callbacks if isinstance(c, RobOPCallback))
    assert robop.uncertainty == "trace" and robop.radius == 0.01
    assert list(robop.masks) == ["net.fc1"]
    assert _pruned_zero(cli.model, robop.masks)
    assert float((cli.model.net.fc2.weight == 0).float().mean()) < 0.05


# --------------------------------------------------------------------------- DDP
def _ddp_main(out: str) -> None:
    """Child of test_ddp_masks_match_single_process: 2-process DDP fit that prunes at start."""
    torch.set_num_threads(1)
    pl.seed_everything(0)
    model = Classifier("vit")
    robop = RobOPCallback(sparsity=0.5, solver="sparsegpt", uncertainty="cvar", calibration_batches=2, verbose=False)
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=2,
        strategy="ddp",
        max_steps=2,
        callbacks=[robop],
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        default_root_dir=out,
    )
    trainer.fit(model, datamodule=BlobData("vit", n=32, batch_size=4))
    torch.save(
        {"masks": robop.masks.to_dict(), "zeros": _pruned_zero(model, robop.masks)},
        os.path.join(out, f"rank{trainer.global_rank}.pt"),
    )
    # Lightning leaves the gloo group up; tearing it down here keeps its threads from being destroyed
    # while joinable at interpreter exit ("terminate called without an active exception", seen once in CI)
    if torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


def test_ddp_masks_match_single_process(tmp_path):
    from robop_lightning.pipeline.prune import prune_model

    proc = run_child(__file__, tmp_path, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    assert ranks[0]["zeros"] and ranks[1]["zeros"]

    # one process, calibrating on rank 0's shard then rank 1's: Lightning gives each rank a
    # DistributedSampler (shuffled, seed 0), and the gathered activations come in rank order
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        pl.seed_everything(0)
        model = Classifier("vit")
        x, y = _blobs(32, 0, "vit").tensors
        shards = [list(DistributedSampler(range(32), num_replicas=2, rank=r, shuffle=True, seed=0)) for r in range(2)]
        batches = [x[shard[i * 4 : (i + 1) * 4]] for shard in shards for i in range(2)]
        report = prune_model(model, batches, sparsity=0.5, solver="sparsegpt", uncertainty="cvar", progress=False)
    finally:
        torch.set_num_threads(threads)
    assert len(report.masks) == 8
    for name, mask in report.masks.items():
        assert torch.equal(ranks[0]["masks"][name], ranks[1]["masks"][name]), name
        assert torch.equal(ranks[0]["masks"][name], mask), name


if __name__ == "__main__":
    _ddp_main(sys.argv[1])


def test_engine_options_reach_prune_model_from_the_callback(tmp_path):
    """Every option of prune_model is a callback argument too (issue 15): same masks as prune_model with them."""
    from robop_lightning.pipeline.prune import prune_model

    options = dict(sparsity=0.5, solver="sparsegpt", uncertainty="baseline", damping=0.05, rounds=0,
                   solver_options={"block_size": 8}, activation_budget="64KB", targets=["re:fc"])
    torch.manual_seed(0)
    module = Classifier()
    reference = Classifier()
    reference.load_state_dict(module.state_dict())
    robop = RobOPCallback(calibration_batches=2, verbose=False, progress=False, **options)
    _trainer(tmp_path, [robop]).validate(module, datamodule=BlobData(batch_size=32))
    x = _blobs(256, 0).tensors[0]
    report = prune_model(reference, [x[:32], x[32:64]], progress=False, **options)
    assert robop.reports[0].config["damping"] == 0.05 and robop.reports[0].config["rounds"] == 0
    assert robop.masks.to_dict().keys() == report.masks.keys()
    for name, mask in report.masks.items():
        assert torch.equal(robop.masks[name], mask), name
    with pytest.raises(ValueError, match="unknown solver option"):
        RobOPCallback(solver="cap", solver_options={"blocksize": 8})
    with pytest.warns(DeprecationWarning, match="calibration_dataloader"):
        RobOPCallback(calibration="val")


def test_deepspeed_is_refused_with_the_alternatives():
    from types import SimpleNamespace

    from lightning.pytorch.strategies import DeepSpeedStrategy

    strategy = DeepSpeedStrategy.__new__(DeepSpeedStrategy)  # no deepspeed installed: only its type matters
    with pytest.raises(Exception, match="does not support DeepSpeedStrategy.*ModelParallelStrategy.*FSDPStrategy"):
        RobOPCallback(solver="wanda").setup(SimpleNamespace(strategy=strategy), Classifier("mlp"), "fit")
