"""``RobOPCallback``: RobOP pruning as a Lightning callback (glue over
:func:`robop_lightning.pipeline.prune.run_job`)."""

from __future__ import annotations

import dataclasses
import os
import warnings
from itertools import islice
from typing import Any, Literal

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.strategies import DeepSpeedStrategy
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from lightning.pytorch.utilities.rank_zero import rank_zero_warn
from lightning.pytorch.utilities.rank_zero import rank_zero_info
from typing_extensions import override

from robop_lightning.callback.hooks import check_layers_before_sharding, checkpoint_to_restore, holder
from robop_lightning.callback.hooks import module_loss, optimizer_states_to, shards_after_setup
from robop_lightning.callback.loaders import calibration_loader
from robop_lightning.callback.options import PRUNING_KEYWORDS, CallbackOptions, pruning_config
from robop_lightning.config import PruneConfig
from robop_lightning.pipeline.masks import SparsityMasks
from robop_lightning.pipeline.prune import PruneReport, run_job
from robop_lightning.pipeline.resume import fingerprint_batches

__all__ = ["RobOPCallback"]

_STATE_VERSION = 1


def _option(source: str, name: str, doc: str) -> property:
    """A read-only attribute of the callback that reads ``self.<source>.<name>``."""
    return property(lambda self: getattr(getattr(self, source), name), doc=doc)


