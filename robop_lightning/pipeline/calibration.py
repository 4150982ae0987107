"""Block-by-block capture of calibration activations, in plain PyTorch.

The pieces :func:`robop_lightning.pipeline.prune.prune_model` is assembled from:

* :class:`HookOwner`: the one owner of every hook registered here; leaving its ``with`` block
  removes them all, whatever happened inside.
* :func:`capture_block_inputs`: the arguments of the first block for every calibration batch, by
  the usual "Catcher" trick (a pre-hook that records ``args`` / ``kwargs`` and stops the forward).
* :func:`run_block`: run a block on the recorded calls, capturing target inputs and/or
  propagating its outputs to the next block.
* :func:`capture_linear_input`: one linear's inputs from whole-model forwards (stopped early).
* :func:`same_on_all_ranks`: under ``torch.distributed``, checks that every rank holds the same mask.

Where activations are stored (the min-max extension, structured pruning, linears outside the
blocks; the authors' sets stream Grams instead, :mod:`robop_lightning.pipeline.streaming`), they are
``(samples, tokens, in_features)``: a sample is one image or sequence,
the unit of CTE. Sequences of different lengths are zero-padded, which changes neither a Gram nor
a per-sample loss (a zero row contributes nothing to either).
"""

from __future__ import annotations

import contextlib
import functools
import inspect
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from robop_lightning.utils.offload import ActivationStore, DiskTensor, _HiddenOnDisk

__all__ = [
    "HookOwner",
    "BlockCall",
    "clean_kwargs",
    "kept",

    "capture_block_inputs",
    "capture_linear_input",
    "default_forward",
    "forward_order",
    "move_to",
    "run_block",
    "same_on_all_ranks",
]

# Keyword arguments of HF blocks that carry a KV cache: calibration runs every block several
# times, so a cache would make later runs attend to stale keys.
_CACHE_KWARGS = ("past_key_values", "past_key_value", "layer_past", "cache")  # "cache": its name in transformers 5


class _StopForward(Exception):
    """Raised by a capture hook to end a forward pass once what it needs has been recorded."""


class HookOwner:
    """Registers forward hooks and guarantees their removal when its ``with`` block ends.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> layer = nn.Linear(4, 2)
        >>> seen = []
        >>> with HookOwner() as hooks:
        ...     hooks.pre_hook(layer, lambda m, args: seen.append(args[0].shape))
        ...     _ = layer(torch.zeros(3, 4))
        >>> _ = layer(torch.zeros(1, 4))  # no hook any more
        >>> seen
        [torch.Size([3, 4])]
    """

    def __init__(self) -> None:
        self._handles: list[Any] = []

    def pre_hook(self, module: nn.Module, fn: Callable, with_kwargs: bool = False) -> None:
        """``module.register_forward_pre_hook(fn)``, removed on exit."""
        self._handles.append(module.register_forward_pre_hook(fn, with_kwargs=with_kwargs))

    def remove(self) -> None:
        """Remove every hook registered so far (safe to call twice)."""
        while self._handles:
            self._handles.pop().remove()

    def __enter__(self) -> HookOwner:
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()


# --------------------------------------------------------------------------- batches
def move_to(obj: Any, device: torch.device | str) -> Any:
    """Tensors inside (nested) tuples, lists and dicts moved to ``device``; anything else as is."""
    if isinstance(obj, torch.Tensor):
        return obj.to(device, non_blocking=False)
    if isinstance(obj, _HiddenOnDisk):  # hidden states offloaded under an activation budget
        return obj.load(device)
    if isinstance(obj, tuple) and hasattr(obj, "_fields"):  # namedtuple
        return type(obj)(*(move_to(o, device) for o in obj))
    if isinstance(obj, (tuple, list)):
        return type(obj)(move_to(o, device) for o in obj)
    if isinstance(obj, Mapping):
        try:
            return type(obj)({k: move_to(v, device) for k, v in obj.items()})
        except TypeError:
            return {k: move_to(v, device) for k, v in obj.items()}
    return obj


