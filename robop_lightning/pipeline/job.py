"""One pruning job, set up once: :func:`prepare_job`, and :func:`run_job`, which runs it.

Every front door (``prune_model``, ``prune_model_structured``, ``prune_model_fisher``, the
callback, ``robop-prune``) builds a :class:`robop_lightning.config.PruneConfig` (every option
checked there, once) and calls :func:`run_job`. :func:`prepare_job` does what every kind of pruning
needs, once: the blocks and target linears, the shared-weight check, the calibration batches,
where the model lives and where it is calibrated, the report and (through :meth:`Job.open_walk`)
the resume store and the :class:`robop_lightning.pipeline.walk.BlockWalk`. The kind of pruning is
the ``Step`` the walk runs:

* masks (unstructured, ``row``, ``N:M``): :mod:`robop_lightning.pipeline.mask_step`;
* whole heads and channels removed (``pattern="structured"``): :mod:`robop_lightning.pipeline.shrink_step`;
* CAP's empirical Fisher (``curvature="fisher"``): :mod:`robop_lightning.pipeline.fisher_step`.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from robop_lightning.config import PruneConfig
from robop_lightning.pipeline.calibration import default_forward
from robop_lightning.pipeline.dispatch import execution_device
from robop_lightning.pipeline.gradients import batch_size_of, slice_batch
from robop_lightning.pipeline.targets import default_solver, find_blocks, is_transposed, resolve_targets
from robop_lightning.pipeline.walk import BlockWalk, open_resume_store
from robop_lightning.report import PruneReport

__all__ = ["Job", "prepare_job"]


@dataclass
class Job:
    """A pruning job after its set-up (see :func:`prepare_job`)."""

    model: nn.Module
    config: PruneConfig
    batches: list[Any]
    forward: Callable[[nn.Module, Any], Any]
    container: str | None  # the dotted name of the block list (None: a model without blocks)
    block_list: list[tuple[str, nn.Module]]
    names: list[str]  # the target linears, in model order
    modules: dict[str, nn.Module]
    home: torch.device  # where the model lives
    device: torch.device  # where blocks are calibrated and solved
    progress: bool | None = None
    prior_masks: dict[str, torch.Tensor] | None = None
    loss_fn: Callable[[nn.Module, Any], torch.Tensor] | None = None
    solver_default: str | None = None  # why the solver was chosen, when the config left it to the model
    curvature_default: str | None = None  # why the curvature was chosen, when the config left it open
    start: float = field(default_factory=time.perf_counter)

    @property
    def block_names(self) -> list[str] | None:
        """The blocks' names (``None`` for a model without repeated blocks)."""
        return [b for b, _ in self.block_list] if self.container is not None else None

    def open_walk(self, identity: Mapping[str, Any], targets: Mapping[str, torch.Tensor],
                  restored_note: str = "every weight of the model was restored",
                  dtype: tuple[str, torch.dtype] | None = None) -> BlockWalk:
        """The job's :class:`BlockWalk`, with its resume store when ``resume_dir`` is set.

        ``identity`` names the job's arguments (a different one in the same ``resume_dir`` raises);
        ``targets`` are the tensors whose shapes and dtypes are part of it.
        """
        store = None
        if self.config.resume_dir is not None:
            store = open_resume_store(self.config.resume_dir, self.model, targets, self.batches, identity,
                                      self.prior_masks)
        return BlockWalk(self.model, self.batches, self.forward, self.device,
                         activation_budget=self.config.activation_budget, progress=self.progress, resume=store,
                         dtype=dtype, restored_note=restored_note, home=self.home)

    def finish(self, report: PruneReport, walk: BlockWalk | None = None) -> PruneReport:
        """Stamp the wall time (and the walk's per-block times and peak memory) on ``report``."""
        report.seconds = time.perf_counter() - self.start
        if walk is not None:
            report.blocks = walk.block_times
            report.peak_memory = walk.peak_memory
        return report


