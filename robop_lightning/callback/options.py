"""``RobOPCallback``'s options, checked: its own (:class:`CallbackOptions`: when and on what it prunes,
what it shows) and the pruning job's (a :class:`robop_lightning.config.PruneConfig`, built from the
keywords or passed as ``config=``)."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from robop_lightning.callback.hooks import check_schedule
from robop_lightning.config import PruneConfig, StructuredOptions, is_structured
from robop_lightning.utils.typed import coerce_options

__all__ = ["PRUNING_KEYWORDS", "CallbackOptions", "pruning_config"]

_ALIASES = {"validation": "val"}
# the callback's keywords that configure the pruning job: PruneConfig's fields, and structured_options
# (PruneConfig's solver_options under pattern="structured"); their defaults are PruneConfig's
_DEFAULTS = {f.name: f.default for f in dataclasses.fields(PruneConfig)} | {"structured_options": None}
PRUNING_KEYWORDS = frozenset(_DEFAULTS)


def _check_flag(value: Any, what: str) -> None:
    if not isinstance(value, bool):
        raise ValueError(f"{what} must be true or false, got {value!r}.")


@dataclass(frozen=True)
class CallbackOptions:
    """The options of ``RobOPCallback`` that are not the pruning job's (see its docstring).

    ``calibration_dataloader`` is stored stripped, ``"validation"`` as ``"val"``; ``schedule`` is
    checked against the pattern (and stored sorted, with int epochs) by :meth:`checked`.
    """

    calibration_batches: int = 16
    calibration_dataloader: str = "train"
    prune_at: str | int = "start"
    schedule: Mapping[int, float] | None = None
    progress: bool = True
    verbose: bool = True

    def __post_init__(self) -> None:
        batches, loader = self.calibration_batches, self.calibration_dataloader
        if isinstance(batches, bool) or not isinstance(batches, int) or batches < 1:
            raise ValueError(f"calibration_batches must be a positive integer, got {batches!r}.")
        if not isinstance(loader, str) or not loader.strip().isidentifier():
            raise ValueError(
                f"calibration_dataloader must name a dataloader: 'train', 'val', 'test', 'predict', or X for a "
                f"datamodule method X_dataloader(); got {loader!r}."
            )
        object.__setattr__(self, "calibration_dataloader", _ALIASES.get(loader.strip(), loader.strip()))
        at = self.prune_at
        if at != "start" and (isinstance(at, bool) or not isinstance(at, int) or at < 0):
            raise ValueError(f"prune_at must be 'start' or an epoch number >= 0 (prune at its end), got {at!r}.")
        if self.schedule is not None and at != "start":
            raise ValueError("pass either prune_at=<epoch> or a schedule: the schedule's epochs say when to prune.")
        _check_flag(self.progress, "progress")
        _check_flag(self.verbose, "verbose")

    @property
    def one_shot(self) -> bool:
        """Whether the model is pruned once (no schedule, no ``prune_at=<epoch>``): CAP's Fisher applies."""
        return self.schedule is None and self.prune_at == "start"

    def checked(self, config: PruneConfig) -> CallbackOptions:
        """These options with the schedule checked against ``config``'s pattern, and the combinations
        that ``config`` rules out refused (structured pruning and CAP's Fisher prune once, at start)."""
        schedule = None if self.schedule is None else check_schedule(self.schedule, config.pattern)
        once = [what for what, bad in (("schedule", schedule is not None),
                                       ("prune_at=<epoch>", self.prune_at != "start")) if bad]
        if config.structured and once:
            raise ValueError(
                "pattern='structured' shrinks the modules, so it prunes once before training: use prune_at='start' "
                "without a schedule (then the whole fit is recovery fine-tuning), or trainer.validate / trainer.test."
            )
        if config.curvature == "fisher" and once:
            raise ValueError(f"curvature='fisher' (CAP's one-shot pruning with the loss's Fisher) does not take: "
                             f"{', '.join(once)}.")
        return dataclasses.replace(self, schedule=schedule)


def pruning_config(config: PruneConfig | Mapping[str, Any] | None, keywords: Mapping[str, Any],
                   schedule: Any) -> PruneConfig:
    """The callback's :class:`PruneConfig`: ``config`` (a ``PruneConfig`` or a dict of its fields) or
    one built from the pruning ``keywords`` (not both); with a ``schedule``, at its largest sparsity."""
    top = max(schedule.values()) if isinstance(schedule, Mapping) and schedule else None
    if config is not None:
        given = sorted(k for k, v in keywords.items() if v is not _DEFAULTS[k] and v != _DEFAULTS[k])
        if given:
            raise ValueError(f"RobOPCallback takes the pruning options either as config=PruneConfig(...) or as "
                             f"keywords, not both: got config= and {', '.join(given)}.")
        config = coerce_options(PruneConfig, config, "config")
        return config if top is None else dataclasses.replace(config, sparsity=top)
    options = dict(keywords)
    for what in ("targets", "ignore"):
        value = options[what]
        if value is not None and isinstance(value, str):
            raise ValueError(f"{what} must be a list of module names or 're:<regex>' patterns, got {value!r} "
                             f"(for one name write [{value!r}]).")
    structured_options = options.pop("structured_options")
    if is_structured(options["pattern"]):
        if options["solver_options"] is not None:
            raise ValueError("pattern='structured' takes structured_options, not solver_options.")
        StructuredOptions.coerce(structured_options)
        options["solver_options"] = structured_options
    elif structured_options is not None:
        raise ValueError("structured_options only apply to pattern='structured'.")
    if top is not None:
        options["sparsity"] = top
    return PruneConfig(**options)