def default_forward(model: nn.Module, batch: Any) -> Any:
    """Run ``model`` on one calibration batch.

    A dict is passed as keyword arguments (with ``use_cache=False`` added when the model takes
    it), a tuple or list gives its first item (the input; labels are ignored), anything else is
    passed as is.
    """
    if isinstance(batch, Mapping):
        kwargs = dict(batch)
        if "use_cache" not in kwargs:
            try:
                if "use_cache" in inspect.signature(model.forward).parameters:
                    kwargs["use_cache"] = False
            except (TypeError, ValueError):
                pass
        return model(**kwargs)
    if isinstance(batch, (tuple, list)):
        if not batch:
            raise ValueError("a calibration batch is an empty tuple/list; its first item must be the model input.")
        return model(batch[0])
    return model(batch)


def _as_samples(x: torch.Tensor) -> torch.Tensor:
    """``(batch, ..., n)`` -> ``(batch, tokens, n)``; a 2-D input gives one token per sample."""
    if x.dim() == 1:
        return x.view(1, 1, -1)
    if x.dim() == 2:
        return x.unsqueeze(1)
    return x.reshape(x.shape[0], -1, x.shape[-1])


def _stack(chunks: list[torch.Tensor]) -> torch.Tensor:
    """Concatenate ``(b_i, t_i, n)`` chunks along samples, zero-padding tokens to the longest."""
    t = max(c.shape[1] for c in chunks)
    if all(c.shape[1] == t for c in chunks):
        return torch.cat(chunks)
    return torch.cat([nn.functional.pad(c, (0, 0, 0, t - c.shape[1])) for c in chunks])


# --------------------------------------------------------------------------- block calls
@dataclass
class BlockCall:
    """The arguments of the block calls for one calibration batch.

    ``slot`` is where the hidden states sit: an ``int`` index into ``args`` or a ``str`` key of
    ``kwargs``. ``args`` / ``kwargs`` are the first block's call, with the current hidden states;
    ``per_block[i]`` (when recorded) holds block ``i``'s own ``(args, kwargs)`` as the model passed
    them (rotary encodings and masks of its layer type...), with ``None`` at the slot: the walk
    gives each block the hidden states of the one before and everything else of its own.
    """

    args: tuple
    kwargs: dict
    slot: int | str = 0
    per_block: list[tuple[tuple, dict] | None] | None = None

    @property
    def hidden(self) -> torch.Tensor:
        return self.args[self.slot] if isinstance(self.slot, int) else self.kwargs[self.slot]

    def with_hidden(self, hidden: torch.Tensor) -> None:
        if isinstance(self.slot, int):
            args = list(self.args)
            args[self.slot] = hidden
            self.args = tuple(args)
        else:
            self.kwargs[self.slot] = hidden

    def for_block(self, index: int) -> tuple[tuple, dict]:
        """``(args, kwargs)`` of block ``index``: its own arguments around the current hidden states."""
        if not self.per_block or self.per_block[index] is None:
            return self.args, self.kwargs
        args, kwargs = self.per_block[index]
        if isinstance(self.slot, int):
            args = (*args[: self.slot], self.hidden, *args[self.slot + 1 :])
        else:
            kwargs = {**kwargs, self.slot: self.hidden}
        return args, kwargs


def _hidden_slot(args: tuple, kwargs: dict, name: str) -> int | str:
    if args and isinstance(args[0], torch.Tensor):
        return 0
    if isinstance(kwargs.get("hidden_states"), torch.Tensor):
        return "hidden_states"
    for key, value in kwargs.items():
        if isinstance(value, torch.Tensor) and value.is_floating_point():
            return key
    raise ValueError(f"{name} was called without a tensor input; cannot tell which argument holds the activations.")