def _fisher_samples(calibration: Iterable[Any], gradients: int | None, grad_batch: int, batch_size: int) -> list[Any]:
    """The calibration samples CAP's Fisher uses, cut into the batches its gradients are taken on.

    ``grad_batch == 1``: each batch cut into pieces of at most ``batch_size`` samples (per-sample
    gradients), the first ``gradients`` samples (all with ``None``). ``grad_batch > 1``:
    mini-batches of exactly ``grad_batch`` samples (across batch boundaries), one gradient each, the
    first ``gradients`` of them (all whole ones with ``None``; a last partial one is left out).
    """
    if grad_batch > 1:
        return _mini_batches(calibration, gradients, grad_batch)
    out, seen = [], 0
    for batch in calibration:
        size = batch_size_of(batch)
        for a in range(0, size, batch_size):
            if gradients is not None and seen >= gradients:
                return out
            take = min(batch_size, size - a, size if gradients is None else gradients - seen)
            out.append(slice_batch(batch, a, a + take))
            seen += take
        if gradients is not None and seen >= gradients:
            break
    return out


def _mini_batches(calibration: Iterable[Any], gradients: int | None, grad_batch: int) -> list[Any]:
    out: list[Any] = []
    pending: list[Any] = []
    held = 0
    for batch in calibration:
        size, a = batch_size_of(batch), 0
        while a < size:
            if gradients is not None and len(out) >= gradients:
                return out
            take = min(grad_batch - held, size - a)
            pending.append(slice_batch(batch, a, a + take))
            held, a = held + take, a + take
            if held == grad_batch:
                out.append(_concat(pending))
                pending, held = [], 0
    return out


def _concat(pieces: list[Any]) -> Any:
    """One batch holding the samples of ``pieces`` (slices of batches with the same structure)."""
    first = pieces[0]
    if len(pieces) == 1:
        return first
    if isinstance(first, torch.Tensor):
        return torch.cat(pieces) if first.dim() > 0 else first
    if isinstance(first, (tuple, list)):
        return type(first)(_concat([p[i] for p in pieces]) for i in range(len(first)))
    if isinstance(first, dict):
        return {k: _concat([p[k] for p in pieces]) for k in first}
    return first


def _check_call(model: nn.Module, config: PruneConfig, forward: Any, loss_fn: Any, prior_masks: Any) -> None:
    """The arguments that are code, not data (so not in the config), against the config."""
    fisher = config.curvature == "fisher"
    if (fisher or config.structured) and any(is_transposed(m) for m in model.modules()):
        raise ValueError("GPT-2-style Conv1D layers are pruned with masks (pattern 'unstructured', 'row' or 'N:M'); "
                         "pattern='structured' and curvature='fisher' take nn.Linear layers only.")
    if fisher:
        given = [k for k, v in (("prior_masks", prior_masks), ("forward", forward)) if v is not None]
        if given:
            raise ValueError(f"curvature='fisher' is CAP's: use solver='cap', without {', '.join(given)} "
                             "(layer-reconstruction options).")
        if not callable(loss_fn):
            raise ValueError("curvature='fisher' needs loss_fn(model, batch) -> per-sample losses (shape (B,)).")
    elif loss_fn is not None:
        raise ValueError("loss_fn and fisher apply to curvature='fisher' only.")
    if config.structured and prior_masks:
        raise ValueError("pattern='structured' removes modules physically; prior_masks (gradual schedules) do not apply.")


def _devices(model: nn.Module, config: PruneConfig, modules: Mapping[str, nn.Module]) -> tuple[torch.device, torch.device]:
    """``(home, device)``: where the model lives, where blocks are calibrated and solved."""
    home = next(iter(modules.values())).weight.device if modules else next(model.parameters()).device
    dispatched = execution_device(model)  # accelerate keeps (some) weights off the device and onloads per forward
    if dispatched is not None:
        if config.structured:
            raise ValueError("pattern='structured' reshapes modules, which accelerate's offload hooks do not follow; "
                             "load the model onto the host (without a device_map offload) and pass device='cuda' to "
                             "onload it.")
        if config.device is not None and torch.device(config.device) != dispatched:
            raise ValueError(f"the model is dispatched by accelerate to run on {dispatched}; its hooks already onload "
                             f"the weights, so pass device=None (or {str(dispatched)!r}).")
        if config.resume_dir is not None:
            raise ValueError("resume_dir is not supported for accelerate-offloaded models yet (their weights are not "
                             "in the model's state_dict); prune without it, or load the model onto the host.")
        home = dispatched
    return home, home if config.device is None else torch.device(config.device)


