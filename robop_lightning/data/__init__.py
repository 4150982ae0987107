"""DataModules and offline assets."""

from robop_lightning.data.text import TextDataModule
from robop_lightning.data.vision import FashionMNISTDataModule, ImageFolderDataModule

__all__ = ["FashionMNISTDataModule", "ImageFolderDataModule", "TextDataModule"]