class RobOPCallback(Callback):
    r"""Prune a LightningModule with RobOP, then keep the pruned weights at zero while it trains.

    Lifecycle, hook by hook (the one-off job follows ``BatchSizeFinder``: it runs at whatever entry
    point was called):

    * ``setup``: under ``ModelParallelStrategy`` (FSDP2's ``fully_shard`` in ``configure_model``)
      or ``FSDPStrategy`` (FSDP1, ``use_orig_params=True``), prune now, on whole weights, before
      the model is sharded; the masks are then sharded like their parameters (DTensor placements
      under FSDP2, each rank's slice of the flattened weight under FSDP1) when they attach in
      ``on_fit_start``. DeepSpeed is refused.
    * ``on_fit_start``: with ``prune_at="start"`` (and no ``schedule``), prune now, so the whole of
      ``fit`` is recovery fine-tuning. When the callback's state came from a checkpoint
      (``ckpt_path=``), nothing is pruned again: the saved masks are re-installed.
    * ``on_train_start`` / ``on_train_epoch_start``: with a ``schedule``, prune to the sparsity of
      every milestone ``<=`` the current epoch that is not done yet (``{0: 0.5, 2: 0.6, 4: 0.75}``
      prunes 50 % before epoch 0, 60 % before epoch 2, 75 % before epoch 4; earlier zeros are
      kept). A ``prune_at`` epoch missed because fit resumed after it is caught up here too.
    * ``on_train_epoch_end``: with ``prune_at=<epoch>``, prune at the end of that epoch.
    * ``on_before_optimizer_step``: zero the gradients of pruned weights (before clipping).
      The optimizer step post-hooks of :class:`SparsityMasks` re-zero the weights after every
      step, through gradient accumulation, AMP, clipping, momentum and weight decay.
    * ``on_validation_start`` (``trainer.validate`` only) / ``on_test_start``: prune, then evaluate.
    * ``state_dict`` / ``load_state_dict``: masks and progress; the model's own ``state_dict``
      stays dense with the stock keys, so a checkpoint loads strictly into the stock module.
    * ``teardown``: remove the hooks (the masks are kept).

    Calibration batches come from a dataloader (``calibration``), moved to the device with the
    module's batch-transfer hooks, and are run through the module as ``module(batch[0])`` for a
    tuple / list, ``module(**batch)`` for a dict, ``module(batch)`` otherwise. Under DDP every
    rank calibrates on its own shard and keeps its own activations; the partial Grams are summed
    across ranks (per-sample losses for CTE are gathered) before each layer is solved, so every rank
    solves the same problem, and the callback checks that every rank ends with identical masks.

    Args:
        sparsity: fraction of weights set to zero in every target layer (``None``: implied by an
            ``N:M`` pattern).
        pattern: ``"unstructured"``, ``"row"`` or ``"N:M"`` such as ``"2:4"``.
        solver: ``"alps"``, ``"cap"``, ``"sparsegpt"``, ``"wanda"`` or ``"magnitude"``; ``None``: ALPS for a
            causal language model, CAP otherwise (the report's ``config`` says which).
        uncertainty: ``"baseline"``, ``"trace"`` (default), ``"e"`` (``"ellipsoid"``) or ``"cte"``: the
            authors' closed forms, one solve; ``"minmax-trace"``, ``"minmax-e"``, ``"cvar"``: this
            project's min-max extension (:mod:`robop_lightning.engine.sets`); ``"auto"``: each layer
            chooses its set and gamma by cross-validation over the calibration samples.
        radius: the authors' ``gamma`` (``None``: 0.01; baseline: ``damping``), ``rho`` / ``alpha``
            for the extension, or ``"auto"`` (the gamma of the given set chosen per layer).
        auto: how ``"auto"`` chooses: ``{"folds": 4, "select": "mean" | "worst", "scorer": "admm" |
            "solver", "rows": 32, "candidates": ["trace=0.003", ...]}``
            (:class:`robop_lightning.engine.selection.AutoOptions`).
        targets: linear layers to prune: module names relative to the LightningModule (such as
            ``"model.layers.0.mlp"``) or ``"re:<regex>"`` patterns. ``None``: every linear inside
            the repeated blocks (output heads stay dense).
        ignore: names or patterns left dense.
        calibration_batches: number of batches used for calibration.
        calibration_dataloader: which dataloader calibrates: ``"train"`` (default), ``"val"``, ``"test"``,
            ``"predict"``, or any name ``X`` whose ``X_dataloader()`` the datamodule (or the module)
            defines (``"calib"`` or ``"calib_dataloader"`` calls ``calib_dataloader()``). (The
            iterable of batches itself is ``prune_model``'s ``calibration``.)
        prune_at: ``"start"`` (fit start) or an epoch at whose end to prune.
        schedule: ``{epoch: sparsity}`` for gradual pruning (overrides ``sparsity``); sparsities
            must rise with the epochs.
        heldout_fraction: share of the calibration samples held out to report held-out errors.
        progress: show a progress bar over blocks (on a terminal, rank 0).
        verbose: print the per-layer table (rank 0).
        resume_dir: make a long pruning resumable (see ``prune_model(resume_dir=...)``): every
            finished block is written atomically under ``<resume_dir>/<milestone>`` (``start``,
            ``epoch_end-3``, ``schedule-2``; under DDP one ``rank-0000N`` folder per rank), and a
            rerun of the same script after a crash or Ctrl-C continues from the next block with a
            bit-identical result. The calibration batches must be the same in the rerun (seed the
            run, e.g. ``seed_everything``); otherwise the directory is refused with a ValueError.
        curvature: ``None`` (default): RobOP-CAP (``solver="cap"``, the default outside language
            models) prunes with CAP's empirical block Fisher of the module's loss when the module
            defines ``task_loss(batch) -> (B,)`` (the plain task loss, CAP's) or
            ``per_sample_loss(batch) -> (B,)`` (its training loss) and the pruning is one-shot
            (``prune_at="start"``, or in ``validate`` / ``test``); otherwise the label-free Gram path.
            ``"fisher"`` / ``"gram"`` force one (the report's ``config["curvature_default"]`` says
            why ``None`` chose).
        fisher: options of CAP's Fisher: ``gradients`` (m), ``grad_batch``, ``loss`` (``"task"`` /
            ``"training"``), ``block_size`` (B), ``lam``, ``batch_size``, ``selection``
            (``"global"`` / ``"uniform"``), ``method`` (:class:`robop_lightning.config.FisherOptions`).
        structured_options: with ``pattern="structured"`` (whole heads and MLP channels removed
            physically, :mod:`robop_lightning.pipeline.shrink_step`): ``budget`` (``"layer"`` / ``"global"``),
            ``cost`` (``"params"`` / ``"flops"``), ``min_keep``, ``max_sparsity``, ``per_step``. The
            module shrinks at ``prune_at="start"`` (or at ``validate`` / ``test``) and the optimizers are
            created again for the new parameters; ``prune_at=<epoch>`` and schedules are refused.
        coupled, rounds, damping, solver_options, blocks, activation_budget, device: as in
            :func:`robop_lightning.prune_model` (``solver_options``: a dict of the solver's options,
            :mod:`robop_lightning.engine.solvers.options`; ``activation_budget``: bytes or ``"2GB"`` of
            calibration activations kept in memory, the rest on disk; ``device``: onload one block
            at a time to this device while the module stays where it is). Every option is checked in
            ``__init__`` by :class:`robop_lightning.config.PruneConfig`.
        calibration: the old name of ``calibration_dataloader`` (deprecated).
        config: the pruning options as one :class:`robop_lightning.config.PruneConfig` (or a dict of
            its fields), instead of the keywords from ``sparsity`` to ``device`` (passing both is a
            ValueError); ``pattern="structured"`` takes its options as ``solver_options`` there.

    Raises:
        ValueError: an argument is invalid (raised in ``__init__``, with what to pass instead).
        MisconfigurationException: used with DeepSpeed; under ``ModelParallelStrategy`` or ``FSDPStrategy``
            with a schedule, a ``prune_at`` epoch or structured pruning (these prune once, in ``setup``).

    Example:
        >>> import torch
        >>> from torch.utils.data import DataLoader, TensorDataset
        >>> from lightning.pytorch import LightningModule, Trainer
        >>> class Boring(LightningModule):
        ...     def __init__(self):
        ...         super().__init__()
        ...         self.net = torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.ReLU(), torch.nn.Linear(32, 2))
        ...     def forward(self, x):
        ...         return self.net(x)
        ...     def training_step(self, batch, batch_idx):
        ...         return torch.nn.functional.cross_entropy(self(batch[0]), batch[1])
        ...     def configure_optimizers(self):
        ...         return torch.optim.AdamW(self.parameters(), lr=1e-3)
        >>> data = DataLoader(TensorDataset(torch.randn(64, 8), torch.randint(0, 2, (64,))), batch_size=16)
        >>> model = Boring()
        >>> robop = RobOPCallback(sparsity=0.5, solver="sparsegpt", uncertainty="baseline", verbose=False)
        >>> trainer = Trainer(max_epochs=1, callbacks=[robop], logger=False, enable_checkpointing=False,
        ...                   enable_progress_bar=False, enable_model_summary=False)
        >>> trainer.fit(model, data)
        >>> float((model.net[0].weight == 0).float().mean())  # pruned at start, still 50 % after training
        0.5

    In a LightningCLI config::

        trainer:
          callbacks:
            - class_path: robop_lightning.RobOPCallback
              init_args: {solver: sparsegpt, schedule: {0: 0.5, 2: 0.6, 4: 0.75}}
    """

    def __init__(
        self,
        sparsity: float | None = 0.5,
        pattern: str = "unstructured",
        solver: Literal["alps", "cap", "sparsegpt", "wanda", "magnitude"] | None = None,
        uncertainty: Literal[
            "baseline", "trace", "e", "ellipsoid", "cte", "minmax-trace", "minmax-e", "cvar", "auto"
        ] = "trace",
        radius: float | Literal["auto"] | None = None,
        auto: dict[str, Any] | None = None,
        targets: list[str] | None = None,
        ignore: list[str] | None = None,
        calibration_batches: int = 16,
        calibration_dataloader: str = "train",
        prune_at: Literal["start"] | int = "start",
        schedule: dict[int, float] | None = None,
        heldout_fraction: float = 0.0,
        progress: bool = True,
        verbose: bool = True,
        resume_dir: str | os.PathLike | None = None,
        structured_options: dict[str, Any] | None = None,
        curvature: Literal["gram", "fisher"] | None = None,
        fisher: dict[str, Any] | None = None,
        coupled: bool | None = None,
        rounds: int = 3,
        damping: float = 0.01,
        solver_options: dict[str, Any] | None = None,
        blocks: str | None = None,
        activation_budget: int | str | None = None,
        device: str | None = None,
        calibration: str | None = None,
        config: PruneConfig | None = None,
    ) -> None:
        arguments = dict(locals())  # the first statement: exactly the arguments
        super().__init__()
        if calibration is not None:  # the old name of calibration_dataloader
            warnings.warn("RobOPCallback(calibration=...) is now calibration_dataloader=...", DeprecationWarning,
                          stacklevel=2)
            calibration_dataloader = calibration
        own = CallbackOptions(calibration_batches=calibration_batches, calibration_dataloader=calibration_dataloader,
                              prune_at=prune_at, schedule=schedule, progress=progress, verbose=verbose)
        # every option of the pruning job, checked in one place (schedules: their largest sparsity)
        self.config: PruneConfig = pruning_config(config, {k: v for k, v in arguments.items() if k in PRUNING_KEYWORDS},
                                                  schedule)
        self.options: CallbackOptions = own.checked(self.config)
        self.masks: SparsityMasks | None = None
        self.reports: list[PruneReport] = []
        self._done: list[str] = []  # milestones already pruned: "start", "epoch_end:3", "schedule:2"
        self._pruned_in_setup = False  # pruned in setup under a sharding strategy, in this run
        self._current_sparsity: float | None = None

    # the options, read from self.config (the pruning job's) and self.options (the callback's own)
    sparsity = _option("config", "sparsity", "Target sparsity (with a schedule: its largest).")
    pattern = _option("config", "pattern", "Sparsity pattern.")
    solver = _option("config", "solver", "Solver (None: chosen per model when pruning).")
    uncertainty = _option("config", "uncertainty", "Uncertainty set (canonical name).")
    radius = _option("config", "radius", "Radius of the uncertainty set.")
    auto = _option("config", "auto", "Options of uncertainty='auto' / radius='auto'.")
    targets = _option("config", "targets", "Linear layers to prune (None: found).")
    ignore = _option("config", "ignore", "Linear layers left dense.")
    heldout_fraction = _option("config", "heldout_fraction", "Share of the calibration samples held out.")
    resume_dir = _option("config", "resume_dir", "Directory that makes the pruning resumable.")
    curvature = _option("config", "curvature", "'gram' or 'fisher'.")
    fisher = _option("config", "fisher", "Options of curvature='fisher'.")
    calibration_batches = _option("options", "calibration_batches", "Number of calibration batches.")
    calibration_dataloader = _option("options", "calibration_dataloader", "Name of the calibrating dataloader.")
    prune_at = _option("options", "prune_at", "'start' or the epoch at whose end to prune.")
    schedule = _option("options", "schedule", "{epoch: sparsity} of gradual pruning, or None.")
    progress = _option("options", "progress", "Whether to show a progress bar over blocks.")
    verbose = _option("options", "verbose", "Whether to print the per-layer table.")

    @property
    def structured_options(self) -> Any:
        """The options of ``pattern="structured"`` (``None`` for any other pattern)."""
        return self.config.solver_options if self.config.structured else None

    def _milestone_config(self, sparsity: float | None, milestone: str) -> PruneConfig:
        """The job of one milestone (``"start"``, ``"epoch_end:3"``, ...): its sparsity, and its own
        folder ``<resume_dir>/<milestone>`` when resumable."""
        resume_dir = self.config.resume_dir
        if resume_dir is not None:
            resume_dir = os.path.join(os.fspath(resume_dir), milestone.replace(":", "-"))
        return dataclasses.replace(self.config, sparsity=sparsity, resume_dir=resume_dir)

    def _run_job(self, trainer: pl.Trainer, pl_module: pl.LightningModule, config: PruneConfig,
                 prior_masks: dict[str, torch.Tensor] | None = None) -> PruneReport:
        """Prune ``pl_module`` on the calibration batches with ``config`` (the one call into the pipeline)."""
        loss_fn = None
        if config.curvature != "gram" and prior_masks is None and self.options.one_shot:
            loss_fn = module_loss(pl_module, config.fisher_options.loss)
            if loss_fn is None and config.curvature == "fisher":
                raise MisconfigurationException(
                    f"RobOPCallback(curvature='fisher') needs per-sample losses of {type(pl_module).__name__}: define "
                    "`def task_loss(self, batch) -> Tensor` (the plain task loss, CAP's) or `def per_sample_loss(self, "
                    "batch) -> Tensor` (the training loss), one loss per sample (shape (B,), reduction='none', with "
                    "the batch's true labels)."
                )
        return run_job(pl_module, self._calibration_batches(trainer, pl_module), config, loss_fn=loss_fn,
                       progress=self.progress and trainer.is_global_zero, prior_masks=prior_masks)

    # ------------------------------------------------------------------ lifecycle
    @property
    def pruned(self) -> bool:
        """Whether this callback has pruned the model (possibly in the run a checkpoint came from)."""
        return bool(self._done)

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        strategy = trainer.strategy
        if isinstance(strategy, DeepSpeedStrategy):
            raise MisconfigurationException(
                "RobOPCallback does not support DeepSpeedStrategy: its parameters are flattened, so masks cannot "
                "follow them. Use ModelParallelStrategy with FSDP2's fully_shard in configure_model, FSDPStrategy, "
                "strategy='ddp', or prune first with prune_model and fine-tune without the callback."
            )
        if shards_after_setup(strategy):
            if getattr(strategy, "kwargs", {}).get("use_orig_params") is False:
                raise MisconfigurationException(
                    "RobOPCallback needs FSDPStrategy(use_orig_params=True) (Lightning's default): with flat "
                    "parameters only, the pruned entries of a weight cannot be found after the wrapping."
                )
            if self.schedule is not None or self.prune_at != "start" or self.config.structured:
                raise MisconfigurationException(
                    f"Under {type(strategy).__name__} RobOPCallback prunes once, in setup, on whole weights before "
                    "the strategy shards them: use prune_at='start' without a schedule (unstructured or N:M)."
                )
            if not self.pruned and checkpoint_to_restore(trainer) is None:  # fit, validate or test
                check_layers_before_sharding(pl_module, strategy)
                self._prune(trainer, pl_module, self.sparsity, "start")  # before the weights are sharded
                self._pruned_in_setup = True  # a fit(ckpt_path=...) may still restore a pruned state over it

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if shards_after_setup(trainer.strategy):  # pruned in setup, or restored after this hook
            if self.masks is not None:
                self.masks.attach(holder(trainer, pl_module), trainer.optimizers)
            return
        if self.masks is not None:
            self.masks.attach(pl_module, trainer.optimizers)
            self._check_ranks(trainer)
        if self.schedule is not None:
            self._catch_up(trainer, pl_module, epoch=trainer.current_epoch)
        elif self.prune_at == "start" and "start" not in self._done:
            self._prune(trainer, pl_module, self.sparsity, "start")

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # the epoch counter is restored from a checkpoint only after on_fit_start
        if shards_after_setup(trainer.strategy):
            if not self.pruned:
                raise MisconfigurationException(
                    "RobOPCallback: the checkpoint this fit resumed from holds no RobOP state, and under "
                    f"{type(trainer.strategy).__name__} the weights are sharded by now; prune first (a fit without "
                    "ckpt_path), then resume from its checkpoints."
                )
            if not self.masks.attached:  # restored from the checkpoint after on_fit_start
                self.masks.attach(holder(trainer, pl_module), trainer.optimizers)
                self._check_ranks(trainer)
        self._catch_up(trainer, pl_module, epoch=trainer.current_epoch)
        if self.masks is not None:
            for optimizer in trainer.optimizers:
                self.masks.add_optimizer(optimizer)

    @override
    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._catch_up(trainer, pl_module, epoch=trainer.current_epoch)

    @override
    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if isinstance(self.prune_at, int) and self.schedule is None and trainer.current_epoch == self.prune_at:
            key = f"epoch_end:{self.prune_at}"
            if key not in self._done:
                self._prune(trainer, pl_module, self.sparsity, key)

    @override
    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        if self.masks is not None:
            self.masks.mask_gradients()

    @override
    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking or trainer.state.fn != "validate":
            return
        self._prune_once(trainer, pl_module)

    @override
    def on_test_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._prune_once(trainer, pl_module)

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if self.masks is not None:
            self.masks.detach()

    # ------------------------------------------------------------------ state
    @override
    def state_dict(self) -> dict[str, Any]:
        return {
            "version": _STATE_VERSION,
            "done": list(self._done),
            "sparsity": self._current_sparsity,
            "masks": self.masks.state_dict() if self.masks is not None else None,
            "reports": [r.to_dict() for r in self.reports],
        }

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if self._pruned_in_setup and state_dict.get("done"):
            rank_zero_warn(
                "RobOPCallback pruned in setup (on whole weights, before the sharding), then trainer.fit(ckpt_path=...) "
                "restored a pruned checkpoint over it: the model and masks are the checkpoint's, the pruning in setup "
                "was spent for nothing. To skip it, give the path before the fit: trainer.ckpt_path = path; "
                "trainer.fit(model).", category=RuntimeWarning)
            self._pruned_in_setup = False
        self._done = list(state_dict.get("done", []))
        self._current_sparsity = state_dict.get("sparsity")
        if self.masks is not None:
            self.masks.detach()
        masks = state_dict.get("masks")
        self.masks = SparsityMasks.from_state_dict(masks) if masks else None
        self.reports = [
            PruneReport(layers=r["layers"], config=r["config"], seconds=r["totals"]["seconds"])
            for r in state_dict.get("reports", [])
        ]

    # ------------------------------------------------------------------ pruning
    def _prune_once(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self.pruned:
            self._prune(trainer, pl_module, self.sparsity, "start")  # with a schedule: its largest sparsity
        elif self.masks is not None and not self.masks.attached:
            self.masks.attach(holder(trainer, pl_module))

    def _catch_up(self, trainer: pl.Trainer, pl_module: pl.LightningModule, epoch: int) -> None:
        """Prune for every milestone at or before ``epoch`` that is not done yet (once, to the highest)."""
        if self.schedule is not None:
            due = [k for k in self.schedule if k <= epoch and f"schedule:{k}" not in self._done]
            if due:
                self._prune(trainer, pl_module, self.schedule[max(due)], *(f"schedule:{k}" for k in due))
        elif (
            isinstance(self.prune_at, int) and epoch > self.prune_at and f"epoch_end:{self.prune_at}" not in self._done
        ):
            self._prune(trainer, pl_module, self.sparsity, f"epoch_end:{self.prune_at}")

    def _prune(self, trainer: pl.Trainer, pl_module: pl.LightningModule, sparsity: float | None, *keys: str) -> None:
        """Prune to ``sparsity`` for the milestones ``keys`` (the first names the job's resume folder)."""
        config = self._milestone_config(sparsity, keys[0])
        if config.structured:  # pattern="structured": the module shrinks, no masks
            report = self._shrink(trainer, pl_module, config)
        else:
            report = self._prune_masks(trainer, pl_module, config)
        self._done.extend(keys)
        self._current_sparsity = report.totals["sparsity"]
        self.reports.append(report)
        self._log(trainer, report)

    def _prune_masks(self, trainer: pl.Trainer, pl_module: pl.LightningModule, config: PruneConfig) -> PruneReport:
        """Prune with masks, keeping the earlier zeros (gradual pruning: the masks only shrink)."""
        previous = self.masks
        if previous is not None:
            previous.detach()
        try:
            report = self._run_job(trainer, pl_module, config, previous.to_dict() if previous is not None else None)
        except BaseException:
            if previous is not None:  # the pipeline restored the weights; restore the hooks too
                previous.attach(pl_module, trainer.optimizers)
            raise
        self.masks = SparsityMasks(dict(report.masks))
        self.masks.attach(pl_module, trainer.optimizers)
        self._check_ranks(trainer)
        return report

    def _shrink(self, trainer: pl.Trainer, pl_module: pl.LightningModule, config: PruneConfig) -> PruneReport:
        """``pattern="structured"``: shrink, then rebuild the optimizers when fitting.

        Lightning creates the optimizers in ``strategy.setup`` (before ``on_fit_start``), so after the
        parameters change shape ``configure_optimizers`` runs again (``strategy.setup_optimizers``) and
        the new optimizers' states move to the device; the LR schedule starts from step 0 of the recovery
        fine-tune.
        """
        if trainer.world_size > 1:
            raise MisconfigurationException(
                "RobOPCallback(pattern='structured') runs on one process: under DDP the wrapper's buckets are built "
                "for the old shapes. Shrink first with prune_model(model, batches, pattern='structured'), save, and "
                "fine-tune the shrunk model under DDP."
            )
        report = self._run_job(trainer, pl_module, config)
        if trainer.state.fn == "fit":
            trainer.strategy.setup_optimizers(trainer)
            optimizer_states_to(trainer.strategy.optimizers, trainer.strategy.root_device)
        return report

    def _calibration_batches(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> list[Any]:
        """The loader's first ``calibration_batches`` batches, on the device.

        Under several processes the Grams are summed across ranks, so each rank must calibrate on
        its own samples: a loader that gives every rank the same batches (no ``DistributedSampler``,
        such as a datamodule's ``calib_dataloader``) is split, rank ``r`` keeping batches
        ``r, r + W, ...``; the sums are then one process's on the same batches.
        """
        batches = list(islice(self._calibration_loader(trainer, pl_module), self.calibration_batches))
        world, strategy = trainer.world_size, trainer.strategy
        if world > 1 and len(batches) >= world:
            digest = fingerprint_batches(batches)
            if strategy.reduce_boolean_decision(strategy.broadcast(digest, src=0) == digest, all=True):
                batches = batches[trainer.global_rank :: world]
        return [strategy.batch_to_device(batch) for batch in batches]

    def _calibration_loader(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> Any:
        return calibration_loader(trainer, pl_module, self.calibration_dataloader)

    def _check_ranks(self, trainer: pl.Trainer) -> None:
        if trainer.world_size <= 1 or self.masks is None:
            return
        mine = self.masks.digest()  # a hash, not the masks: cheap for any model size
        same = trainer.strategy.broadcast(mine, src=0) == mine
        if not trainer.strategy.reduce_boolean_decision(same, all=True):
            raise RuntimeError(
                "RobOPCallback: ranks hold different pruning masks although they solved on the same summed Grams; "
                "check that the module and the solver options are the same on every rank."
            )

    def _log(self, trainer: pl.Trainer, report: PruneReport) -> None:
        totals = report.totals
        metrics = {"robop/sparsity": totals["sparsity"]}
        for key in ("nominal_error", "robust_error", "heldout_error"):
            if totals[key] is not None:
                metrics[f"robop/{key}"] = totals[key]
        for row in report.layers:
            for key in ("sparsity", "nominal_error", "robust_error", "heldout_error", "srank"):
                if row.get(key) is not None:
                    metrics[f"robop/{row['name']}/{key}"] = row[key]
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=trainer.global_step)
        if self.verbose:
            rank_zero_info(str(report))

