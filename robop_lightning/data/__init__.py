from robop_lightning.data.text import TextDataModule  # noqa: F401
