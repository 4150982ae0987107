"""Module surgery for timm ViT / DeiT blocks: remove whole heads and MLP channels."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn

from robop_lightning.pipeline.surgery.common import Unit, _check_identity, _index_rows, _keep_tensor, _set_columns, _snapshot

__all__ = ["shrink_vit_block", "vit_units"]


def vit_units(block: nn.Module, name: str) -> list[Unit]:
    attn, mlp = getattr(block, "attn", None), getattr(block, "mlp", None)
    units: list[Unit] = []
    if attn is not None:
        for a in ("qkv", "proj", "num_heads", "head_dim"):
            if not hasattr(attn, a):
                raise ValueError(
                    f"{name}.attn ({type(attn).__name__}) has no {a!r}: structured pruning supports timm's fused "
                    "`Attention` (qkv, proj, num_heads, head_dim)."
                )
        _check_identity(getattr(attn, "norm", None), "attn.norm (scale_norm)", name)
        heads, hd = int(attn.num_heads), int(attn.head_dim)
        if attn.qkv.out_features != 3 * heads * hd or attn.proj.in_features != heads * hd:
            raise ValueError(f"{name}.attn: qkv / proj shapes do not match num_heads x head_dim; unsupported layout.")
        dim = attn.qkv.in_features
        units.append(
            Unit(
                name=f"{name}.attn",
                kind="heads",
                consumer_name=f"{name}.attn.proj",
                consumer=attn.proj,
                n_groups=heads,
                group_size=hd,
                params_per_group=3 * hd * (dim + (attn.qkv.bias is not None)) + hd * attn.proj.out_features,
                flops_per_token=lambda t, hd=hd, dim=dim, out=attn.proj.out_features: 2.0 * (3 * hd * dim + hd * out + 2 * t * hd),
                apply=lambda keep, weight=None, bias=None, block=block, name=name: shrink_vit_block(
                    block, keep_heads=keep, proj_weight=weight, proj_bias=bias, name=name
                ),
            )
        )
    if mlp is not None:
        if not (hasattr(mlp, "fc1") and hasattr(mlp, "fc2")) or mlp.fc1.out_features != mlp.fc2.in_features:
            raise ValueError(
                f"{name}.mlp ({type(mlp).__name__}) is not a plain timm `Mlp` (fc1 -> act -> fc2 with matching widths); "
                "gated MLPs (GluMlp, SwiGLU) are not supported by structured pruning yet."
            )
        _check_identity(getattr(mlp, "norm", None), "mlp.norm", name)
        dim, out = mlp.fc1.in_features, mlp.fc2.out_features
        units.append(
            Unit(
                name=f"{name}.mlp",
                kind="channels",
                consumer_name=f"{name}.mlp.fc2",
                consumer=mlp.fc2,
                n_groups=mlp.fc1.out_features,
                group_size=1,
                params_per_group=dim + (mlp.fc1.bias is not None) + out,
                flops_per_token=lambda t, dim=dim, out=out: 2.0 * (dim + out),
                apply=lambda keep, weight=None, bias=None, block=block, name=name: shrink_vit_block(
                    block, keep_hidden=keep, fc2_weight=weight, fc2_bias=bias, name=name
                ),
            )
        )
    return units


def shrink_vit_block(
    block: nn.Module,
    keep_heads: Sequence[int] | torch.Tensor | None = None,
    keep_hidden: Sequence[int] | torch.Tensor | None = None,
    proj_weight: torch.Tensor | None = None,
    proj_bias: torch.Tensor | None = None,
    fc2_weight: torch.Tensor | None = None,
    fc2_bias: torch.Tensor | None = None,
    name: str = "block",
) -> Callable[[], None]:
    """Physically remove heads and MLP channels of a timm ViT / DeiT ``Block``, in place.

    ``qkv`` keeps the q, k and v rows of the kept heads, ``proj`` their columns, ``num_heads`` /
    ``attn_dim`` shrink (``head_dim`` and the scale are unchanged); ``fc1`` keeps the rows of the kept
    hidden channels and ``fc2`` their columns. Without ``proj_weight`` / ``fc2_weight`` the kept
    columns are copied as they are (no compensation).

    Args:
        block: a timm ``Block`` (``attn``: ``Attention``, ``mlp``: ``Mlp``).
        keep_heads: indices of the heads to keep (``None``: attention untouched).
        keep_hidden: indices of the MLP hidden channels to keep (``None``: MLP untouched).
        proj_weight, proj_bias: new ``attn.proj`` weight ``(dim, kept_heads * head_dim)`` / bias.
        fc2_weight, fc2_bias: new ``mlp.fc2`` weight ``(dim, kept_hidden)`` / bias.
        name: the block's name in messages.

    Returns:
        A function that undoes the surgery.

    Example:
        >>> import timm, torch
        >>> vit = timm.create_model("deit_tiny_patch16_224", img_size=32, patch_size=8, embed_dim=48,
        ...                         depth=2, num_heads=4, num_classes=3)
        >>> _ = shrink_vit_block(vit.blocks[0], keep_heads=[0, 2], keep_hidden=range(100))
        >>> vit.blocks[0].attn.num_heads, vit.blocks[0].mlp.fc1.out_features, vit(torch.randn(1, 3, 32, 32)).shape
        (2, 100, torch.Size([1, 3]))
    """
    attn, mlp = getattr(block, "attn", None), getattr(block, "mlp", None)
    mods: dict[str, nn.Module] = {}
    attrs: dict[str, tuple[nn.Module, str]] = {}
    if keep_heads is not None:
        vit_units(block, name)  # validates the layout
        mods.update({"qkv": attn.qkv, "proj": attn.proj})
        if getattr(attn, "gate", None) is not None:
            mods["gate"] = attn.gate
        attrs.update({"h": (attn, "num_heads"), "d": (attn, "attn_dim")})
    if keep_hidden is not None:
        mods.update({"fc1": mlp.fc1, "fc2": mlp.fc2})
    undo = _snapshot(mods, attrs)
    try:
        if keep_heads is not None:
            heads, hd = int(attn.num_heads), int(attn.head_dim)
            k = _keep_tensor(keep_heads, heads, "head", f"{name}.attn")
            cols = (k[:, None] * hd + torch.arange(hd)[None, :]).flatten()
            rows = torch.cat([cols + t * heads * hd for t in range(3)])
            _index_rows(attn.qkv, rows)
            if getattr(attn, "gate", None) is not None:
                _index_rows(attn.gate, cols)
            _set_columns(attn.proj, cols, proj_weight, proj_bias)
            attn.num_heads = int(k.numel())
            if hasattr(attn, "attn_dim"):
                attn.attn_dim = int(k.numel()) * hd
        if keep_hidden is not None:
            k = _keep_tensor(keep_hidden, mlp.fc1.out_features, "MLP channel", f"{name}.mlp")
            _index_rows(mlp.fc1, k)
            _set_columns(mlp.fc2, k, fc2_weight, fc2_bias)
    except BaseException:
        undo()
        raise
    return undo
