"""What the pipeline streams through a block instead of storing it: every block's own
arguments, recorded in one cheap pass of the model's forward, and each target's Grams, added in
its forward hook as the batches pass.

* :func:`record_block_args`: the model computes some block arguments per layer (Gemma 2 / 3 give
  sliding and full attention layers their own rotary encoding and mask; hybrid and chunked
  attention models likewise), so replaying the first block's arguments to every block would
  calibrate some layers on inputs they never see. Every later block's ``forward`` is replaced, for
  one pass per batch, by a pass-through that records its ``(args, kwargs)`` and hands the hidden
  states on unchanged (in the structure the first block really returned); the pass stops at the
  last block, so no block computes anything.
* :func:`accumulate_block`: run a block on the recorded calls, each target's inputs reduced into its
  :class:`~robop_lightning.engine.gram.GramAccumulator` on the compute device and dropped.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import nn

from robop_lightning.pipeline.calibration import (
    BlockCall,
    HookOwner,
    _as_samples,
    _hidden_slot,
    _StopForward,
    clean_kwargs,
    kept,
    move_to,
)
from robop_lightning.engine.gram import GramAccumulator, StatsUnavailable

__all__ = ["accumulate_block", "record_block_args"]


class _BlockNotCalled(Exception):
    """A forward pass ended without calling a block (``args[0]``: its index)."""


class _PassThrough:
    """Stands in for block ``index``'s ``forward``: records its first call's ``(args, kwargs, slot)``
    in ``seen`` and hands the hidden states on (with ``rest``); the last block stops the forward."""

    def __init__(self, index: int, last: int, seen: dict[int, tuple[tuple, dict, int | str]], rest: tuple | None,
                 name: str) -> None:
        self.index, self.last, self.seen, self.rest, self.name = index, last, seen, rest, name

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        slot = _hidden_slot(args, kwargs, self.name)
        if self.index not in self.seen:
            self.seen[self.index] = (args, clean_kwargs(kwargs), slot)
        if self.index == self.last:
            raise _StopForward
        hidden = args[slot] if isinstance(slot, int) else kwargs[slot]
        return hidden if self.rest is None else (hidden, *self.rest)


def _kept_arguments(seen: dict[int, tuple[tuple, dict, int | str]], count: int,
                    keep: Callable[[torch.Tensor], Any]) -> list[tuple[tuple, dict]]:
    """Every block's recorded ``(args, kwargs)`` of one batch, ``None`` at the hidden states, tensors kept once."""
    missing = [i for i in range(count) if i not in seen]
    if missing:
        raise _BlockNotCalled(missing[0])
    memo: dict[int, Any] = {}
    per_block = []
    for i in range(count):
        args, kwargs, slot = seen[i]
        if isinstance(slot, int):
            args = tuple(None if j == slot else a for j, a in enumerate(args))
        else:
            kwargs = {k: (None if k == slot else v) for k, v in kwargs.items()}
        per_block.append((kept(args, keep, memo), kept(kwargs, keep, memo)))
    return per_block


def _record_batches(model: nn.Module, blocks: list[nn.Module], batches: list[Any],
                    forward: Callable[[nn.Module, Any], Any], device: torch.device, rest: tuple | None,
                    keep: Callable[[torch.Tensor], Any], name: str) -> list[list[tuple[tuple, dict]]]:
    """One pass per batch with every block's ``forward`` replaced by a :class:`_PassThrough`
    (restored afterwards, whatever happens): each batch's per-block arguments."""
    seen: dict[int, tuple[tuple, dict, int | str]] = {}
    saved = [b.__dict__.get("forward") for b in blocks]
    recorded: list[list[tuple[tuple, dict]]] = []
    try:
        for i, b in enumerate(blocks):
            b.forward = _PassThrough(i, len(blocks) - 1, seen, rest, name)
        for batch in batches:
            seen.clear()
            with contextlib.suppress(_StopForward):
                forward(model, move_to(batch, device))
            recorded.append(_kept_arguments(seen, len(blocks), keep))
    finally:
        for b, f in zip(blocks, saved):
            if f is None:
                b.__dict__.pop("forward", None)
            else:
                b.forward = f
    return recorded


