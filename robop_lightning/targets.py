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

from torch import nn

__all__ = ["find_blocks", "is_head", "resolve_targets"]

# Path components that mark an output head (timm head / head_dist, HF lm_head / classifier /
# score). A linear whose own name is ``fc`` (torchvision and timm ResNets) is a head too.
_HEAD_NAMES = frozenset({"head", "head_dist", "lm_head", "classifier", "score"})

def _has_linear(module: nn.Module) -> bool:
    return any(isinstance(m, nn.Linear) for m in module.modules())


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
        if len({type(c) for c in children}) != 1 or isinstance(children[0], nn.Linear):
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
    """Names of the ``nn.Linear`` modules to prune, in ``named_modules`` order.

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
    linears = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise ValueError(f"{type(model).__name__} has no nn.Linear layer to prune.")

    if targets is None:
        if block_names:
            chosen = [n for n in linears if any(n.startswith(b + ".") for b in block_names)]
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
