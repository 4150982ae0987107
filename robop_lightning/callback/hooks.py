"""Small pieces of the callback's glue: gradual schedules, the checkpoint a fit will restore, and
where the masks attach under sharding strategies."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.strategies import FSDPStrategy, ModelParallelStrategy
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch import nn

from robop_lightning.engine.patterns import parse_pattern
from robop_lightning.pipeline.targets import is_linear

__all__ = ["check_schedule", "checkpoint_to_restore", "check_layers_before_sharding", "holder", "module_loss",
           "optimizer_states_to",
           "shards_after_setup"]


def check_schedule(schedule: Any, pattern: str) -> dict[int, float]:
    """``{epoch: sparsity}`` checked: epochs >= 0, sparsities valid for ``pattern`` and not decreasing."""
    if not isinstance(schedule, Mapping) or not schedule:
        raise ValueError(f"schedule must be a non-empty mapping {{epoch: sparsity}}, got {schedule!r}.")
    out: dict[int, float] = {}
    for epoch, value in schedule.items():
        try:
            key = int(epoch)
        except (TypeError, ValueError):
            key = -1
        if isinstance(epoch, bool) or key < 0 or str(key) != str(epoch).strip():
            raise ValueError(f"schedule keys must be epoch numbers >= 0, got {epoch!r}.")
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"schedule[{key}] must be a sparsity in [0, 1), got {value!r}.")
        parse_pattern(pattern, float(value))
        out[key] = float(value)
    ordered = sorted(out.items())
    if any(b[1] < a[1] for a, b in zip(ordered[:-1], ordered[1:], strict=True)):
        raise ValueError(
            f"schedule sparsities must not decrease with the epochs (pruned weights stay pruned), got {schedule!r}."
        )
    if parse_pattern(pattern, None).kind == "nm" and len(ordered) > 1:
        raise ValueError(
            f"pattern {pattern!r} fixes the sparsity; a gradual schedule needs 'unstructured' or 'row'."
        )
    return dict(ordered)


def checkpoint_to_restore(trainer: pl.Trainer) -> Any:
    """The checkpoint the running ``fit`` (``validate``, ``test``) will restore, as known in ``setup``.

    ``trainer.ckpt_path``: Lightning sets it in advance when the path is given as
    ``trainer.ckpt_path = path`` before ``trainer.fit(model)``. For ``trainer.fit(model, ckpt_path=path)``
    it is set only at the restore, which the strategies that shard after ``setup`` (FSDP,
    ``ModelParallelStrategy``) do after the sharding; nothing public holds the path before then. There
    the callback prunes in ``setup`` (on whole weights, as it must) and the restored state then
    replaces the result: the same model, one pruning spent (a warning says how to skip it).
    """
    return trainer.ckpt_path


def optimizer_states_to(optimizers: Iterable[torch.optim.Optimizer], device: torch.device) -> None:
    """Move the tensors of every optimizer's state to ``device`` (the ``step`` counters stay where
    they are: some optimizers need them on the CPU)."""
    for optimizer in optimizers:
        for state in optimizer.state.values():
            for key, value in state.items():
                if key != "step" and isinstance(value, torch.Tensor):
                    state[key] = value.to(device)


def shards_after_setup(strategy: object) -> bool:
    """Whether ``strategy`` shards the parameters after ``setup`` (so the callback prunes in ``setup``)."""
    return isinstance(strategy, (ModelParallelStrategy, FSDPStrategy))


def holder(trainer: pl.Trainer, pl_module: pl.LightningModule) -> nn.Module:
    """The module the masks attach to: under ``FSDPStrategy`` the FSDP1 root that wraps ``pl_module``
    (it owns the parameters outside the auto-wrapped units), else ``pl_module``."""
    model = trainer.strategy.model
    if isinstance(trainer.strategy, FSDPStrategy) and model is not None and model is not pl_module:
        return model
    return pl_module


def check_layers_before_sharding(pl_module: pl.LightningModule, strategy: object) -> None:
    """Under a sharding strategy the callback prunes in ``setup``, before ``configure_model``: a module
    that only builds its layers there has nothing to prune yet."""
    if not any(is_linear(m) for m in pl_module.modules()):
        raise MisconfigurationException(
            f"RobOPCallback prunes in setup under {type(strategy).__name__}, before configure_model, but "
            f"{type(pl_module).__name__} has no nn.Linear yet (built in configure_model?). Build or load the model "
            "in __init__ (on the host; RobOPCallback(device='cuda') onloads one block at a time), or prune first "
            "with prune_model and fine-tune without the callback."
        )


def module_loss(module: Any, which: str) -> Any:
    """``loss_fn(module, batch) -> (B,)`` from the module's own methods, or ``None`` where it has none.

    ``which="task"``: ``task_loss`` (the plain task loss, CAP's), else ``per_sample_loss``;
    ``which="training"``: ``per_sample_loss`` (the training objective), else ``task_loss``.
    """
    order = ("task_loss", "per_sample_loss") if which == "task" else ("per_sample_loss", "task_loss")
    for name in order:
        if callable(getattr(module, name, None)):
            return lambda m, batch, name=name: getattr(m, name)(batch)
    return None
