"""robop-lightning: robust optimization-guided pruning (RobOP) for PyTorch Lightning.

The public API, by how it is met:

* in a Lightning ``Trainer``: :class:`RobOPCallback`;
* plain PyTorch: :func:`prune_model` (keywords) or :func:`run_job` (a :class:`PruneConfig`), one
  layer: :func:`prune_layer`; physically smaller models: :func:`prune_model_structured`; CAP's
  Fisher: :func:`prune_model_fisher`;
* shipping: :func:`save_pruned` / :func:`load_pruned` (sparse checkpoints),
  :func:`save_structured` / :func:`load_structured` (shrunk shapes);
* the option types: :class:`PruneConfig`, :class:`StructuredOptions`, :class:`FisherOptions`,
  :class:`AutoOptions` and one per solver (:class:`AlpsOptions`, :class:`CapOptions`,
  :class:`SparseGPTOptions`, :class:`WandaOptions`, :class:`MagnitudeOptions`); a dict with the
  same keys works wherever one is taken.

``import robop_lightning`` needs torch and Lightning only; the evaluation wing
(:mod:`robop_lightning.models`, :mod:`~robop_lightning.data`, :mod:`~robop_lightning.robustness`,
:mod:`~robop_lightning.assets`) is imported on use and needs the ``vision`` / ``llm`` extras.
"""

from robop_lightning.callback import RobOPCallback
from robop_lightning.config import FisherOptions, PruneConfig, StructuredOptions
from robop_lightning.engine.gram import LayerInputs
from robop_lightning.engine.layer import LayerResult, prune_layer
from robop_lightning.engine.selection import AutoOptions
from robop_lightning.engine.solvers.options import AlpsOptions, CapOptions, MagnitudeOptions, SparseGPTOptions, WandaOptions
from robop_lightning.export import load_pruned, save_pruned
from robop_lightning.pipeline.fisher_step import prune_model_fisher
from robop_lightning.pipeline.prune import PruneReport, prune_model, run_job
from robop_lightning.pipeline.shrink_step import prune_model_structured
from robop_lightning.pipeline.surgery import load_structured, save_structured

__version__ = "0.1.0"

__all__ = [
    "RobOPCallback",
    "prune_model",
    "run_job",
    "prune_layer",
    "prune_model_structured",
    "prune_model_fisher",
    "PruneConfig",
    "PruneReport",
    "LayerResult",
    "LayerInputs",
    "StructuredOptions",
    "FisherOptions",
    "AutoOptions",
    "AlpsOptions",
    "CapOptions",
    "SparseGPTOptions",
    "WandaOptions",
    "MagnitudeOptions",
    "save_pruned",
    "load_pruned",
    "save_structured",
    "load_structured",
    "__version__",
]