def clean_kwargs(kwargs: Mapping[str, Any]) -> dict:
    """A block's keyword arguments without a KV cache (calibration runs every block several times)."""
    kwargs = dict(kwargs)
    for key in _CACHE_KWARGS:
        if key in kwargs:
            kwargs[key] = None
    if "use_cache" in kwargs:
        kwargs["use_cache"] = False
    return kwargs


def kept(obj: Any, keep: Callable[[torch.Tensor], Any], memo: dict[int, Any]) -> Any:
    """``obj`` with every tensor replaced by ``keep(tensor)``, once per tensor object (``memo`` by id)."""
    if isinstance(obj, torch.Tensor):
        if id(obj) not in memo:
            memo[id(obj)] = keep(obj.detach())
        return memo[id(obj)]
    if isinstance(obj, tuple) and hasattr(obj, "_fields"):
        return type(obj)(*(kept(o, keep, memo) for o in obj))
    if isinstance(obj, (tuple, list)):
        return type(obj)(kept(o, keep, memo) for o in obj)
    if isinstance(obj, Mapping):
        try:
            return type(obj)({k: kept(v, keep, memo) for k, v in obj.items()})
        except TypeError:
            return {k: kept(v, keep, memo) for k, v in obj.items()}
    return obj


def capture_block_inputs(
    model: nn.Module,
    block: nn.Module,
    batches: Iterable[Any],
    forward: Callable[[nn.Module, Any], Any],
    device: torch.device,
    storage: torch.device,
    name: str = "block",
    store: ActivationStore | None = None,
    keep: Callable[[torch.Tensor], Any] | None = None,
    keep_hidden: Callable[[torch.Tensor], Any] | None = None,
) -> list[BlockCall]:
    """Record the arguments of ``block``'s first call for every batch, stopping each forward there.

    Args:
        model: the whole model.
        block: the first block (a submodule of ``model``).
        batches: calibration batches.
        forward: ``forward(model, batch)`` runs the model on a batch (already on ``device``).
        device: where the model lives; batches are moved there.
        storage: where the recorded tensors are kept (CPU when the model is on an accelerator).
        name: the block's name in messages.
        store: an activation budget: hidden states beyond it are kept on disk.
        keep, keep_hidden: where the recorded tensors and the hidden states are kept (instead of
            ``storage`` / ``store``; :meth:`robop_lightning.pipeline.walk.BlockWalk.keep_hidden`).

    Raises:
        ValueError: a forward pass finished without calling ``block``.
    """
    calls: list[BlockCall] = []

    def catcher(module, args, kwargs):
        kwargs = clean_kwargs(kwargs)
        slot = _hidden_slot(args, kwargs, name)
        if keep is not None:
            hidden = BlockCall(args, kwargs, slot).hidden
            memo = {id(hidden): hidden}
            call = BlockCall(kept(tuple(args), keep, memo), kept(kwargs, keep, memo), slot)
            call.with_hidden(keep_hidden(hidden.detach()) if keep_hidden is not None else hidden.detach())
        else:
            call = BlockCall(move_to(tuple(args), storage), move_to(kwargs, storage), slot)
            if store is not None:
                call.with_hidden(store.keep_hidden(call.hidden))
        calls.append(call)
        raise _StopForward

    with HookOwner() as hooks:
        hooks.pre_hook(block, catcher, with_kwargs=True)
        for batch in batches:
            before = len(calls)
            with contextlib.suppress(_StopForward):
                forward(model, move_to(batch, device))
            if len(calls) == before:
                raise ValueError(
                    f"the forward pass finished without calling {name}; pass blocks= the module list that "
                    "the model's forward runs, or a `forward` that calls the model."
                )
    return calls


