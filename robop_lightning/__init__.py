"""robop-lightning: robust optimization-guided pruning (RobOP) for PyTorch Lightning."""

from robop_lightning.engine.gram import LayerInputs
from robop_lightning.engine.layer import LayerResult, prune_layer
from robop_lightning.pipeline.prune import PruneReport, prune_model
from robop_lightning.callback import RobOPCallback
from robop_lightning.pipeline.shrink_step import prune_model_structured
from robop_lightning.pipeline.surgery import load_structured, save_structured

__version__ = "0.1.0"

__all__ = [
    "prune_layer",
    "LayerResult",
    "LayerInputs",
    "prune_model",
    "PruneReport",
    "RobOPCallback",
    "prune_model_structured",
    "save_structured",
    "load_structured",
    "__version__",
]