def record_block_args(
    model: nn.Module,
    blocks: list[nn.Module],
    calls: list[BlockCall],
    batches: list[Any],
    forward: Callable[[nn.Module, Any], Any],
    device: torch.device,
    rest: tuple | None,
    keep: Callable[[torch.Tensor], Any],
    name: str = "block",
) -> None:
    """Fill ``calls[b].per_block`` with the arguments the model passes each of ``blocks`` on batch ``b``.

    Args:
        model: the whole model.
        blocks: the blocks, first to last to record (index 0 is the first block, recorded already
            in ``calls``; it is passed through and its arguments are kept as they are).
        calls: the first block's recorded calls, one per batch.
        batches, forward, device: as for :func:`robop_lightning.pipeline.calibration.capture_block_inputs`.
        rest: what the blocks return besides their hidden states: ``None`` for a tensor, else the
            rest of the output tuple (learnt from a real call of the first block).
        keep: where a recorded tensor is kept (tensors passed to several blocks are kept once).
        name: the first block's name, for messages.

    Falls back to the first block's arguments for every block (with a warning) when the model's
    forward cannot run on pass-through blocks.
    """
    try:
        recorded = _record_batches(model, blocks, batches, forward, device, rest, keep, name)
    except _BlockNotCalled as err:
        raise ValueError(f"the forward pass finished without calling block {err.args[0]} of the list that starts "
                         f"with {name}; pass blocks= the module list that the model's forward runs, or a `forward` "
                         "that calls the model.") from None
    except Exception as err:  # the model's code between blocks did not accept pass-through outputs
        warnings.warn(f"{name}: could not record every block's own arguments ({type(err).__name__}: {err}); every "
                      "block is calibrated with the first block's arguments (right when the model passes all blocks "
                      "the same masks and position encodings).", RuntimeWarning, stacklevel=2)
        return
    if len(recorded) != len(calls):
        raise ValueError(f"{name}: {len(recorded)} batches recorded for {len(calls)} calls; the calibration "
                         "batches must be the same in every pass.")
    for call, per_block in zip(calls, recorded):
        per_block[0] = None  # the first block keeps its own recorded call (with the current hidden states)
        call.per_block = per_block


def accumulate_block(
    block: nn.Module,
    calls: list[BlockCall],
    device: torch.device,
    targets: Mapping[str, nn.Module],
    make: Callable[[str], GramAccumulator],
    index: int = 0,
) -> dict[str, GramAccumulator]:
    """Run ``block`` on every call and add each target's inputs into its :class:`GramAccumulator`.

    Nothing is stored but the statistics: each batch's inputs are reduced in the forward hook, on
    the compute device, and dropped. Linears that receive the same tensor (q / k / v, gate / up)
    share one accumulator (one Gram), as the first call shows; a later call that breaks the sharing
    raises :class:`~robop_lightning.engine.gram.StatsUnavailable`.

    Returns:
        ``{name: accumulator}`` (shared objects for linears with the same inputs).

    Raises:
        ValueError: a target was never called.
    """
    accs: dict[str, GramAccumulator] = {}
    claimed: dict[int, GramAccumulator] = {}  # first call: tensor id -> the accumulator it went into
    ids: dict[str, list[int]] = {n: [] for n in targets}
    added: set[tuple[int, int]] = set()
    alive: list[torch.Tensor] = []  # the tensors seen in this call (their ids must not be reused)
    first = [True]

    def make_hook(lname: str):
        def hook(module, args):
            x = args[0]
            key = id(x)
            ids[lname].append(key)
            acc = accs.get(lname)
            if acc is None:
                acc = claimed.get(key) if first[0] else None
                if acc is None:
                    acc = make(lname)
                    if first[0]:
                        claimed[key] = acc
                accs[lname] = acc
            if (id(acc), key) not in added:
                added.add((id(acc), key))
                alive.append(x)
                acc.add(_as_samples(x.detach()))

        return hook

    with HookOwner() as hooks:
        for lname, linear in targets.items():
            hooks.pre_hook(linear, make_hook(lname))
        for call in calls:
            args, kwargs = call.for_block(index)
            block(*move_to(args, device), **move_to(kwargs, device))
            del args, kwargs
            groups: dict[int, list[str]] = {}
            for lname, acc in accs.items():
                groups.setdefault(id(acc), []).append(lname)
            for members in groups.values():
                if any(ids[m] != ids[members[0]] for m in members[1:]):
                    raise StatsUnavailable(f"{members[0]} and {members[1]} shared their inputs in the first call only")
            for v in ids.values():
                v.clear()
            added.clear()
            alive.clear()
            claimed.clear()
            first[0] = False
    missing = [n for n in targets if n not in accs]
    if missing:
        raise ValueError(f"{missing[0]} was not called when its block ran; it cannot be calibrated.")
    return accs
