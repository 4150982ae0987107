"""The prunable units of a block, whichever family it belongs to."""

from __future__ import annotations

from torch import nn

from robop_lightning.pipeline.surgery.common import Unit
from robop_lightning.pipeline.surgery.decoder import decoder_units
from robop_lightning.pipeline.surgery.vit import vit_units

__all__ = ["block_units"]


def block_units(block: nn.Module, name: str = "block") -> list[Unit]:
    """The prunable units of a block: timm ``Block`` (attn / mlp) or HF decoder layer (self_attn / mlp).

    Raises:
        ValueError: the block is neither (naming the block and what is supported).
    """
    if hasattr(block, "self_attn") or hasattr(getattr(block, "mlp", None), "down_proj"):
        return decoder_units(block, name)
    if hasattr(getattr(block, "attn", None), "qkv") or hasattr(getattr(block, "mlp", None), "fc2"):
        return vit_units(block, name)
    raise ValueError(
        f"{name} ({type(block).__name__}) is not a supported block for pattern='structured': use a timm ViT / DeiT "
        "(blocks with attn.qkv / attn.proj and mlp.fc1 / mlp.fc2) or a Hugging Face decoder (self_attn.q_proj / "
        "k_proj / v_proj / o_proj and mlp.gate_proj / up_proj / down_proj)."
    )
