"""One typed, validated configuration of a pruning job: :class:`PruneConfig`.

``prune_model`` and ``RobOPCallback`` take the same options and both build a :class:`PruneConfig`,
so every argument is checked here, once, with a message that says what to pass. Nested options are
dataclasses too, each refusing unknown keys with the list of valid ones:

* per solver: :mod:`robop_lightning.engine.solvers.options` (``AlpsOptions``, ``CapOptions``, ...);
* ``pattern="structured"``: :class:`StructuredOptions`;
* ``uncertainty="auto"`` / ``radius="auto"``: :class:`robop_lightning.engine.selection.AutoOptions`;
* ``curvature="fisher"``: :class:`FisherOptions`.

A dict with the same keys works wherever a dataclass does, so every option is YAML-expressible
(LightningCLI). Sets are accepted under their long names too (``"ellipsoid"`` for ``"e"``).

Example:
    >>> PruneConfig(sparsity=0.5, solver="sparsegpt", uncertainty="ellipsoid").uncertainty
    'e'
    >>> PruneConfig(solver="cap", solver_options={"blok_size": 64})
    Traceback (most recent call last):
    ...
    ValueError: prune_model: unknown solver option(s) 'blok_size' for 'cap'; its options are: block_size, chunk_bytes, trajectory_bytes, dtype, truncate.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch

from robop_lightning.utils.offload import parse_bytes
from robop_lightning.engine.damping import check_engine_options
from robop_lightning.engine.patterns import parse_pattern
from robop_lightning.engine.selection import AutoOptions, check_auto_request
from robop_lightning.engine.solvers.fisher_obs import SELECTIONS
from robop_lightning.engine.solvers import SOLVERS, check_solver_options
from robop_lightning.utils.typed import coerce_options
from robop_lightning.engine.sets import CLOSED_FORM_SETS, canonical_set_name, make_uncertainty

__all__ = ["FisherOptions", "PruneConfig", "StructuredOptions", "check_fraction", "is_structured"]


def is_structured(pattern: Any) -> bool:
    """Whether ``pattern`` asks for structured pruning (whole heads and channels removed)."""
    return isinstance(pattern, str) and pattern.strip().lower() == "structured"


def check_fraction(value: Any, what: str, meaning: str = "") -> float:
    """``value`` as a float in ``[0, 1)``, or a ``ValueError`` naming ``what``."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value < 1.0:
        raise ValueError(f"{what} must be in [0, 1){meaning}, got {value!r}.")
    return float(value)


@dataclass(frozen=True)
class StructuredOptions:
    """Options of ``pattern="structured"`` (see :func:`robop_lightning.pipeline.shrink_step.prune_model_structured`).

    Attributes:
        budget: ``"layer"`` (every block loses the share) or ``"global"`` (one ranking over all units).
        cost: what the global budget counts: ``"params"`` or ``"flops"``.
        min_keep: groups every unit keeps (>= 1).
        max_sparsity: the largest share of groups any unit may lose under the global budget.
        per_step: groups removed per greedy step (``None``: 1 up to 256 groups, else 1/256 of them).
    """

    budget: str = "layer"
    cost: str = "params"
    min_keep: int = 1
    max_sparsity: float = 0.9
    per_step: int | None = None

    def __post_init__(self) -> None:
        if self.budget not in ("layer", "global"):
            raise ValueError(f"budget must be 'layer' (every unit loses the same share) or 'global', got {self.budget!r}.")
        if self.cost not in ("params", "flops"):
            raise ValueError(f"cost must be 'params' or 'flops' (what the global budget counts), got {self.cost!r}.")
        if isinstance(self.min_keep, bool) or not isinstance(self.min_keep, int) or self.min_keep < 1:
            raise ValueError(f"min_keep must be an integer >= 1 (groups every unit keeps), got {self.min_keep!r}.")
        if not isinstance(self.max_sparsity, (int, float)) or not 0.0 < self.max_sparsity < 1.0:
            raise ValueError(f"max_sparsity must be in (0, 1) (the most any unit may lose), got {self.max_sparsity!r}.")
        if self.per_step is not None and (isinstance(self.per_step, bool) or not isinstance(self.per_step, int)
                                          or self.per_step < 1):
            raise ValueError(f"per_step must be None or an integer >= 1, got {self.per_step!r}.")

    @classmethod
    def coerce(cls, value: StructuredOptions | dict[str, Any] | None, what: str = "structured_options") -> StructuredOptions:
        """``None`` -> defaults; a dict -> checked fields (unknown keys are refused with the valid ones)."""
        return coerce_options(cls, value, what)


