"""``prune_model`` and ``run_job``: the front door of every pruning job, plain PyTorch.

``prune_model(model, batches, **options)`` builds a :class:`robop_lightning.config.PruneConfig`
(every option checked there, once) and calls :func:`run_job`, which the Lightning callback and
``robop-prune`` call with their config directly. :func:`run_job` sets the job up once
(:func:`robop_lightning.pipeline.job.prepare_job`) and runs the kind of pruning the config asks for:

* masks (``pattern`` unstructured, ``row``, ``N:M``): :func:`robop_lightning.pipeline.mask_step.prune_masks`;
* whole heads and channels (``pattern="structured"``): :func:`robop_lightning.pipeline.shrink_step.shrink`;
* CAP's Fisher (``curvature="fisher"``): :func:`robop_lightning.pipeline.fisher_step.prune_fisher`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from robop_lightning.config import FisherOptions, PruneConfig
from robop_lightning.engine.selection import AutoOptions
from robop_lightning.pipeline.fisher_step import prune_fisher
from robop_lightning.pipeline.job import prepare_job
from robop_lightning.pipeline.mask_step import prune_masks
from robop_lightning.pipeline.shrink_step import shrink
from robop_lightning.report import PruneReport

__all__ = ["PruneReport", "prune_model", "run_job"]


def run_job(
    model: nn.Module,
    calibration: Iterable[Any],
    config: PruneConfig,
    *,
    forward: Callable[[nn.Module, Any], Any] | None = None,
    loss_fn: Callable[[nn.Module, Any], torch.Tensor] | None = None,
    progress: bool | None = None,
    prior_masks: Mapping[str, torch.Tensor] | None = None,
) -> PruneReport:
    """Prune ``model`` in place as ``config`` says (see :func:`prune_model` for every option).

    The arguments that are code or state, not options, stay arguments: ``forward(model, batch)``,
    ``loss_fn(model, batch) -> (B,)`` (``curvature="fisher"``), ``progress`` and ``prior_masks``.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4))
        >>> config = PruneConfig(sparsity=0.5, solver="sparsegpt", uncertainty="trace")
        >>> report = run_job(model, [torch.randn(8, 16) for _ in range(4)], config)
        >>> round(report.totals["sparsity"], 2)
        0.5
    """
    job = prepare_job(model, calibration, config, forward=forward, loss_fn=loss_fn, progress=progress,
                      prior_masks=prior_masks)
    if job.config.curvature == "fisher":
        return prune_fisher(job)
    if job.config.structured:
        return shrink(job)
    return prune_masks(job)


def prune_model(
    model: nn.Module,
    calibration: Iterable[Any],
    sparsity: float | None = 0.5,
    pattern: str = "unstructured",
    solver: str | None = None,
    uncertainty: str = "trace",
    radius: float | None = None,
    targets: list[str] | str | None = None,
    ignore: list[str] | str | None = None,
    blocks: str | None = None,
    heldout_fraction: float = 0.0,
    forward: Callable[[nn.Module, Any], Any] | None = None,
    progress: bool | None = None,
    prior_masks: dict[str, torch.Tensor] | None = None,
    resume_dir: str | Path | None = None,
    activation_budget: int | str | None = None,
    curvature: str | None = None,
    loss_fn: Callable[[nn.Module, Any], torch.Tensor] | None = None,
    fisher: FisherOptions | dict[str, Any] | None = None,
    *,
    coupled: bool | None = None,
    rounds: int = 3,
    damping: float = 0.01,
    solver_options: Any = None,
    auto: AutoOptions | dict[str, Any] | None = None,
    device: str | torch.device | None = None,
) -> PruneReport:
    """Prune the linear layers of ``model`` in place, block by block, with :func:`prune_layer`.

    Args:
        model: any ``nn.Module`` (a LightningModule works too); stays on its device.
        calibration: an iterable of batches, iterated once: tensors, tuples / lists (the first
            item is the input) or dicts (passed as keyword arguments).
        sparsity: fraction of weights set to zero in every target (``None``: implied by an
            ``N:M`` pattern).
        pattern: ``"unstructured"``, ``"row"``, ``"N:M"`` such as ``"2:4"``, or ``"structured"``:
            whole heads and MLP channels removed physically (:mod:`robop_lightning.pipeline.shrink_step`;
            ``solver_options`` may hold ``budget``, ``cost``, ``min_keep``, ``max_sparsity``, ``per_step``).
        solver: ``"alps"``, ``"cap"``, ``"sparsegpt"``, ``"wanda"`` or ``"magnitude"``; ``None``: ALPS
            (RobOP-ALPS) for a causal language model, CAP (RobOP-CAP) for anything else
            (:func:`robop_lightning.pipeline.targets.default_solver`; the report's ``config`` says which and why).
        uncertainty: ``"baseline"``, ``"trace"`` (default), ``"e"`` (``"ellipsoid"``) or ``"cte"``: the
            authors' closed forms, one solve; ``"minmax-trace"``, ``"minmax-e"``, ``"cvar"``: this
            project's min-max extension (:mod:`robop_lightning.engine.sets`).
        radius: the authors' ``gamma`` (``None``: 0.01; baseline: ``damping``), or ``rho`` /
            ``alpha`` for the extension.
        targets: linears to prune: module names (a container selects all linears in it) or
            ``"re:<regex>"`` patterns. ``None``: every linear inside the repeated blocks, or for a
            model without blocks every linear except output heads (``head``, ``head_dist``,
            ``lm_head``, ``classifier``, ``score``, or a linear named ``fc``).
        ignore: names or patterns left dense (wins over ``targets``).
        blocks: dotted name of the module list holding the blocks; ``None`` finds it.
        heldout_fraction: share of the calibration samples (the last ones) kept out of pruning
            and used to report each layer's held-out error.
        forward: ``forward(model, batch)`` for batches the default rule cannot run.
        progress: show a progress bar over blocks (``None`` / ``True``: only on a terminal).
        prior_masks: ``{layer name: keep-mask}`` of an earlier pruning (gradual schedules): those
            zeros stay, count towards the budget and are compensated by the solver.
        resume_dir: a directory that makes a long pruning resumable (see
            :mod:`robop_lightning.pipeline.resume`): every finished block (or linear pruned on its own) is
            written there atomically (``block-00012.safetensors`` plus ``manifest.json``). After a
            crash, SIGKILL or Ctrl-C, calling ``prune_model`` again with the same model, data,
            arguments and ``resume_dir`` loads the finished blocks, replays the calibration
            activations through them and continues: the result is bit-identical to an
            uninterrupted run. A directory written by a different job (other arguments, weights
            or calibration data) raises ``ValueError``. ``None``: nothing is written.
        activation_budget: bytes (or a size such as ``"2GB"``, ``"512MiB"``) of calibration
            activations held in memory; what exceeds it (hidden states between blocks, inputs
            captured for a block's linears) is kept in temporary files and read back in chunks
            (:mod:`robop_lightning.utils.offload`). Results equal the in-memory ones up to the float64
            summation order of the Grams. ``None``: everything stays in memory (CPU when the
            model is on an accelerator).
        curvature: ``"fisher"``: CAP's empirical block Fisher of the loss, OBS inside each block and
            one global threshold (RobOP-CAP as its authors pair it; needs ``loss_fn``);
            ``"gram"``: each layer's reconstruction error under its input Gram, block by block
            (label-free: no loss needed). ``None`` (default): ``"fisher"`` when the solver is CAP,
            ``loss_fn`` is given and every option fits it, else ``"gram"`` (the report's
            ``config["curvature_default"]`` says why).
        loss_fn: ``loss_fn(model, batch) -> (B,)`` per-sample losses (the task loss, with the batch's
            labels), for CAP's Fisher.
        fisher: :class:`robop_lightning.config.FisherOptions` (or a dict): ``gradients``,
            ``block_size``, ``lam``, ``batch_size``, ``selection`` (``"global"`` / ``"uniform"``), ``method``.
        coupled, rounds, damping: engine options of :func:`prune_layer` (the extension's coupled
            form; rounds of the alternating scheme; the Baseline damping).
        solver_options: the solver's options (a dict or its dataclass from
            :mod:`robop_lightning.engine.solvers.options`); for ``pattern="structured"`` the keys of
            :class:`robop_lightning.config.StructuredOptions`.
        device: where blocks are calibrated and solved (``None``: where the model is). With the
            model on the host and ``device="cuda"``, the weights stay on the host and each block moves
            to the GPU for its capture and solving, then back (onloading): the GPU holds about one
            block, its activations and one layer's solver work. The result equals pruning with the
            whole model on ``device``.
        auto: how ``uncertainty="auto"`` / ``radius="auto"`` choose, per layer
            (:class:`robop_lightning.engine.selection.AutoOptions` or a dict); each report row then has a
            ``selection``: the chosen set and every candidate's held-out fold errors.

    All options are checked first, in one place (:class:`robop_lightning.config.PruneConfig`).

    Returns:
        A :class:`PruneReport` (``str(report)`` is a table; ``report.masks`` holds the masks).

    Raises:
        ValueError: empty calibration, NaN / Inf activations, bad arguments, targets that match
            nothing, a ``resume_dir`` of another job; the message names the layer. On any
            exception every weight is restored (the files in ``resume_dir`` stay, to resume from).
        RuntimeError: ranks of a process group ended with different masks.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4))
        >>> batches = [torch.randn(8, 16) for _ in range(4)]
        >>> report = prune_model(model, batches, sparsity=0.5, solver="sparsegpt", uncertainty="baseline")
        >>> round(report.totals["sparsity"], 2)
        0.5
    """
    config = PruneConfig(sparsity=sparsity, pattern=pattern, solver=solver, uncertainty=uncertainty, radius=radius,
                         coupled=coupled, rounds=rounds, damping=damping, solver_options=solver_options, auto=auto,
                         targets=targets, ignore=ignore, blocks=blocks, heldout_fraction=heldout_fraction,
                         resume_dir=resume_dir, activation_budget=activation_budget, curvature=curvature, fisher=fisher,
                         device=None if device is None else str(device))
    return run_job(model, calibration, config, forward=forward, loss_fn=loss_fn, progress=progress,
                   prior_masks=prior_masks)
