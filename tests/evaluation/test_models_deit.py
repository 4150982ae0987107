"""DeiTClassifier with tiny real timm DeiT / ViT configurations (CPU)."""

from __future__ import annotations

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from torch.utils.data import DataLoader, TensorDataset

from robop_lightning.models import DeiTClassifier
from robop_lightning.models.deit import warmup_cosine

TINY = dict(patch_size=7, embed_dim=32, depth=2, num_heads=2)


pytestmark = pytest.mark.usefixtures("one_thread")


def tiny(name: str = "deit_tiny_patch16_224", in_chans: int = 1, **kwargs) -> DeiTClassifier:
    torch.manual_seed(0)
    return DeiTClassifier(name, num_classes=10, img_size=28, in_chans=in_chans, model_kwargs=dict(TINY), **kwargs)


def trainer(tmp_path, **kwargs) -> pl.Trainer:
    options = dict(
        accelerator="cpu", default_root_dir=tmp_path, logger=False, enable_progress_bar=False,
        enable_model_summary=False,
    )  # fmt: skip
    options.update(kwargs)
    return pl.Trainer(**options)


def loader(n: int = 32, in_chans: int = 1, indices: bool = False) -> DataLoader:
    g = torch.Generator().manual_seed(0)
    tensors = [torch.rand(n, in_chans, 28, 28, generator=g), torch.randint(0, 10, (n,), generator=g)]
    if indices:
        tensors.append(torch.arange(n))
    return DataLoader(TensorDataset(*tensors), batch_size=16)


@pytest.mark.parametrize("name", ["deit_tiny_patch16_224", "deit_tiny_distilled_patch16_224", "vit_tiny_patch16_224"])
@pytest.mark.parametrize("in_chans", [1, 3])
def test_logits_shapes(name, in_chans):
    model = tiny(name, in_chans=in_chans)
    images = torch.rand(3, in_chans, 28, 28)
    for mode in (True, False):
        model.train(mode)
        assert model(images).shape == (3, 10)
    distilled = "distilled" in name
    assert model.distilled == distilled
    model.train()
    heads = model._heads(images)
    assert isinstance(heads, tuple) == distilled
    if distilled:  # forward averages the two heads, in train and eval mode alike
        assert len(heads) == 2 and all(h.shape == (3, 10) for h in heads)
        torch.testing.assert_close(model(images), (heads[0] + heads[1]) / 2)


@pytest.mark.filterwarnings("ignore:You are trying to `self.log\\(\\)`")
def test_distilled_training_uses_both_heads_with_the_same_labels():
    model = tiny("deit_tiny_distilled_patch16_224", label_smoothing=0.1).train()
    images, labels = torch.rand(4, 1, 28, 28), torch.tensor([1, 2, 3, 4])
    torch.manual_seed(1)
    loss = model.training_step((images, labels), 0)
    torch.manual_seed(1)
    cls_head, dist_head = model._heads(images)
    ce = torch.nn.functional.cross_entropy
    expected = (ce(cls_head, labels, label_smoothing=0.1) + ce(dist_head, labels, label_smoothing=0.1)) / 2
    torch.testing.assert_close(loss, expected)


def test_normalisation_is_inside_forward():
    model = tiny(in_chans=3).eval()
    images = torch.rand(2, 3, 28, 28)  # [0, 1] pixels
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)  # the pretrained config's
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    torch.testing.assert_close(model(images), model.model((images - mean) / std))
    assert {"mean", "std"} <= set(model.state_dict())
    # a grey model averages the RGB config; explicit values win; grey batches feed an RGB model
    grey = tiny(in_chans=1)
    assert grey.mean.flatten().tolist() == pytest.approx([0.449])
    custom = tiny(in_chans=1, mean=[0.2860], std=[0.3530])
    assert custom.std.flatten().tolist() == pytest.approx([0.3530])
    torch.testing.assert_close(model(images[:, :1]), model(images[:, :1].expand(-1, 3, -1, -1)))


def test_fit_schedule_and_checkpoint_round_trip(tmp_path):
    model = tiny("deit_tiny_distilled_patch16_224", lr=1e-3, warmup_epochs=1)
    with torch.no_grad():
        model.mean.fill_(0.3)  # buffers come back from the checkpoint, not from the constructor
    checkpoint = ModelCheckpoint(dirpath=tmp_path, save_last=True)
    fit = trainer(tmp_path, max_epochs=2, callbacks=[checkpoint], enable_checkpointing=True)
    fit.fit(model, loader(), loader(indices=True))
    assert "val/clean_acc" in fit.callback_metrics and "train/loss" in fit.callback_metrics
    # warm-up for one epoch, cosine to min_lr_ratio * lr at the last step
    assert fit.lr_scheduler_configs[0].scheduler.get_last_lr()[0] == pytest.approx(1e-3 * 0.01, rel=1e-3)
    # AdamW without weight decay on biases, norms, position embedding and tokens
    decayed = {id(p) for g in fit.optimizers[0].param_groups if g["weight_decay"] > 0 for p in g["params"]}
    for name, parameter in model.model.named_parameters():
        expect = parameter.ndim > 1 and name not in ("pos_embed", "cls_token", "dist_token")
        assert (id(parameter) in decayed) == expect, name
    restored = DeiTClassifier.load_from_checkpoint(checkpoint.last_model_path)
    assert restored.hparams.model_name == "deit_tiny_distilled_patch16_224"
    assert restored.hparams.model_kwargs == TINY and restored.mean.flatten().tolist() == pytest.approx([0.3])
    model.eval()
    restored.eval()
    images = torch.rand(4, 1, 28, 28)
    torch.testing.assert_close(restored(images), model(images))


def test_warmup_cosine():
    assert warmup_cosine(0, 0, 10, 0.1) == pytest.approx(1.0)
    assert warmup_cosine(10, 0, 10, 0.1) == pytest.approx(0.1)
    assert [warmup_cosine(s, 4, 20, 0.0) for s in range(5)] == pytest.approx([0, 0.25, 0.5, 0.75, 1.0])
    factors = [warmup_cosine(s, 4, 20, 0.0) for s in range(4, 21)]
    assert all(b <= a for a, b in zip(factors, factors[1:]))


def test_invalid_arguments():
    with pytest.raises(ValueError, match="unknown robustness keys"):
        tiny(robustness=dict(corruption=["contrast"]))
    with pytest.raises(ValueError, match="one value per channel"):
        tiny(in_chans=3, mean=[0.5, 0.5])
    with pytest.raises(ValueError, match="std must be positive"):
        tiny(std=[0.0])
    with pytest.raises(ValueError, match="not inside model_kwargs"):
        DeiTClassifier(num_classes=10, model_kwargs=dict(img_size=28))
    with pytest.raises(ValueError, match="num_classes"):
        DeiTClassifier(num_classes=0)
