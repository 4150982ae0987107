"""LightningModules for the models RobOP prunes."""

from robop_lightning.models.deit import DeiTClassifier

__all__ = ["DeiTClassifier"]
