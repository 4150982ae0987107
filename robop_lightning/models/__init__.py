"""LightningModules for the models RobOP prunes."""

from robop_lightning.models.causal_lm import CausalLMModule
from robop_lightning.models.deit import DeiTClassifier

__all__ = ["DeiTClassifier", "CausalLMModule"]