class _CapturedInputs:
    """The inputs of the captured linears over a block's calls, each distinct tensor stored once.

    q, k and v usually share one input: it is stored once. Within a call the input itself is kept
    in the cache so that its id cannot be reused by another tensor; :meth:`end_call` drops it.
    """

    def __init__(self, names: Iterable[str], storage: torch.device, store: ActivationStore | None) -> None:
        self.seen: dict[str, list[torch.Tensor]] = {n: [] for n in names}
        self.cache: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self.storage, self.store = storage, store

    def hook(self, lname: str) -> Callable:
        """The forward pre-hook that records ``lname``'s input."""
        return functools.partial(self._record, lname)

    def _record(self, lname: str, module: nn.Module, args: tuple) -> None:
        x = args[0]
        if id(x) not in self.cache:
            xs = _as_samples(x.detach())
            stored = xs.to(self.storage, copy=True) if self.store is None else self.store.keep_captured(xs)
            self.cache[id(x)] = (x, stored)
        self.seen[lname].append(self.cache[id(x)][1])

    def end_call(self) -> None:
        self.cache.clear()

    def stacked(self) -> dict[str, torch.Tensor | DiskTensor]:
        """``{name: (samples, tokens, in_features)}``; linears that saw the same inputs get the same
        tensor object (one copy in memory, and prune_model computes its Gram once for all of them)."""
        missing = [n for n, xs in self.seen.items() if not xs]
        if missing:
            raise ValueError(f"{missing[0]} was not called when its block ran; it cannot be calibrated.")
        stacked: dict[tuple[int, ...], torch.Tensor | DiskTensor] = {}
        out: dict[str, torch.Tensor | DiskTensor] = {}
        for n, xs in self.seen.items():
            key = tuple(id(x) for x in xs)
            if key not in stacked:
                combined = self.store.combine(xs) if self.store is not None else None
                stacked[key] = combined if combined is not None else (xs[0] if len(xs) == 1 else _stack(xs))
            out[n] = stacked[key]
        return out


def _propagate(call: BlockCall, out: Any, storage: torch.device, store: ActivationStore | None,
               keep_hidden: Callable[[torch.Tensor], Any] | None) -> None:
    """Replace ``call``'s hidden states by the block's output ``out`` (its first item when a tuple)."""
    if isinstance(out, (tuple, list)):
        out = out[0]
    if not isinstance(out, torch.Tensor):
        raise ValueError(
            f"a block returned {type(out).__name__}; blocks must return their hidden states "
            "(a tensor, or a tuple whose first item is the tensor)."
        )
    if keep_hidden is not None:
        call.with_hidden(keep_hidden(out.detach()))
    else:
        call.with_hidden(out.detach().to(storage) if store is None else store.keep_hidden(out))


def run_block(
    block: nn.Module,
    calls: list[BlockCall],
    device: torch.device,
    storage: torch.device,
    capture: Mapping[str, nn.Linear] | None = None,
    propagate: bool = True,
    store: ActivationStore | None = None,
    index: int = 0,
    keep_hidden: Callable[[torch.Tensor], Any] | None = None,
    structure: list | None = None,
) -> dict[str, torch.Tensor | DiskTensor]:
    """Run ``block`` on every recorded call; capture inputs of ``capture`` and/or propagate.

    Args:
        block: the block.
        calls: its recorded calls; with ``propagate`` their hidden states are replaced by the
            block's outputs (the first element when the block returns a tuple).
        device: where the block runs.
        storage: where captured and propagated activations are kept.
        capture: ``{name: linear}`` whose inputs are recorded.
        propagate: replace each call's hidden states by the block's output.
        store: an activation budget: captured inputs and hidden states beyond it go to disk
            (a captured input is then returned as a :class:`~robop_lightning.utils.offload.DiskTensor`).
        index: the block's position (each block gets its own recorded arguments, :meth:`BlockCall.for_block`).
        keep_hidden: where a propagated hidden state is kept (``None``: ``storage``, or ``store``).
        structure: an empty list gets what the block returns besides the hidden states: ``None``
            for a tensor, else the rest of its first output tuple (for pass-through recording).

    Returns:
        ``{name: (samples, tokens, in_features)}`` for every linear in ``capture``.
    """
    capture = dict(capture or {})
    inputs = _CapturedInputs(capture, storage, store)
    if store is not None:
        store.reset("captured" if capture else "hidden")
        if capture and propagate:
            store.reset("hidden")
    with HookOwner() as hooks:
        for lname, linear in capture.items():
            hooks.pre_hook(linear, inputs.hook(lname))
        for call in calls:
            args, kwargs = call.for_block(index)
            out = block(*move_to(args, device), **move_to(kwargs, device))
            del args, kwargs
            inputs.end_call()
            if structure is not None and not structure:
                structure.append(tuple(out[1:]) if isinstance(out, (tuple, list)) else None)
            if propagate:
                _propagate(call, out, storage, store, keep_hidden)
    return inputs.stacked()


