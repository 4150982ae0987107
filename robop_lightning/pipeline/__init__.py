"""The model pipeline: from a model and its calibration data to pruned weights, block by block.

* :mod:`~robop_lightning.pipeline.targets`: which blocks and linears;
* :mod:`~robop_lightning.pipeline.calibration`, :mod:`~robop_lightning.pipeline.streaming`: running
  the calibration batches, recording each block's arguments, streaming Grams;
* :mod:`~robop_lightning.pipeline.walk`: :class:`BlockWalk`, which owns capture, propagation, undo,
  resume (:mod:`~robop_lightning.pipeline.resume`), memory tiers and progress, with a ``Step``
  plugged in: masks (:mod:`~robop_lightning.pipeline.prune`), physical shrinking
  (:mod:`~robop_lightning.pipeline.shrink_step`, :mod:`~robop_lightning.pipeline.surgery`) or CAP's
  Fisher (:mod:`~robop_lightning.pipeline.fisher_step`);
* :mod:`~robop_lightning.pipeline.masks`: holding pruned weights at zero during fine-tuning;
* :mod:`~robop_lightning.pipeline.dispatch`, :mod:`~robop_lightning.pipeline.gradients`: accelerate
  offloading and per-sample gradients.
"""
