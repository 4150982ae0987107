"""``CausalLMModule``: a Hugging Face causal LM (Llama family) as a LightningModule.

Evaluation follows ``docs/evaluation.md``: perplexity is ``exp(mean token NLL)`` over **all** scored
tokens of a split (NLL in float32, summed in float64 across batches, never a mean of per-batch
perplexities) and next-token accuracy is ``mean[argmax logits_t == token_t+1]`` (argmax ids passed
to torchmetrics). The maths is in :func:`token_nll`; :class:`TokenPerplexity` only accumulates.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from lightning.pytorch import LightningModule
from torch import nn
from torch.distributed.fsdp import fully_shard
from torchmetrics import Metric
from torchmetrics.classification import MulticlassAccuracy
from typing_extensions import override

from robop_lightning.assets import require
from robop_lightning.models._checkpoint import StructuredCheckpointHooks

__all__ = ["CausalLMModule", "TokenPerplexity", "load_causal_lm", "token_nll"]

IGNORE_INDEX = -100


def token_nll(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-token next-token NLL (float32), argmax predictions and targets of the scored tokens.

    Position ``t`` predicts ``labels[:, t + 1]``; labels equal to ``-100`` are not scored. The
    shift is applied to the labels (a padded copy), so the ``(B, T, V)`` logits are never copied.

    Args:
        logits: ``(B, T, V)`` logits of any float dtype.
        labels: ``(B, T)`` token ids aligned with the inputs (``-100`` = ignore).

    Returns:
        ``(nll, preds, targets)``, each 1-D over the scored tokens.

    Example:
        >>> logits = torch.zeros(1, 3, 5)
        >>> nll, preds, targets = token_nll(logits, torch.tensor([[1, 2, 3]]))
        >>> torch.allclose(nll, torch.full((2,), math.log(5)))
        True
    """
    shifted = torch.full_like(labels, IGNORE_INDEX)
    shifted[:, :-1] = labels[:, 1:]
    flat_logits = logits.reshape(-1, logits.shape[-1])
    flat_targets = shifted.reshape(-1)
    keep = flat_targets != IGNORE_INDEX
    nll = F.cross_entropy(flat_logits.float(), flat_targets, ignore_index=IGNORE_INDEX, reduction="none")
    preds = logits.argmax(dim=-1).reshape(-1)
    return nll[keep], preds[keep], flat_targets[keep]


class TokenPerplexity(Metric):
    """``exp(sum NLL / token count)`` accumulated over every token of a split (float64 sums).

    Example:
        >>> metric = TokenPerplexity()
        >>> metric.update(torch.tensor([1.0, 2.0])); metric.update(torch.tensor([3.0]))
        >>> round(float(metric.compute()), 4) == round(math.exp(2.0), 4)
        True
    """

    is_differentiable = False
    higher_is_better = False
    full_state_update = False

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.add_state("nll_sum", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("tokens", default=torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, nll: torch.Tensor) -> None:
        """Add the per-token NLLs of one batch (1-D)."""
        self.nll_sum += nll.detach().double().sum()
        self.tokens += nll.numel()

    def compute(self) -> torch.Tensor:
        """Perplexity of everything seen since the last reset."""
        return torch.exp(self.nll_sum / self.tokens.clamp(min=1))


def load_causal_lm(model: str | nn.Module) -> nn.Module:
    """Resolve a model object, a hub id / local path, or ``"embedded"`` (cached Gemma 3 270M).

    Raises:
        AssetMissingError: ``"embedded"`` without the cached asset (the message says to run
            ``python -m robop_lightning.assets fetch gemma3-270m``).
        TypeError: not a module nor a string.

    Example:
        >>> from transformers import LlamaConfig, LlamaForCausalLM
        >>> tiny = LlamaForCausalLM(LlamaConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
        ...                                     num_attention_heads=2, num_key_value_heads=1, vocab_size=50))
        >>> load_causal_lm(tiny) is tiny
        True
    """
    if isinstance(model, nn.Module):
        return model
    if not isinstance(model, str):
        raise TypeError(f"model must be an nn.Module, a hub id / path or 'embedded', got {type(model).__name__}")
    from transformers import AutoModelForCausalLM

    if model == "embedded":
        model = str(require("gemma3-270m"))
    return AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32)


