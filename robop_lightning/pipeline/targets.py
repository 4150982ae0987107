"""Which modules are pruned: the repeated blocks of a model and the target linears, by name.

* :func:`find_blocks`: the repeated blocks of a model (timm ``blocks``, Hugging Face
  ``model.layers``, any ``nn.ModuleList`` / ``nn.Sequential`` of two or more blocks of one class);
  ``None`` when the model has none (then linears are pruned one by one, in forward order).
* :func:`resolve_targets`: which ``nn.Linear`` are pruned, from names and ``"re:<regex>"``
  patterns; output heads stay dense unless named explicitly.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import torch
from torch import nn

__all__ = ["default_solver", "find_blocks", "find_hf_model", "is_head", "is_linear", "is_transposed", "left_dense", "resolve_targets"]

# Path components that mark an output head (timm head / head_dist, HF lm_head / classifier /
# score). A linear whose own name is ``fc`` (torchvision and timm ResNets) is a head too.
_HEAD_NAMES = frozenset({"head", "head_dist", "lm_head", "classifier", "score"})

def is_transposed(module: nn.Module) -> bool:
    """A GPT-2-style ``Conv1D`` (``transformers.pytorch_utils``): a linear layer that stores its weight
    as ``(in_features, out_features)`` and computes ``x @ W + b``. Recognised by shape, not imported."""
    weight = getattr(module, "weight", None)
    return (type(module).__name__ == "Conv1D" and isinstance(weight, torch.Tensor) and weight.dim() == 2
            and getattr(module, "nf", None) == weight.shape[1])


def is_linear(module: nn.Module) -> bool:
    """What the pipeline prunes: ``nn.Linear`` and GPT-2's ``Conv1D`` (pruned as its transposed weight)."""
    return isinstance(module, nn.Linear) or is_transposed(module)


def _is_router(name: str, module: nn.Module) -> bool:
    """A mixture-of-experts router or gate score (``mlp.gate``, ``router``, ``shared_expert_gate``): tiny,
    and its outputs pick experts, so pruning it changes routing rather than compressing anything."""
    last = name.rsplit(".", 1)[-1]
    out = getattr(module, "out_features", None)
    return last in ("gate", "router", "shared_expert_gate") and out is not None and out <= 256


def _has_linear(module: nn.Module) -> bool:
    return any(is_linear(m) for m in module.modules())


def find_blocks(model: nn.Module, blocks: str | None = None) -> tuple[str, list[tuple[str, nn.Module]]] | None:
    """The repeated blocks of ``model``, as ``(container name, [(block name, block), ...])``.

    Args:
        model: the model.
        blocks: dotted name of the container (``"model.layers"``); ``None`` searches for the
            ``nn.ModuleList`` / ``nn.Sequential`` of two or more same-class blocks that contain a
            linear layer and hold the most parameters.

    Returns:
        The container and its blocks in order, or ``None`` when ``blocks`` is ``None`` and the
        model has no repeated blocks.

    Raises:
        ValueError: ``blocks`` names no module, or a module that is not a list of blocks.
    """
    if blocks is not None:
        if not isinstance(blocks, str) or not blocks:
            raise ValueError(
                f"blocks must be the dotted name of a module list, such as 'model.layers', got {blocks!r}."
            )
        try:
            container = model.get_submodule(blocks)
        except AttributeError:
            raise ValueError(
                f"blocks={blocks!r} is not a submodule of {type(model).__name__}. Module lists in this model: "
                f"{_list_names(model) or 'none'}."
            ) from None
        if not isinstance(container, (nn.ModuleList, nn.Sequential)) or len(container) == 0:
            raise ValueError(
                f"blocks={blocks!r} is a {type(container).__name__}; it must be an nn.ModuleList or nn.Sequential "
                "whose children are the blocks, called one after the other."
            )
        return blocks, [(f"{blocks}.{i}", b) for i, b in container.named_children()]

    best, best_size = None, -1
    for name, module in model.named_modules():
        if not isinstance(module, (nn.ModuleList, nn.Sequential)) or len(module) < 2:
            continue
        children = list(module.children())
        if len({type(c) for c in children}) != 1 or is_linear(children[0]):
            continue
        if not all(_has_linear(c) for c in children):
            continue
        size = sum(p.numel() for p in module.parameters())
        if size > best_size:
            best, best_size = name, size
    if best is None:
        return None
    container = model.get_submodule(best)
    prefix = f"{best}." if best else ""
    return best, [(f"{prefix}{i}", b) for i, b in container.named_children()]


def _list_names(model: nn.Module) -> str:
    names = [n for n, m in model.named_modules() if n and isinstance(m, (nn.ModuleList, nn.Sequential))]
    return ", ".join(names[:10])


def is_head(name: str) -> bool:
    """Whether a linear's name marks an output head, left dense unless targeted explicitly."""
    parts = name.split(".")
    return any(p in _HEAD_NAMES for p in parts) or parts[-1] == "fc"


def _match(spec: str, name: str) -> bool:
    if spec.startswith("re:"):
        return re.search(spec[3:], name) is not None
    return name == spec or name.startswith(spec + ".")


