"""The layer engine: pure maths on one linear layer, no model walking, no Lightning.

Data flows down this list:

* :mod:`~robop_lightning.engine.gram`: calibration statistics (the input Gram ``H``, folds, held-out);
* :mod:`~robop_lightning.engine.sets`: the uncertainty sets (Baseline, Trace, E, CTE as closed-form
  regularisers of ``H``; the min-max extension);
* :mod:`~robop_lightning.engine.solvers`: ALPS, CAP, SparseGPT, Wanda, magnitude (and structured /
  Fisher OBS kernels);
* :mod:`~robop_lightning.engine.patterns`, :mod:`~robop_lightning.engine.damping`,
  :mod:`~robop_lightning.engine.alternation` (the min-max alternation),
  :mod:`~robop_lightning.engine.selection` (``"auto"``);
* :mod:`~robop_lightning.engine.layer`: :func:`prune_layer`, which puts them together.
"""
