"""What every module surgery shares: a unit (a consumer linear and its producers), slicing a
linear's rows or columns into new Parameters, and an undo snapshot."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

__all__ = ["Unit", "mark_shrunk"]


def _index_rows(linear: nn.Linear, rows: torch.Tensor) -> None:
    """Keep only ``rows`` (output features) of ``linear``, in place (new Parameters, same module)."""
    rows = rows.to(linear.weight.device)
    linear.weight = nn.Parameter(linear.weight.detach()[rows].clone(), requires_grad=linear.weight.requires_grad)
    if linear.bias is not None:
        linear.bias = nn.Parameter(linear.bias.detach()[rows].clone(), requires_grad=linear.bias.requires_grad)
    linear.out_features = int(rows.numel())


def _set_columns(linear: nn.Linear, cols: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None) -> None:
    """Keep only input columns ``cols`` of ``linear``; ``weight`` / ``bias`` replace them when given."""
    old = linear.weight
    new = old.detach()[:, cols.to(old.device)].clone() if weight is None else weight.to(old.device, old.dtype).clone()
    linear.weight = nn.Parameter(new, requires_grad=old.requires_grad)
    if bias is not None and linear.bias is not None:
        linear.bias = nn.Parameter(bias.to(linear.bias.device, linear.bias.dtype).clone(), requires_grad=linear.bias.requires_grad)
    linear.in_features = int(new.shape[1])


def _snapshot(modules: dict[str, nn.Module], attrs: dict[str, tuple[nn.Module, str]]) -> Callable[[], None]:
    """An undo closure restoring the parameters and feature sizes of ``modules`` and the attributes."""
    saved = {
        n: (m, m.weight, m.bias, m.in_features, m.out_features) for n, m in modules.items() if isinstance(m, nn.Linear)
    }
    saved_attrs = {k: (obj, a, getattr(obj, a)) for k, (obj, a) in attrs.items() if hasattr(obj, a)}

    def undo() -> None:
        for m, w, b, i, o in saved.values():
            m.weight, m.in_features, m.out_features = w, i, o
            if b is not None:
                m.bias = b
        for obj, a, v in saved_attrs.values():
            setattr(obj, a, v)

    return undo


def _check_identity(module: nn.Module | None, what: str, name: str) -> None:
    if module is not None and not isinstance(module, nn.Identity):
        raise ValueError(
            f"{name}: {what} is a {type(module).__name__}, which mixes channels across heads / hidden units, so "
            "removing some changes it; structured pruning supports blocks without it (targets= other blocks)."
        )


def _keep_tensor(keep: Sequence[int] | torch.Tensor, total: int, what: str, name: str) -> torch.Tensor:
    k = torch.as_tensor(keep, dtype=torch.long).flatten()
    if k.numel() == 0:
        raise ValueError(f"{name}: keep at least one {what} (a block with none cannot run); got an empty list.")
    if k.unique().numel() != k.numel() or int(k.min()) < 0 or int(k.max()) >= total:
        raise ValueError(f"{name}: {what} indices must be distinct and in [0, {total}), got {k.tolist()}.")
    return torch.sort(k).values


@dataclass
class Unit:
    """A consumer linear, its producers and the groups that can be removed together."""

    name: str  # the unit: "<block>.attn" / "<block>.mlp"
    kind: str  # "heads", "kv_groups" or "channels"
    consumer_name: str
    consumer: nn.Linear
    n_groups: int
    group_size: int  # consumer columns per group
    params_per_group: int
    flops_per_token: Callable[[int], float]  # per group, given the sequence length
    apply: Callable[..., Callable[[], None]]  # apply(keep, weight=None, bias=None) -> undo

    def groups(self) -> list[list[int]]:
        s = self.group_size
        return [list(range(i * s, (i + 1) * s)) for i in range(self.n_groups)]

    def columns(self, keep: torch.Tensor) -> torch.Tensor:
        s = self.group_size
        return (keep[:, None] * s + torch.arange(s)[None, :]).flatten()


def mark_shrunk(block: nn.Module) -> None:
    block._robop_structured = True  # read by structured_shapes (checkpoints of shrunk models)