def capture_linear_input(
    model: nn.Module,
    linear: nn.Linear,
    batches: Iterable[Any],
    forward: Callable[[nn.Module, Any], Any],
    device: torch.device,
    storage: torch.device,
    name: str = "layer",
    store: ActivationStore | None = None,
) -> torch.Tensor | DiskTensor:
    """Inputs of one linear over all batches, each forward stopped right after its first call.

    With ``store`` (an activation budget) the inputs beyond the budget are kept on disk.

    Raises:
        ValueError: a forward pass finished without calling ``linear``.
    """
    chunks: list[torch.Tensor] = []

    def hook(module, args):
        xs = _as_samples(args[0].detach())
        chunks.append(xs.to(storage, copy=True) if store is None else store.keep_captured(xs))
        raise _StopForward

    if store is not None:
        store.reset("captured")
    with HookOwner() as hooks:
        hooks.pre_hook(linear, hook)
        for batch in batches:
            before = len(chunks)
            with contextlib.suppress(_StopForward):
                forward(model, move_to(batch, device))
            if len(chunks) == before:
                raise ValueError(f"{name} was not called by the model's forward; it cannot be calibrated.")
    return (store.combine(chunks) if store is not None else None) or _stack(chunks)


def forward_order(
    model: nn.Module,
    modules: Mapping[str, nn.Module],
    batch: Any,
    forward: Callable[[nn.Module, Any], Any],
    device: torch.device,
) -> list[str]:
    """Names of ``modules`` in the order of their first call during one forward pass.

    Raises:
        ValueError: one of them is never called.
    """
    order: list[str] = []

    def make_hook(mname: str):
        def hook(module, args):
            if mname not in order:
                order.append(mname)

        return hook

    with HookOwner() as hooks:
        for mname, module in modules.items():
            hooks.pre_hook(module, make_hook(mname))
        forward(model, move_to(batch, device))
    missing = [n for n in modules if n not in order]
    if missing:
        raise ValueError(f"{missing[0]} is never called by the model's forward; it cannot be calibrated.")
    return order


# --------------------------------------------------------------------------- distributed
def _distributed() -> bool:
    return (
        torch.distributed.is_available()
        and torch.distributed.is_initialized()
        and torch.distributed.get_world_size() > 1
    )


def same_on_all_ranks(mask: torch.Tensor) -> bool:
    """Whether ``mask`` is bit-identical on every rank (always true without a process group).

    Rank 0's mask is broadcast and compared; the verdict is reduced so every rank returns the same.
    """
    if not _distributed():
        return True
    dist = torch.distributed
    comm = mask.device if dist.get_backend() == "nccl" else torch.device("cpu")
    ref = mask.to(device=comm, dtype=torch.uint8).clone()
    dist.broadcast(ref, src=0)
    differs = torch.tensor([0 if torch.equal(ref, mask.to(device=comm, dtype=torch.uint8)) else 1], device=comm)
    dist.all_reduce(differs)
    return int(differs.item()) == 0
