"""Which dataloader calibrates: resolve ``RobOPCallback(calibration_dataloader=...)`` against a Trainer."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.utilities.exceptions import MisconfigurationException

__all__ = ["calibration_loader"]


def calibration_loader(trainer: pl.Trainer, pl_module: pl.LightningModule, name: str) -> Any:
    """The dataloader named ``name`` for the current entry point (see ``RobOPCallback(calibration_dataloader=...)``).

    ``train`` / ``val`` / ``test`` are the trainer's own loaders where the entry point has them; any
    other ``X`` (or a missing loader) is ``X_dataloader()`` of the datamodule, then of the module.
    """
    fn = trainer.state.fn
    loader = None
    if name == "train" and fn == "fit":
        trainer.fit_loop.setup_data()
        loader = trainer.train_dataloader
    elif name == "val" and fn in ("fit", "validate"):
        loop = trainer.fit_loop.epoch_loop.val_loop if fn == "fit" else trainer.validate_loop
        loop.setup_data()
        loader = trainer.val_dataloaders
    elif name == "test" and fn == "test":
        trainer.test_loop.setup_data()
        loader = trainer.test_dataloaders
    if loader is None:
        hook = name if name.endswith("_dataloader") else f"{name}_dataloader"
        sources = [s for s in (trainer.datamodule, pl_module) if s is not None and callable(getattr(s, hook, None))]
        for source in sources:
            try:
                loader = getattr(source, hook)()
            except (NotImplementedError, MisconfigurationException):  # the LightningModule's stub hooks
                continue
            if loader is not None:
                break
    if isinstance(loader, (list, tuple)):
        loader = loader[0] if loader else None
    elif isinstance(loader, Mapping):
        loader = next(iter(loader.values()), None)
    if loader is None:
        raise MisconfigurationException(
            f"RobOPCallback(calibration_dataloader={name!r}) found no dataloader: define {name}_dataloader() in "
            "the datamodule or the LightningModule, or pass another one (e.g. calibration_dataloader='val' with "
            "trainer.validate)."
        )
    return loader