def _split_batch(batch: Any) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    if isinstance(batch, torch.Tensor):
        if batch.ndim != 2:
            raise ValueError(f"a batch of ids must be (batch, seqlen), got shape {tuple(batch.shape)}")
        return batch, None, batch
    if isinstance(batch, Mapping):
        ids = batch["input_ids"]
        mask = batch.get("attention_mask")
        labels = batch.get("labels")
        if labels is None:
            labels = ids if mask is None else ids.masked_fill(mask == 0, IGNORE_INDEX)
        return ids, mask, labels
    raise TypeError(f"batch must be a LongTensor of ids or a dict with 'input_ids', got {type(batch).__name__}")


class CausalLMModule(StructuredCheckpointHooks, LightningModule):
    """Train and evaluate a Hugging Face causal language model (Llama / Gemma / Mistral family).

    Lifecycle:

    * ``__init__``: resolve the model (:func:`load_causal_lm`); one perplexity and one accuracy
      metric per evaluation dataloader and stage.
    * ``training_step``: causal LM loss (mean token NLL in float32), logged as ``train/loss``.
    * ``validation_step`` / ``test_step``: update that dataloader's metrics; logged at epoch end as
      ``{stage}/{name}/ppl`` and ``{stage}/{name}/next_token_acc`` where ``name`` is
      ``dataloader_names[dataloader_idx]`` (``""`` gives ``test/ppl``, ``"ood"`` gives ``test/ood/ppl``).
    * ``configure_optimizers``: AdamW (no decay on biases / norms / 1-D parameters) with linear
      warmup over ``warmup_steps`` then cosine decay to ``min_lr_ratio * lr`` at ``max_steps``
      (default: ``trainer.estimated_stepping_batches``).

    Batches are a LongTensor of ids ``(B, T)`` or a dict with ``input_ids`` and optionally
    ``attention_mask`` (padding is not scored) and ``labels`` (aligned with the inputs, ``-100``
    = ignore; the shift is done here).

    Args:
        model: a model object, a hub id / local path for ``AutoModelForCausalLM``, or
            ``"embedded"`` (the Gemma 3 270M of :mod:`robop_lightning.assets`). A model object is
            not stored in the hyperparameters (pass it again when loading a checkpoint).
        lr: peak learning rate.
        weight_decay: AdamW weight decay (matrices only).
        betas: AdamW betas.
        warmup_steps: linear warmup steps.
        max_steps: length of the cosine schedule (``None``: the trainer's stepping batches).
        min_lr_ratio: final learning rate as a fraction of ``lr``.
        dataloader_names: names of the evaluation dataloaders, by index.

    Raises:
        ValueError: invalid optimisation settings or dataloader names; an evaluation dataloader
            index without a name.
        AssetMissingError: ``model="embedded"`` and the asset was not fetched.

    Example:
        >>> from transformers import LlamaConfig, LlamaForCausalLM
        >>> from lightning.pytorch import Trainer
        >>> tiny = LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        ...     num_attention_heads=4, num_key_value_heads=2, vocab_size=64))
        >>> module = CausalLMModule(tiny)
        >>> windows = torch.utils.data.DataLoader(torch.randint(0, 64, (8, 16)), batch_size=4)
        >>> trainer = Trainer(logger=False, enable_progress_bar=False, enable_model_summary=False)
        >>> out = trainer.test(module, [windows, windows], verbose=False)
        >>> sorted(out[1])
        ['test/ood/next_token_acc', 'test/ood/ppl']
    """

    def __init__(
        self,
        model: str | nn.Module = "embedded",
        lr: float = 1e-4,
        weight_decay: float = 0.0,
        betas: tuple[float, float] = (0.9, 0.95),
        warmup_steps: int = 0,
        max_steps: int | None = None,
        min_lr_ratio: float = 0.1,
        dataloader_names: list[str] | tuple[str, ...] = ("", "ood"),
    ) -> None:
        super().__init__()
        if lr <= 0 or weight_decay < 0 or warmup_steps < 0 or not 0 <= min_lr_ratio <= 1:
            raise ValueError("need lr > 0, weight_decay >= 0, warmup_steps >= 0 and 0 <= min_lr_ratio <= 1")
        if max_steps is not None and max_steps < 1:
            raise ValueError("max_steps must be >= 1 or None")
        names = list(dataloader_names)
        if not names or len(set(names)) != len(names) or any("/" in n for n in names):
            raise ValueError(f"dataloader_names must be distinct names without '/', got {names}")
        self.save_hyperparameters(ignore=None if isinstance(model, str) else ["model"])
        self.model = load_causal_lm(model)
        self.dataloader_names = names
        vocab = self.model.get_output_embeddings().weight.shape[0]

        def _metrics() -> nn.ModuleList:
            return nn.ModuleList(
                nn.ModuleDict({
                    "ppl": TokenPerplexity(),
                    "next_token_acc": MulticlassAccuracy(num_classes=vocab, average="micro",
                                                         ignore_index=IGNORE_INDEX, validate_args=False),
                })
                for _ in names
            )

        self.val_metrics = _metrics()
        self.test_metrics = _metrics()

    @override
    def configure_model(self) -> None:
        """Under ``ModelParallelStrategy``: shard every decoder layer, then the root, with FSDP2's ``fully_shard``.

        Nothing happens under other strategies (no device mesh) or when already sharded. RobOP's
        callback prunes the whole weights before this runs (``setup``) and shards its masks alike.
        """
        mesh = self.device_mesh
        if mesh is None or getattr(self, "_fully_sharded", False):
            return
        dp = mesh["data_parallel"] if "data_parallel" in (mesh.mesh_dim_names or ()) else mesh
        layers = getattr(getattr(self.model, "model", None), "layers", None)
        for layer in layers if layers is not None else []:
            fully_shard(layer, mesh=dp)
        fully_shard(self.model, mesh=dp)
        self._fully_sharded = True

    @override
    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Logits ``(B, T, V)``."""
        return self.model(input_ids=input_ids, attention_mask=attention_mask).logits

    def _nll(self, batch: Any) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        ids, mask, labels = _split_batch(batch)
        return token_nll(self(ids, mask), labels)

    @override
    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        nll, _, _ = self._nll(batch)
        loss = nll.mean()
        self.log("train/loss", loss, prog_bar=True, batch_size=nll.numel())
        return loss

    def _eval_step(self, stage: str, metrics: nn.ModuleList, batch: Any, dataloader_idx: int) -> None:
        if dataloader_idx >= len(metrics):
            raise ValueError(f"{stage} dataloader {dataloader_idx} has no name; pass dataloader_names with at least "
                             f"{dataloader_idx + 1} entries (now {self.dataloader_names})")
        nll, preds, targets = self._nll(batch)
        group = metrics[dataloader_idx]
        group["ppl"].update(nll)
        group["next_token_acc"].update(preds, targets)
        name = self.dataloader_names[dataloader_idx]
        prefix = f"{stage}/{name}/" if name else f"{stage}/"
        for key, metric in group.items():
            self.log(prefix + key, metric, on_step=False, on_epoch=True, add_dataloader_idx=False)

    @override
    def validation_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:
        self._eval_step("val", self.val_metrics, batch, dataloader_idx)

    @override
    def test_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:
        self._eval_step("test", self.test_metrics, batch, dataloader_idx)

    @override
    def configure_optimizers(self) -> Any:
        hp = self.hparams
        decay = [p for p in self.model.parameters() if p.requires_grad and p.ndim >= 2]
        no_decay = [p for p in self.model.parameters() if p.requires_grad and p.ndim < 2]
        optimizer = torch.optim.AdamW(
            [{"params": decay, "weight_decay": hp.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
            lr=hp.lr, betas=tuple(hp.betas),
        )
        total = hp.max_steps or max(1, int(self.trainer.estimated_stepping_batches))
        schedule = lambda step: _warmup_cosine(step, hp.warmup_steps, total, hp.min_lr_ratio)  # noqa: E731
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


def _warmup_cosine(step: int, warmup: int, total: int, min_ratio: float) -> float:
    """Learning-rate factor: linear warmup, then cosine from 1 to ``min_ratio`` at ``total``."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