@dataclass(frozen=True)
class FisherOptions:
    """How CAP's empirical Fisher is built and used (a dict with these keys works too).

    Attributes:
        gradients: ``m``, the number of gradients (``None``: every calibration sample is used, as
            many gradients as there are whole mini-batches of ``grad_batch``). Memory does not grow
            with ``m`` (the Fisher blocks are sums over the gradients, one layer at a time); time does,
            linearly. CAP's one-shot ViT recipes use 4096.
        grad_batch: samples per gradient: ``1`` gives per-sample gradients; ``k > 1`` gives CAP's
            mini-batch gradients (each the gradient of the mean loss over ``k`` samples, one
            backward pass each; CAP's one-shot scripts use 128).
        block_size: ``B`` (``None``: CAP's 192 where it divides the layer's inputs, else the largest
            divisor up to 128).
        lam: CAP's damping ``lambda`` (Baseline's ``D = m lam I``; every set's eigenvalue floor).
        batch_size: per-sample gradients computed at once (``grad_batch=1``).
        selection: ``"global"`` (one threshold over all target layers, CAP's) or ``"uniform"`` (the
            same sparsity in every layer). ``N:M`` patterns are per group either way.
        method: per-sample gradients by ``"vmap"``, ``"loop"`` or ``"auto"`` (vmap, else the loop).
        loss: which loss the callback differentiates: ``"task"`` (CAP's: the module's
            ``task_loss(batch)``, the plain task loss, where it defines one) or ``"training"`` (its
            ``per_sample_loss(batch)``, the training objective with label smoothing and every
            head). ``prune_model`` differentiates the ``loss_fn`` it is given.
    """

    gradients: int | None = None
    grad_batch: int = 1
    block_size: int | None = None
    lam: float = 1e-8
    batch_size: int = 32
    selection: str = "global"
    method: str = "auto"
    loss: str = "task"

    @classmethod
    def coerce(cls, value: FisherOptions | dict[str, Any] | None) -> FisherOptions:
        out = coerce_options(cls, value, "fisher option(s)")
        for key in ("gradients", "grad_batch", "batch_size"):
            v = getattr(out, key)
            if (v is not None or key != "gradients") and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
                raise ValueError(f"fisher {key} must be a positive integer{' or None' if key == 'gradients' else ''}, "
                                 f"got {v!r}.")
        if out.loss not in ("task", "training"):
            raise ValueError(f"fisher loss must be 'task' (the module's task_loss) or 'training' (its "
                             f"per_sample_loss), got {out.loss!r}.")
        if out.block_size is not None and (isinstance(out.block_size, bool) or not isinstance(out.block_size, int)
                                           or out.block_size < 1):
            raise ValueError(f"fisher block_size must be a positive integer or None, got {out.block_size!r}.")
        if not (isinstance(out.lam, (int, float)) and out.lam > 0):
            raise ValueError(f"fisher lam must be a number > 0 (CAP's damping), got {out.lam!r}.")
        if out.selection not in SELECTIONS:
            raise ValueError(f"fisher selection must be one of {', '.join(SELECTIONS)}, got {out.selection!r}.")
        if out.method not in ("auto", "vmap", "loop"):
            raise ValueError(f"fisher method must be 'auto', 'vmap' or 'loop', got {out.method!r}.")
        return out


