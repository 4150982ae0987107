"""Module surgery for Hugging Face decoder layers (Llama, Mistral, Qwen, Gemma): remove whole KV
groups (with their query heads) and MLP channels."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn

from robop_lightning.pipeline.surgery.common import Unit, _index_rows, _keep_tensor, _set_columns, _snapshot

__all__ = ["decoder_units", "shrink_decoder_layer"]


def decoder_units(layer: nn.Module, name: str) -> list[Unit]:
    attn, mlp = getattr(layer, "self_attn", None), getattr(layer, "mlp", None)
    units: list[Unit] = []
    if attn is not None:
        for a in ("q_proj", "k_proj", "v_proj", "o_proj", "head_dim"):
            if not hasattr(attn, a):
                raise ValueError(
                    f"{name}.self_attn ({type(attn).__name__}) has no {a!r}: structured pruning supports Hugging Face "
                    "attention with separate q_proj / k_proj / v_proj / o_proj (Llama, Mistral, Qwen, Gemma)."
                )
        hd = int(attn.head_dim)
        q_heads, kv_heads = attn.q_proj.out_features // hd, attn.k_proj.out_features // hd
        if q_heads * hd != attn.q_proj.out_features or q_heads % kv_heads or attn.o_proj.in_features != q_heads * hd:
            raise ValueError(f"{name}.self_attn: projection shapes do not match head_dim={hd}; unsupported layout.")
        r = q_heads // kv_heads
        dim, out = attn.q_proj.in_features, attn.o_proj.out_features
        bias = int(attn.q_proj.bias is not None)
        units.append(
            Unit(
                name=f"{name}.self_attn",
                kind="kv_groups",
                consumer_name=f"{name}.self_attn.o_proj",
                consumer=attn.o_proj,
                n_groups=kv_heads,
                group_size=r * hd,
                params_per_group=(r + 2) * hd * (dim + bias) + r * hd * out,
                flops_per_token=lambda t, hd=hd, r=r, dim=dim, out=out: 2.0 * ((r + 2) * hd * dim + r * hd * out + 2 * t * r * hd),
                apply=lambda keep, weight=None, bias=None, layer=layer, name=name: shrink_decoder_layer(
                    layer, keep_kv_groups=keep, o_weight=weight, o_bias=bias, name=name
                ),
            )
        )
    if mlp is not None:
        for a in ("gate_proj", "up_proj", "down_proj"):
            if not hasattr(mlp, a):
                raise ValueError(
                    f"{name}.mlp ({type(mlp).__name__}) has no {a!r}: structured pruning supports gated MLPs "
                    "(gate_proj, up_proj, down_proj) of Hugging Face decoders."
                )
        dim, out = mlp.gate_proj.in_features, mlp.down_proj.out_features
        bias = int(mlp.gate_proj.bias is not None)
        units.append(
            Unit(
                name=f"{name}.mlp",
                kind="channels",
                consumer_name=f"{name}.mlp.down_proj",
                consumer=mlp.down_proj,
                n_groups=mlp.down_proj.in_features,
                group_size=1,
                params_per_group=2 * (dim + bias) + out,
                flops_per_token=lambda t, dim=dim, out=out: 2.0 * (2 * dim + out),
                apply=lambda keep, weight=None, bias=None, layer=layer, name=name: shrink_decoder_layer(
                    layer, keep_hidden=keep, down_weight=weight, down_bias=bias, name=name
                ),
            )
        )
    return units


def shrink_decoder_layer(
    layer: nn.Module,
    keep_kv_groups: Sequence[int] | torch.Tensor | None = None,
    keep_hidden: Sequence[int] | torch.Tensor | None = None,
    o_weight: torch.Tensor | None = None,
    o_bias: torch.Tensor | None = None,
    down_weight: torch.Tensor | None = None,
    down_bias: torch.Tensor | None = None,
    name: str = "layer",
) -> Callable[[], None]:
    """Physically remove KV groups and MLP channels of a Hugging Face decoder layer, in place.

    Grouped-query attention: a KV group is one key / value head with the ``num_attention_heads /
    num_key_value_heads`` query heads that read it; keeping whole groups keeps that ratio, so the
    stock forward (which infers the head count from the projection width) runs unchanged. ``q_proj``,
    ``k_proj``, ``v_proj`` keep the rows of the kept groups, ``o_proj`` their columns; per-head
    ``q_norm`` / ``k_norm`` (Gemma 3, Qwen 3) act on ``head_dim`` and are unaffected. The MLP keeps
    rows of ``gate_proj`` / ``up_proj`` and columns of ``down_proj``. The layer records its new
    sizes as ``self_attn.num_heads``, ``self_attn.num_key_value_heads`` and ``mlp.intermediate_size``.

    Args:
        layer: a decoder layer (``LlamaDecoderLayer`` and relatives).
        keep_kv_groups: indices of the KV heads to keep (``None``: attention untouched).
        keep_hidden: indices of the MLP channels to keep (``None``: MLP untouched).
        o_weight, o_bias: new ``o_proj`` weight / bias for the kept columns (``None``: sliced).
        down_weight, down_bias: new ``down_proj`` weight / bias (``None``: sliced).
        name: the layer's name in messages.

    Returns:
        A function that undoes the surgery.

    Example:
        >>> import torch
        >>> from transformers import LlamaConfig, LlamaForCausalLM
        >>> cfg = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
        ...                   num_attention_heads=4, num_key_value_heads=2, vocab_size=64)
        >>> lm = LlamaForCausalLM(cfg)
        >>> _ = shrink_decoder_layer(lm.model.layers[0], keep_kv_groups=[1], keep_hidden=range(40))
        >>> lm.model.layers[0].self_attn.q_proj.out_features, lm(torch.tensor([[1, 2, 3]])).logits.shape
        (16, torch.Size([1, 3, 64]))
    """
    units = decoder_units(layer, name)
    attn, mlp = getattr(layer, "self_attn", None), getattr(layer, "mlp", None)
    mods: dict[str, nn.Module] = {}
    attrs: dict[str, tuple[nn.Module, str]] = {}
    if keep_kv_groups is not None:
        mods.update({"q": attn.q_proj, "k": attn.k_proj, "v": attn.v_proj, "o": attn.o_proj})
        attrs.update({"nh": (attn, "num_heads"), "nkv": (attn, "num_key_value_heads")})
    if keep_hidden is not None:
        mods.update({"g": mlp.gate_proj, "u": mlp.up_proj, "d": mlp.down_proj})
        attrs["i"] = (mlp, "intermediate_size")
    undo = _snapshot(mods, attrs)
    try:
        if keep_kv_groups is not None:
            unit = units[0]
            hd = int(attn.head_dim)
            kv = _keep_tensor(keep_kv_groups, unit.n_groups, "KV group", f"{name}.self_attn")
            q_cols = unit.columns(kv)
            kv_rows = (kv[:, None] * hd + torch.arange(hd)[None, :]).flatten()
            _index_rows(attn.q_proj, q_cols)
            _index_rows(attn.k_proj, kv_rows)
            _index_rows(attn.v_proj, kv_rows)
            _set_columns(attn.o_proj, q_cols, o_weight, o_bias)
            attn.num_key_value_heads = int(kv.numel())
            attn.num_heads = int(q_cols.numel()) // hd
        if keep_hidden is not None:
            k = _keep_tensor(keep_hidden, mlp.down_proj.in_features, "MLP channel", f"{name}.mlp")
            _index_rows(mlp.gate_proj, k)
            _index_rows(mlp.up_proj, k)
            _set_columns(mlp.down_proj, k, down_weight, down_bias)
            mlp.intermediate_size = int(k.numel())
    except BaseException:
        undo()
        raise
    return undo