def prepare_job(
    model: nn.Module,
    calibration: Iterable[Any],
    config: PruneConfig,
    *,
    forward: Callable[[nn.Module, Any], Any] | None = None,
    loss_fn: Callable[[nn.Module, Any], torch.Tensor] | None = None,
    progress: bool | None = None,
    prior_masks: Mapping[str, torch.Tensor] | None = None,
) -> Job:
    """Everything a pruning job needs before its first block, done once (see the module docstring).

    Raises:
        ValueError: arguments that do not fit the config, no blocks for ``pattern="structured"``,
            targets that match nothing or share a weight, an empty calibration, an accelerate
            dispatch that does not fit ``device`` / ``resume_dir``.
    """
    solver_default = curvature_default = None
    if config.solver is None:
        solver, solver_default = (("cap", "CAP's Fisher path") if config.curvature == "fisher"
                                  else default_solver(model))
        config = dataclasses.replace(config, solver=solver)
    if config.curvature is None:  # CAP's Fisher where the loss is known and every option fits it
        curvature, curvature_default = config.default_curvature(
            loss_fn is not None and forward is None and not prior_masks)
        config = dataclasses.replace(config, curvature=curvature)
        if curvature == "gram":
            loss_fn = None  # offered (the callback offers the module's loss), not used: the report says why
    _check_call(model, config, forward, loss_fn, prior_masks)
    structure = find_blocks(model, config.blocks)
    if structure is None and config.structured:
        raise ValueError(
            f"pattern='structured' needs a model with repeated transformer blocks; none found in {type(model).__name__}. "
            "Pass blocks='<dotted name of the block list>'."
        )
    container, block_list = structure if structure else (None, [])
    names = resolve_targets(model, config.targets, config.ignore, [b for b, _ in block_list] if structure else None)
    modules = {n: model.get_submodule(n) for n in names}
    check_shared_weights(model, modules)
    if config.curvature == "fisher":
        opts = config.fisher_options
        batches = _fisher_samples(calibration, opts.gradients, opts.grad_batch, opts.batch_size)
    else:
        batches = list(calibration)
    if not batches:
        if config.curvature == "fisher" and config.fisher_options.grad_batch > 1:
            raise ValueError(f"curvature='fisher': the calibration holds fewer than grad_batch="
                             f"{config.fisher_options.grad_batch} samples (one mini-batch gradient); pass more "
                             "batches, or a smaller grad_batch.")
        raise ValueError("calibration is empty: pass an iterable with at least one batch.")
    home, device = _devices(model, config, modules)
    return Job(model=model, config=config, batches=batches, forward=forward or default_forward, container=container,
               block_list=block_list, names=names, modules=modules, home=home, device=device, progress=progress,
               prior_masks=None if prior_masks is None else dict(prior_masks), loss_fn=loss_fn,
               solver_default=solver_default, curvature_default=curvature_default)


def check_shared_weights(model: nn.Module, modules: dict[str, nn.Module]) -> None:
    """Refuse targets whose weight tensor is also held elsewhere (tied or shared weights).

    Pruning writes the weight in place, so a shared tensor would be changed for every holder
    while being calibrated for one: an embedding tied to ``lm_head`` would lose entries chosen
    for the head, and two targets sharing a weight would each prune it for their own inputs.
    """
    holders: dict[int, list[str]] = {}
    for mname, module in model.named_modules(remove_duplicate=False):
        for pname, param in module.named_parameters(recurse=False):
            holders.setdefault(id(param), []).append(f"{mname}.{pname}" if mname else pname)
    for name, module in modules.items():
        others = [h for h in dict.fromkeys(holders.get(id(module.weight), [])) if h != f"{name}.weight"]
        if not others:
            continue
        owners = [o.rsplit(".", 1)[0] for o in others]
        shared_targets = [o for o in owners if o in modules]
        if shared_targets:
            raise ValueError(
                f"{name}: its weight is the same tensor as {shared_targets[0]}.weight (weights shared between "
                f"layers); pruning both would prune that tensor twice, each time for other inputs. Untie them first "
                f"(give {shared_targets[0]} its own copy: nn.Parameter(weight.detach().clone())), or leave both out "
                f"of the targets (ignore=[{name!r}, {shared_targets[0]!r}])."
            )
        raise ValueError(
            f"{name}: its weight is tied to {others[0]} (weights shared with another module, such as an embedding "
            f"tied to lm_head); pruning {name} would also zero entries of {owners[0]}, calibrated for {name} only. "
            f"Leave {name} out of the targets, or untie the weights first (give {name} its own copy of the weight; "
            "for Hugging Face models set config.tie_word_embeddings=False)."
        )
