"""``DeiTClassifier``: a timm DeiT / ViT as a LightningModule that takes [0, 1] pixels.

Normalisation lives inside ``forward`` (``mean`` / ``std`` are buffers saved in checkpoints), so
every consumer (the data, RobOP calibration, corruptions, attacks) works in pixel space.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import timm
import torch
import torch.nn.functional as F
from lightning.pytorch import LightningModule
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from timm.optim import param_groups_weight_decay
from torchmetrics.classification import MulticlassAccuracy
from typing_extensions import override

from robop_lightning.models._checkpoint import StructuredCheckpointHooks
from robop_lightning.robustness.metrics import IMAGENET_EPS, SMALL_IMAGE_EPS, RobustnessEvaluator

__all__ = ["DeiTClassifier", "warmup_cosine"]

_ROBUSTNESS_KEYS = ("corruptions", "severities", "eps", "norm", "steps", "restarts", "fgsm", "seed", "table")


def warmup_cosine(step: int, warmup_steps: int, total_steps: int, min_lr_ratio: float) -> float:
    """Learning-rate factor: linear warm-up from 0, then cosine decay to ``min_lr_ratio``.

    Args:
        step: optimizer steps taken so far.
        warmup_steps: steps of linear warm-up (0 for none).
        total_steps: steps of the whole run.
        min_lr_ratio: final factor.

    Example:
        >>> [round(warmup_cosine(s, 2, 10, 0.0), 3) for s in (0, 1, 2, 6, 10)]
        [0.0, 0.5, 1.0, 0.5, 0.0]
    """
    if step < warmup_steps:
        return step / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


class DeiTClassifier(StructuredCheckpointHooks, LightningModule):
    """Image classification with any timm DeiT / ViT, inputs in [0, 1], robustness at test time.

    Lifecycle, hook by hook:

    * ``__init__``: ``timm.create_model(model_name, pretrained, num_classes, img_size, in_chans,
      **model_kwargs)``; ``mean`` / ``std`` buffers; metrics; ``save_hyperparameters()`` so that
      ``DeiTClassifier.load_from_checkpoint(path)`` rebuilds it (pass ``pretrained=False`` there
      to skip the hub download; the weights come from the checkpoint anyway).
    * ``forward(images)``: normalise, run the network, return ``(N, classes)`` logits. A
      distilled model (``VisionTransformerDistilled``) returns the mean of its two heads.
    * ``training_step``: cross-entropy with ``label_smoothing``; for a distilled model both heads
      (class token and distillation token) are trained on the same labels (no teacher), and
      the loss is their mean. Logs ``train/loss``.
    * ``validation_step`` / ``test_step``: ``val/clean_acc`` / ``test/clean_acc`` (micro top-1).
      With ``robustness`` set, ``test_step`` also scores every corruption x severity and every
      PGD / FGSM radius on the same batch and logs ``test/corrupt_acc``,
      ``test/corrupt_acc/<name>@<severity>``, ``test/adv_acc@linf_<eps>``,
      ``test/fgsm_acc@<eps>`` (see :class:`~robop_lightning.robustness.RobustnessEvaluator`).
      Attacks need gradients: use ``Trainer(inference_mode=False)`` (checked in
      ``on_test_start``). Batches are ``(images, labels)`` or ``(images, labels, indices)``;
      dataset indices seed the per-sample noise so dense and pruned runs see identical inputs
      (without them samples are numbered in loader order, which pairs only unshuffled runs on
      one device).
    * ``configure_optimizers``: AdamW (no weight decay on biases, norms, position embeddings
      and tokens) with a per-step ``LambdaLR``: linear warm-up over ``warmup_epochs``, then
      cosine decay to ``min_lr_ratio * lr`` at the end of training.

    Args:
        model_name: a timm model name (``deit_tiny_patch16_224``, ``deit_small_distilled_patch16_224``,
            ``vit_base_patch16_224``, ...).
        num_classes: number of classes.
        img_size: input side in pixels.
        in_chans: input channels (1-channel batches are repeated when ``in_chans=3``).
        pretrained: load timm's pretrained weights (needs hub access).
        model_kwargs: extra ``timm.create_model`` arguments, such as ``patch_size``,
            ``embed_dim``, ``depth``, ``num_heads``, ``drop_path_rate``.
        mean: per-channel normalisation mean (``None``: the model's pretrained config, else 0.5).
        std: per-channel normalisation std (``None``: the pretrained config, else 0.5).
        lr: AdamW peak learning rate.
        weight_decay: AdamW weight decay.
        warmup_epochs: epochs (may be fractional) of linear warm-up.
        min_lr_ratio: final learning rate as a fraction of ``lr``.
        label_smoothing: cross-entropy label smoothing.
        robustness: ``None`` (clean accuracy only) or a dict for the test-time evaluation with
            keys ``corruptions`` (list of names, default all cheap ones), ``severities``
            (default 1..5), ``eps`` (default 1, 2, 4, 8 / 255 up to 32 px, else 0.5, 1, 2, 4 / 255;
            ``[]`` for none), ``norm`` (``linf``), ``steps`` (10), ``restarts`` (1), ``fgsm``
            (true), ``seed`` (0), ``table`` (by image size).

    Raises:
        ValueError: an argument is invalid (unknown ``robustness`` key, ``mean`` / ``std`` of
            the wrong length, non-positive ``std``, ...).
        MisconfigurationException: testing with attacks under ``Trainer(inference_mode=True)``.

    Example:
        >>> import torch
        >>> model = DeiTClassifier("deit_tiny_patch16_224", num_classes=10, img_size=28, in_chans=1,
        ...                        model_kwargs=dict(patch_size=7, embed_dim=32, depth=2, num_heads=2))
        >>> model(torch.rand(4, 1, 28, 28)).shape
        torch.Size([4, 10])

    With a test-time robustness evaluation (in YAML, ``robustness: {corruptions: [contrast], eps: [0.0157]}``)::

        model = DeiTClassifier(num_classes=10, img_size=28, in_chans=1, model_kwargs=...,
                               robustness=dict(corruptions=["gaussian_noise", "contrast"], eps=[2 / 255]))
        Trainer(inference_mode=False).test(model, datamodule)
    """

    def __init__(
        self,
        model_name: str = "deit_tiny_patch16_224",
        num_classes: int = 1000,
        img_size: int = 224,
        in_chans: int = 3,
        pretrained: bool = False,
        model_kwargs: dict[str, Any] | None = None,
        mean: list[float] | None = None,
        std: list[float] | None = None,
        lr: float = 5e-4,
        weight_decay: float = 0.05,
        warmup_epochs: float = 0.0,
        min_lr_ratio: float = 0.01,
        label_smoothing: float = 0.0,
        robustness: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        if not isinstance(model_name, str) or not model_name:
            raise ValueError(f"model_name must be a timm model name, got {model_name!r}.")
        for what, value in (("num_classes", num_classes), ("img_size", img_size), ("in_chans", in_chans)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{what} must be a positive integer, got {value!r}.")
        if model_kwargs is not None and not isinstance(model_kwargs, Mapping):
            raise ValueError(f"model_kwargs must be a dict of timm.create_model arguments, got {model_kwargs!r}.")
        clashing = {"num_classes", "img_size", "in_chans", "pretrained"} & set(model_kwargs or {})
        if clashing:
            raise ValueError(f"pass {sorted(clashing)} as DeiTClassifier arguments, not inside model_kwargs.")
        for what, value in (("lr", lr), ("weight_decay", weight_decay), ("warmup_epochs", warmup_epochs)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
                raise ValueError(f"{what} must be a number >= 0, got {value!r}.")
        if not 0.0 <= min_lr_ratio <= 1.0:
            raise ValueError(f"min_lr_ratio must be in [0, 1], got {min_lr_ratio!r}.")
        if not 0.0 <= label_smoothing < 1.0:
            raise ValueError(f"label_smoothing must be in [0, 1), got {label_smoothing!r}.")
        robustness_config = self._check_robustness(robustness, img_size)
        self.save_hyperparameters()

        self.model = timm.create_model(
            model_name,
            pretrained=pretrained,
            num_classes=num_classes,
            img_size=img_size,
            in_chans=in_chans,
            **dict(model_kwargs or {}),
        )
        self.distilled = callable(getattr(self.model, "set_distilled_training", None))
        if self.distilled:
            self.model.set_distilled_training(True)  # train mode returns (class head, distillation head)
        default_mean, default_std = self._pretrained_normalisation(in_chans)
        self.register_buffer("mean", self._channel_tensor("mean", mean, default_mean, in_chans))
        self.register_buffer("std", self._channel_tensor("std", std, default_std, in_chans))
        if bool((self.std <= 0).any()):
            raise ValueError(f"std must be positive, got {self.std.flatten().tolist()}.")

        self.val_clean_acc = MulticlassAccuracy(num_classes=num_classes, average="micro")
        self.test_robustness = RobustnessEvaluator(num_classes, prefix="test", **robustness_config)
        self._test_offset = 0

    # ------------------------------------------------------------------ configuration helpers
    @staticmethod
    def _check_robustness(robustness: dict[str, Any] | None, img_size: int) -> dict[str, Any]:
        """The evaluator's arguments: clean only for ``None``, else the dict with defaults."""
        if robustness is None:
            return {"corruptions": (), "eps": ()}
        if not isinstance(robustness, Mapping):
            raise ValueError(f"robustness must be None or a dict with keys {', '.join(_ROBUSTNESS_KEYS)}.")
        unknown = sorted(set(robustness) - set(_ROBUSTNESS_KEYS))
        if unknown:
            raise ValueError(f"unknown robustness keys {unknown}: use {', '.join(_ROBUSTNESS_KEYS)}.")
        config = dict(robustness)
        config.setdefault("eps", SMALL_IMAGE_EPS if img_size <= 32 else IMAGENET_EPS)
        return config

    def _pretrained_normalisation(self, in_chans: int) -> tuple[list[float], list[float]]:
        cfg = getattr(self.model, "pretrained_cfg", None) or {}
        mean, std = cfg.get("mean"), cfg.get("std")
        if mean is None or std is None:
            return [0.5] * in_chans, [0.5] * in_chans
        mean, std = list(mean), list(std)
        if len(mean) != in_chans:  # e.g. an RGB config for a grey model: one averaged channel
            mean = [sum(mean) / len(mean)] * in_chans
            std = [sum(std) / len(std)] * in_chans
        return mean, std

    @staticmethod
    def _channel_tensor(what: str, value: Sequence[float] | None, default: list[float], in_chans: int) -> torch.Tensor:
        values = list(default if value is None else value)
        if len(values) == 1:
            values = values * in_chans
        if len(values) != in_chans:
            raise ValueError(f"{what} needs one value per channel ({in_chans}), got {value!r}.")
        return torch.tensor(values, dtype=torch.float32).view(1, in_chans, 1, 1)

    # ------------------------------------------------------------------ forward
    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        """[0, 1] pixels -> the network's input (channel repeat for grey inputs, then (x - mean) / std)."""
        if images.shape[1] == 1 and self.mean.shape[1] == 3:
            images = images.expand(-1, 3, -1, -1)
        return (images - self.mean.to(images.dtype)) / self.std.to(images.dtype)

    def _heads(self, images: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, ...]:
        """The network's raw output: a tuple of head logits for a distilled model in train mode."""
        return self.model(self.normalize(images))

    @override
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        out = self._heads(images)
        if isinstance(out, (tuple, list)):
            out = sum(out) / len(out)
        return out

    # ------------------------------------------------------------------ steps
    @staticmethod
    def _unpack(batch: Any) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        if isinstance(batch, Mapping):
            return batch["images"], batch["labels"], batch.get("indices")
        if isinstance(batch, (tuple, list)) and len(batch) in (2, 3):
            return batch[0], batch[1], batch[2] if len(batch) == 3 else None
        raise ValueError("DeiTClassifier batches are (images, labels) or (images, labels, dataset_indices).")

    def task_loss(self, batch: Any) -> torch.Tensor:
        """The plain task loss of every sample, ``(B,)``: cross-entropy of the model's prediction with the
        true labels (no label smoothing; a distilled DeiT's two heads averaged as at inference). CAP's
        empirical Fisher differentiates this loss (``RobOPCallback``'s default for RobOP-CAP)."""
        images, labels, _ = self._unpack(batch)
        return F.cross_entropy(self(images).float(), labels, reduction="none")

    def per_sample_loss(self, batch: Any) -> torch.Tensor:
        """The training loss of every sample, ``(B,)`` (CAP's empirical Fisher: ``curvature="fisher"``)."""
        images, labels, _ = self._unpack(batch)
        out = self._heads(images)
        heads = out if isinstance(out, (tuple, list)) else (out,)
        smoothing = self.hparams.label_smoothing
        return sum(F.cross_entropy(h.float(), labels, label_smoothing=smoothing, reduction="none")
                   for h in heads) / len(heads)

    @override
    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        images, labels, _ = self._unpack(batch)
        out = self._heads(images)
        heads = out if isinstance(out, (tuple, list)) else (out,)
        smoothing = self.hparams.label_smoothing
        loss = sum(F.cross_entropy(h.float(), labels, label_smoothing=smoothing) for h in heads) / len(heads)
        self.log("train/loss", loss, prog_bar=True, batch_size=images.shape[0])
        return loss

    @override
    def validation_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:
        images, labels, _ = self._unpack(batch)
        self.val_clean_acc.update(self(images), labels)
        self.log("val/clean_acc", self.val_clean_acc, prog_bar=True, batch_size=images.shape[0])

    @override
    def on_test_start(self) -> None:
        if self.test_robustness.needs_grad and torch.is_inference_mode_enabled():
            raise MisconfigurationException(
                "DeiTClassifier(robustness=...) runs PGD / FGSM inside test, which needs gradients: "
                "use Trainer(inference_mode=False), or robustness with eps=[] for corruptions only."
            )

    @override
    def on_test_epoch_start(self) -> None:
        self._test_offset = 0

    @override
    def test_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:
        images, labels, indices = self._unpack(batch)
        if indices is None:
            indices = torch.arange(self._test_offset, self._test_offset + images.shape[0])
        self._test_offset += images.shape[0]
        self.test_robustness.update(self, images, labels, indices)
        for collection in self.test_robustness.collections():
            self.log_dict(collection, batch_size=images.shape[0])

    # ------------------------------------------------------------------ optimisation
    @override
    def configure_optimizers(self) -> dict[str, Any]:
        hp = self.hparams
        no_decay = getattr(self.model, "no_weight_decay", lambda: set())()
        groups = param_groups_weight_decay(self.model, hp.weight_decay, no_weight_decay_list=no_decay)
        optimizer = torch.optim.AdamW(groups, lr=hp.lr)
        total = max(1, int(self.trainer.estimated_stepping_batches))
        epochs = self.trainer.max_epochs if self.trainer.max_epochs and self.trainer.max_epochs > 0 else None
        warmup = round(hp.warmup_epochs * total / epochs) if epochs else 0
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda step: warmup_cosine(step, warmup, total, hp.min_lr_ratio)
        )
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
