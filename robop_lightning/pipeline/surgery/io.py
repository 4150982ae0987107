"""Save and load structurally pruned models: the per-block sizes travel with the weights."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_model
from torch import nn

from robop_lightning.pipeline.surgery.common import Unit, mark_shrunk
from robop_lightning.pipeline.surgery.units import block_units
from robop_lightning.pipeline.targets import find_blocks, find_hf_model

__all__ = ["CHECKPOINT_KEY", "structured_shapes", "apply_structured_shapes", "record_config", "save_structured",
           "load_structured"]

CHECKPOINT_KEY = "robop_structured"


def _unit_key(unit: Unit, block_name: str) -> str:
    return unit.name[len(block_name) + 1 :]


def structured_shapes(model: nn.Module) -> dict[str, Any] | None:
    """The per-block sizes of a structurally pruned model, or ``None`` when no block was shrunk.

    ``{"version": 1, "blocks": "<container>", "layers": {"<block name>": {"attn": heads, "mlp": channels}}}``
    (``self_attn`` counts KV groups for Hugging Face decoders); names are relative to ``model``.
    """
    structure = find_blocks(model)
    if structure is None:
        return None
    container, block_list = structure
    layers = {}
    for bname, block in block_list:
        if getattr(block, "_robop_structured", False):
            layers[bname] = {_unit_key(u, bname): u.n_groups for u in block_units(block, bname)}
    if not layers:
        return None
    return {"version": 1, "blocks": container, "layers": layers}


def apply_structured_shapes(model: nn.Module, spec: dict[str, Any] | None) -> nn.Module:
    """Shrink a freshly built model to the sizes in ``spec`` (from :func:`structured_shapes`), in place.

    The kept weights are placeholders (the first groups); load the pruned state dict afterwards.
    ``None`` does nothing. Returns ``model``.

    Raises:
        ValueError: a block named in ``spec`` does not exist or is already smaller than asked.
    """
    if not spec:
        return model
    for bname, counts in spec.get("layers", {}).items():
        try:
            block = model.get_submodule(bname)
        except AttributeError:
            raise ValueError(
                f"the structured shapes name block {bname!r}, which {type(model).__name__} does not have; build the "
                "same architecture (and wrapper) that was pruned."
            ) from None
        for unit in block_units(block, bname):
            want = counts.get(_unit_key(unit, bname))
            if want is None or want == unit.n_groups:
                continue
            if want > unit.n_groups:
                raise ValueError(f"{unit.name}: the checkpoint has {want} groups but the model only {unit.n_groups}.")
            unit.apply(torch.arange(want))
            mark_shrunk(block)
    return model


def record_config(model: nn.Module) -> None:
    """Write the per-layer sizes into a Hugging Face model's config (``config.robop_structured``)."""
    found = find_hf_model(model)
    root = None if found is None else found[1]
    if root is not None:
        spec = structured_shapes(root)
        if spec is not None:
            root.config.robop_structured = spec


def save_structured(model: nn.Module, path: str | Path) -> Path:
    """Save a (structurally pruned) model to the directory ``path``; load it with :func:`load_structured`.

    A Hugging Face model is written with ``save_pretrained`` (``config.json`` then carries the per-layer
    sizes as ``robop_structured``); any other model as ``model.safetensors`` plus ``structured.json``.

    Example:
        >>> import tempfile, timm, torch
        >>> from robop_lightning.pipeline.shrink_step import prune_model_structured
        >>> make = lambda: timm.create_model("deit_tiny_patch16_224", img_size=32, patch_size=8,
        ...                                  embed_dim=48, depth=2, num_heads=4, num_classes=3)
        >>> vit = make().eval()
        >>> _ = prune_model_structured(vit, [torch.randn(4, 3, 32, 32)], sparsity=0.5, uncertainty="baseline")
        >>> d = tempfile.mkdtemp()
        >>> _ = save_structured(vit, d)
        >>> again = load_structured(d, make).eval()   # the one-line loader
        >>> x = torch.randn(2, 3, 32, 32)
        >>> torch.equal(again(x), vit(x))
        True
    """
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    spec = structured_shapes(model)
    if callable(getattr(model, "save_pretrained", None)) and hasattr(getattr(model, "config", None), "to_dict"):
        if spec is not None:
            model.config.robop_structured = spec
        model.save_pretrained(path)
        return path
    save_model(model, str(path / "model.safetensors"))
    (path / "structured.json").write_text(json.dumps(spec or {"version": 1, "layers": {}}, indent=2) + "\n")
    return path


def load_structured(path: str | Path, model: nn.Module | Callable[[], nn.Module] | None = None) -> nn.Module:
    """Load what :func:`save_structured` wrote: ``load_structured(directory, model_factory)``.

    Args:
        path: the directory.
        model: a freshly built full-size model of the same architecture, or a function building one
            (such as ``lambda: timm.create_model("deit_small_patch16_224")``). ``None`` for a Hugging
            Face directory: the model is rebuilt from its ``config.json`` (``AutoModelForCausalLM``).

    Returns:
        The model, shrunk to the saved sizes, with the saved weights (strictly loaded).

    Raises:
        ValueError: no model given for a non-HF directory, or the weights do not match.
    """
    path = Path(path)
    spec = None
    if (path / "structured.json").exists():
        spec = json.loads((path / "structured.json").read_text())
    if model is None:
        if not (path / "config.json").exists():
            raise ValueError(
                f"{path} is not a Hugging Face directory; pass the model (or a function that builds the full-size model): "
                "load_structured(path, lambda: timm.create_model(...))."
            )
        from transformers import AutoConfig, AutoModelForCausalLM

        config = AutoConfig.from_pretrained(path)
        model = AutoModelForCausalLM.from_config(config)
    elif not isinstance(model, nn.Module):
        model = model()
    if spec is None and (path / "config.json").exists():
        spec = json.loads((path / "config.json").read_text()).get("robop_structured")
    apply_structured_shapes(model, spec)
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise ValueError(f"{path} holds no .safetensors weights; save with save_structured(model, path).")
    state: dict[str, torch.Tensor] = {}
    for f in files:
        state.update(load_file(str(f)))
    missing, unexpected = model.load_state_dict(state, strict=False)
    if callable(getattr(model, "tie_weights", None)):
        model.tie_weights()
    params = dict(model.state_dict(keep_vars=True))
    loaded_ptrs = {params[k].data_ptr() for k in state if k in params}
    missing = [k for k in missing if params[k].data_ptr() not in loaded_ptrs]
    if missing or unexpected:
        raise ValueError(
            f"the weights in {path} do not match the model: missing {missing[:5]}, unexpected {list(unexpected)[:5]}; "
            "build the same architecture that was pruned."
        )
    return model
