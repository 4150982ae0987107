"""Checkpoint hooks shared by the LightningModules: structurally pruned shapes travel with the weights."""

from __future__ import annotations

from typing import Any

from robop_lightning.pipeline.surgery import CHECKPOINT_KEY, apply_structured_shapes, structured_shapes


class StructuredCheckpointHooks:
    """Mixin for a LightningModule: record the per-layer sizes of a structurally pruned model
    (:mod:`robop_lightning.pipeline.surgery`) on save, and shrink to them on load, before the state dict
    is restored (``load_from_checkpoint``, ``Trainer.fit(ckpt_path=...)``). Dense models are untouched."""

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        spec = structured_shapes(self)
        if spec is not None:
            checkpoint[CHECKPOINT_KEY] = spec

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        apply_structured_shapes(self, checkpoint.get(CHECKPOINT_KEY))
