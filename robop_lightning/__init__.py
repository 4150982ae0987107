"""robop-lightning: robust optimization-guided pruning (RobOP) for PyTorch Lightning."""

from robop_lightning.gram import LayerInputs
from robop_lightning.layer import LayerResult, prune_layer

__version__ = "0.1.0"

__all__ = ["prune_layer", "LayerResult", "LayerInputs", "__version__"]