def _check_specs(specs: Sequence[str] | None, what: str) -> list[str]:
    if specs is None:
        return []
    if isinstance(specs, str):
        specs = [specs]
    out = []
    for s in specs:
        if not isinstance(s, str) or not s or s == "re:":
            raise ValueError(f"{what} must be module names or 're:<regex>' patterns, got {s!r}.")
        if s.startswith("re:"):
            try:
                re.compile(s[3:])
            except re.error as err:
                raise ValueError(f"{what}: invalid regular expression {s!r}: {err}.") from None
        out.append(s)
    return out


def resolve_targets(
    model: nn.Module,
    targets: Sequence[str] | str | None,
    ignore: Sequence[str] | str | None,
    block_names: Sequence[str] | None,
) -> list[str]:
    """Names of the linear modules to prune (``nn.Linear``, GPT-2's ``Conv1D``), in ``named_modules`` order.

    Args:
        model: the model.
        targets: module names (a container selects every linear inside it) or ``"re:<regex>"``
            patterns (``re.search`` on the full name). ``None``: every linear inside the blocks,
            or, without blocks, every linear that is not an output head.
        ignore: names or patterns removed from the targets (wins over ``targets``).
        block_names: the blocks' names (from :func:`find_blocks`), or ``None``.

    Raises:
        ValueError: an entry matches no linear, or nothing is left to prune.
    """
    target_specs = _check_specs(targets, "targets")
    ignore_specs = _check_specs(ignore, "ignore")
    linears = [n for n, m in model.named_modules() if is_linear(m)]
    if not linears:
        raise ValueError(f"{type(model).__name__} has no nn.Linear (or GPT-2 Conv1D) layer to prune.")

    if targets is None:
        if block_names:  # every linear of the blocks but mixture-of-experts routers (llm-compressor skips them too)
            chosen = [n for n in linears if any(n.startswith(b + ".") for b in block_names)
                      and not _is_router(n, model.get_submodule(n))]
        else:
            chosen = [n for n in linears if not is_head(n)]
    else:
        for spec in target_specs:
            if not any(_match(spec, n) for n in linears):
                raise ValueError(
                    f"targets entry {spec!r} matches no nn.Linear. Linear layers include: "
                    f"{', '.join(linears[:8])}{' ...' if len(linears) > 8 else ''}."
                )
        chosen = [n for n in linears if any(_match(s, n) for s in target_specs)]
    for spec in ignore_specs:
        if not any(_match(spec, n) for n in linears):
            raise ValueError(
                f"ignore entry {spec!r} matches no nn.Linear (a typo would silently prune a layer you want "
                f"dense). Linear layers include: {', '.join(linears[:8])}{' ...' if len(linears) > 8 else ''}."
            )
    chosen = [n for n in chosen if not any(_match(s, n) for s in ignore_specs)]
    if not chosen:
        raise ValueError("targets and ignore leave no layer to prune; check both lists.")
    return chosen


def left_dense(model: nn.Module, targets: Sequence[str], block_names: Sequence[str] | None,
               minimum: int | None = None) -> dict[str, int]:
    """Weight matrices inside the blocks that no target can prune: ``{parameter name: elements}``.

    Linears left out by ``targets`` / ``ignore`` are a choice and do not count. Fused mixture-of-experts tensors (transformers 5 stores each layer's experts as one
    ``(experts, out, in)`` parameter, not as ``nn.Linear``), and any other matrix of at least
    ``minimum`` elements (default: as many as the smallest target, at most 65536) that is not the
    weight of a target, count; norms, biases and routers do not.
    """
    if not block_names:
        return {}
    chosen = {f"{t}.weight" for t in targets}
    linear = {f"{n}.weight" for n, m in model.named_modules() if is_linear(m)}  # left out by choice, not counted
    if minimum is None:
        sizes = [p.numel() for n, p in model.named_parameters() if n in chosen]
        minimum = min([1 << 16, *sizes])
    out = {}
    for name, param in model.named_parameters():
        if name in linear or param.dim() < 2 or param.numel() < minimum:
            continue
        if not any(name.startswith(b + ".") for b in block_names):
            continue
        out[name] = param.numel()
    return out


def default_solver(model: nn.Module) -> tuple[str, str]:
    """The solver ``solver=None`` picks for ``model``, and why.

    ALPS (RobOP-ALPS) for a causal language model (a module named ``lm_head``, or a Hugging Face
    ``...ForCausalLM`` anywhere inside, a LightningModule wrapper included): its ADMM scales to LLM
    layers. CAP (RobOP-CAP) otherwise (vision transformers and other models): exact OBS per row.
    """
    for name, module in model.named_modules():
        if name.rsplit(".", 1)[-1] == "lm_head" or type(module).__name__.endswith("ForCausalLM"):
            return "alps", "RobOP-ALPS, the default for causal language models"
    return "cap", "RobOP-CAP, the default for models that are not causal language models"


def find_hf_model(model: nn.Module) -> tuple[str, nn.Module] | None:
    """The outermost Hugging Face model inside ``model`` (itself, or a wrapper's child such as a
    LightningModule's) and its name: a module with ``save_pretrained`` and a ``config``; ``None`` if none."""
    for name, module in model.named_modules():
        if callable(getattr(module, "save_pretrained", None)) and hasattr(getattr(module, "config", None), "to_dict"):
            return name, module
    return None