@dataclass(frozen=True)
class PruneConfig:
    """Every option of a pruning job, validated on construction (see the module docstring).

    The fields are ``prune_model``'s keyword arguments (those that are data, not code: ``forward``,
    ``loss_fn``, ``progress`` and ``prior_masks`` stay arguments of the call). For
    ``pattern="structured"``, ``solver_options`` holds :class:`StructuredOptions` keys.
    """

    sparsity: float | None = 0.5
    pattern: str = "unstructured"
    solver: str | None = None
    uncertainty: str = "trace"
    radius: float | str | None = None
    coupled: bool | None = None
    rounds: int = 3
    damping: float = 0.01
    solver_options: Any = None
    auto: AutoOptions | dict[str, Any] | None = None
    targets: list[str] | str | None = None
    ignore: list[str] | str | None = None
    blocks: str | None = None
    heldout_fraction: float = 0.0
    resume_dir: str | os.PathLike | None = None
    activation_budget: int | str | None = None
    curvature: str | None = None
    fisher: FisherOptions | dict[str, Any] | None = None
    device: str | None = None

    def __post_init__(self) -> None:
        parse_pattern(self.pattern, self.sparsity)
        if self.solver is not None:
            if not isinstance(self.solver, str) or self.solver.lower() not in SOLVERS:
                raise ValueError(f"unknown solver {self.solver!r}: use one of {', '.join(SOLVERS)} (or None: ALPS for "
                                 "causal language models, CAP otherwise).")
            object.__setattr__(self, "solver", self.solver.lower())
        elif self.solver_options is not None and not self.structured:
            raise ValueError("solver_options belong to one solver: pass solver= too (the default solver depends on the "
                             "model).")
        if not isinstance(self.uncertainty, str):
            raise ValueError(f"uncertainty must be a set name such as 'trace', got {self.uncertainty!r}.")
        if self.choose:
            if self.structured:
                raise ValueError("uncertainty='auto' / radius='auto' choose per linear layer; pattern='structured' takes "
                                 "a fixed set.")
            AutoOptions.coerce(self.auto)
        else:
            make_uncertainty(self.uncertainty, self.radius, self.coupled)
            object.__setattr__(self, "uncertainty", canonical_set_name(self.uncertainty))
        check_engine_options(self.rounds, self.damping)
        if self.structured:
            self._check_structured()
        elif self.solver is not None:
            check_solver_options(self.solver, self.solver_options, "prune_model")
        for what, value in (("targets", self.targets), ("ignore", self.ignore)):
            if value is not None and not isinstance(value, str) and not all(isinstance(v, str) and v for v in value):
                raise ValueError(f"{what} must be module names or 're:<regex>' patterns, got {value!r}.")
        if self.blocks is not None and (not isinstance(self.blocks, str) or not self.blocks):
            raise ValueError(f"blocks must be the dotted name of the block list (such as 'model.layers'), got {self.blocks!r}.")
        check_fraction(self.heldout_fraction, "heldout_fraction",
                       " (the share of calibration samples kept out of pruning to measure held-out error)")
        if self.resume_dir is not None and (not isinstance(self.resume_dir, (str, os.PathLike))
                                            or not os.fspath(self.resume_dir)):
            raise ValueError(f"resume_dir must be a directory path (str or Path), got {self.resume_dir!r}.")
        parse_bytes(self.activation_budget)
        if self.device is not None:
            try:
                torch.device(self.device)
            except (RuntimeError, TypeError) as err:
                raise ValueError(f"device must name a torch device such as 'cuda' or 'cuda:1', got {self.device!r} "
                                 f"({err}).") from None
        self._check_curvature()

    @property
    def structured(self) -> bool:
        return is_structured(self.pattern)

    @property
    def choose(self) -> bool:
        """Whether the set or its radius is chosen per layer (``"auto"``)."""
        return check_auto_request(self.uncertainty, self.radius, self.solver, "prune_model")

    def _check_structured(self) -> None:
        if self.sparsity is None:  # structured pruning has no N:M pattern to imply it
            object.__setattr__(self, "sparsity", 0.5)
        sparsity = self.sparsity
        if isinstance(sparsity, bool) or not isinstance(sparsity, (int, float)) or not 0.0 <= float(sparsity) < 1.0:
            raise ValueError(
                f"pattern='structured': sparsity must be in [0, 1) (the fraction of block parameters removed), got "
                f"{sparsity!r}. For half of the heads and MLP channels pass 0.5."
            )
        opts = self.structured_options
        if float(sparsity) > opts.max_sparsity:
            raise ValueError(f"sparsity={sparsity} exceeds max_sparsity={opts.max_sparsity}; raise max_sparsity.")

    def _gram_only(self) -> list[str]:
        """The options given that only the layer-reconstruction (Gram) path takes."""
        return [k for k, bad in (("heldout_fraction", self.heldout_fraction > 0),
                                 ("activation_budget", self.activation_budget), ("coupled", self.coupled is not None),
                                 ("rounds", self.rounds != 3), ("damping", self.damping != 0.01),
                                 ("solver_options", self.solver_options), ("auto", self.auto),
                                 ("device", self.device), ("uncertainty='auto'", self.choose),
                                 ("pattern='structured'", self.structured))
                if bad]

    def _check_curvature(self) -> None:
        if self.curvature not in (None, "gram", "fisher"):
            raise ValueError(f"curvature must be 'gram' (layer reconstruction, label-free), 'fisher' (CAP's empirical "
                             f"Fisher of the loss) or None (fisher for CAP when the loss is known), "
                             f"got {self.curvature!r}.")
        if self.curvature != "fisher":
            if self.curvature == "gram" and self.fisher is not None:
                raise ValueError("fisher options apply to curvature='fisher' only.")
            if self.fisher is not None:
                FisherOptions.coerce(self.fisher)
            return
        clash = [k for k in self._gram_only() if k != "pattern='structured'"]
        if self.solver not in (None, "cap") or clash:
            raise ValueError(
                "curvature='fisher' is CAP's: use solver='cap'"
                + (f", without {', '.join(clash)} (layer-reconstruction options)" if clash else "") + "."
            )
        if self.uncertainty not in CLOSED_FORM_SETS:
            raise ValueError(f"curvature='fisher' takes the authors' sets ({', '.join(CLOSED_FORM_SETS)}), "
                             f"got {self.uncertainty!r}.")
        if parse_pattern(self.pattern, self.sparsity).kind not in ("unstructured", "nm"):
            raise ValueError(f"curvature='fisher' prunes 'unstructured' or 'N:M' patterns, not {self.pattern!r}.")
        FisherOptions.coerce(self.fisher)

    def default_curvature(self, loss_known: bool) -> tuple[str, str]:
        """``(curvature, why)`` for ``curvature=None``: CAP's Fisher where the solver is CAP, the loss is
        known and every option fits it; otherwise the label-free Gram path (``why`` says which)."""
        if self.solver != "cap":
            return "gram", f"solver {self.solver!r}: layer reconstruction"
        if not loss_known:
            return "gram", "CAP without a loss (label-free): pass loss_fn for CAP's Fisher"
        kind = parse_pattern(self.pattern, self.sparsity).kind if not self.structured else "structured"
        blockers = self._gram_only() + ([] if self.uncertainty in CLOSED_FORM_SETS else [f"uncertainty={self.uncertainty!r}"])
        if kind not in ("unstructured", "nm") and "pattern='structured'" not in blockers:
            blockers.append(f"pattern={self.pattern!r}")
        if blockers:
            return "gram", f"CAP on the Gram path: {', '.join(blockers)} (options of the Gram path only)"
        return "fisher", "CAP with a known loss: CAP's empirical Fisher"

    @property
    def fisher_options(self) -> FisherOptions:
        """``fisher`` as :class:`FisherOptions` (defaults filled in)."""
        return FisherOptions.coerce(self.fisher)

    @property
    def structured_options(self) -> StructuredOptions:
        """``solver_options`` of ``pattern="structured"`` as :class:`StructuredOptions`."""
        return StructuredOptions.coerce(self.solver_options, "solver_options for pattern='structured'")

    def layer_options(self) -> dict[str, Any]:
        """The keyword arguments every target's :func:`robop_lightning.prune_layer` call gets."""
        return dict(sparsity=self.sparsity, pattern=self.pattern, solver=self.solver, uncertainty=self.uncertainty,
                    radius=self.radius, coupled=self.coupled, rounds=self.rounds, damping=self.damping,
                    solver_options=self.solver_options, auto=self.auto)
