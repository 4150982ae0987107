"""Block-by-block capture of calibration activations (SPEC §5), in plain PyTorch.

The pieces :func:`robop_lightning.model.prune_model` is assembled from:

* :func:`find_blocks`: the repeated blocks of a model (timm ``blocks``, Hugging Face
  ``model.layers``, any ``nn.ModuleList`` / ``nn.Sequential`` of two or more blocks of one class);
  ``None`` when the model has none (then linears are pruned one by one, in forward order).
* :func:`resolve_targets`: which ``nn.Linear`` are pruned, from names and ``"re:<regex>"``
  patterns; output heads stay dense unless named explicitly.
* :class:`HookOwner`: the one owner of every hook registered here; leaving its ``with`` block
  removes them all, whatever happened inside.
* :func:`capture_block_inputs`: the arguments of the first block for every calibration batch, by
  the usual "Catcher" trick (a pre-hook that records ``args`` / ``kwargs`` and stops the forward).
* :func:`run_block`: run a block on the recorded calls, capturing target inputs and/or
  propagating its outputs to the next block.
* :func:`capture_linear_input`: one linear's inputs from whole-model forwards (stopped early).
* :func:`same_on_all_ranks`: under ``torch.distributed``, checks that every rank holds the same mask.

Activations are stored as ``(samples, tokens, in_features)``: a sample is one image or sequence,
the unit of CTE. Sequences of different lengths are zero-padded, which changes neither a Gram nor
a per-sample loss (a zero row contributes nothing to either).
"""

from __future__ import annotations

import contextlib
import inspect
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from robop_lightning.offload import ActivationStore, DiskTensor, _HiddenOnDisk

__all__ = [
    "HookOwner",
    "BlockCall",
    "capture_block_inputs",
    "capture_linear_input",
    "default_forward",
    "find_blocks",
    "forward_order",
    "is_head",
    "move_to",
    "resolve_targets",
    "run_block",
    "same_on_all_ranks",
]

# Path components that mark an output head (timm head / head_dist, HF lm_head / classifier /
# score). A linear whose own name is ``fc`` (torchvision and timm ResNets) is a head too.
_HEAD_NAMES = frozenset({"head", "head_dist", "lm_head", "classifier", "score"})
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


# --------------------------------------------------------------------------- structure
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
    """The arguments of one block call for one calibration batch.

    ``slot`` is where the hidden states sit: an ``int`` index into ``args`` or a ``str`` key of
    ``kwargs``. Everything else (attention masks, position embeddings) is replayed unchanged.
    """

    args: tuple
    kwargs: dict
    slot: int | str = 0

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


def _hidden_slot(args: tuple, kwargs: dict, name: str) -> int | str:
    if args and isinstance(args[0], torch.Tensor):
        return 0
    if isinstance(kwargs.get("hidden_states"), torch.Tensor):
        return "hidden_states"
    for key, value in kwargs.items():
        if isinstance(value, torch.Tensor) and value.is_floating_point():
            return key
    raise ValueError(f"{name} was called without a tensor input; cannot tell which argument holds the activations.")


def capture_block_inputs(
    model: nn.Module,
    block: nn.Module,
    batches: Iterable[Any],
    forward: Callable[[nn.Module, Any], Any],
    device: torch.device,
    storage: torch.device,
    name: str = "block",
    store: ActivationStore | None = None,
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

    Raises:
        ValueError: a forward pass finished without calling ``block``.
    """
    calls: list[BlockCall] = []

    def catcher(module, args, kwargs):
        kwargs = dict(kwargs)
        for key in _CACHE_KWARGS:
            if key in kwargs:
                kwargs[key] = None
        if "use_cache" in kwargs:
            kwargs["use_cache"] = False
        slot = _hidden_slot(args, kwargs, name)
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


def run_block(
    block: nn.Module,
    calls: list[BlockCall],
    device: torch.device,
    storage: torch.device,
    capture: Mapping[str, nn.Linear] | None = None,
    propagate: bool = True,
    store: ActivationStore | None = None,
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
            (a captured input is then returned as a :class:`~robop_lightning.offload.DiskTensor`).

    Returns:
        ``{name: (samples, tokens, in_features)}`` for every linear in ``capture``.
    """
    capture = dict(capture or {})
    seen: dict[str, list[torch.Tensor]] = {n: [] for n in capture}
    # q, k and v usually share one input: store it once. The input itself is kept in the cache
    # so that its id cannot be reused by another tensor during the same block call.
    cache: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def make_hook(lname: str):
        def hook(module, args):
            x = args[0]
            if id(x) not in cache:
                xs = _as_samples(x.detach())
                cache[id(x)] = (x, xs.to(storage, copy=True) if store is None else store.keep_captured(xs))
            seen[lname].append(cache[id(x)][1])

        return hook

    if store is not None:
        store.reset("captured" if capture else "hidden")
        if capture and propagate:
            store.reset("hidden")
    with HookOwner() as hooks:
        for lname, linear in capture.items():
            hooks.pre_hook(linear, make_hook(lname))
        for call in calls:
            out = block(*move_to(call.args, device), **move_to(call.kwargs, device))
            cache.clear()
            if propagate:
                if isinstance(out, (tuple, list)):
                    out = out[0]
                if not isinstance(out, torch.Tensor):
                    raise ValueError(
                        f"a block returned {type(out).__name__}; blocks must return their hidden states "
                        "(a tensor, or a tuple whose first item is the tensor)."
                    )
                call.with_hidden(out.detach().to(storage) if store is None else store.keep_hidden(out))
    missing = [n for n, xs in seen.items() if not xs]
    if missing:
        raise ValueError(f"{missing[0]} was not called when its block ran; it cannot be calibrated.")
    # linears that saw the same inputs get the same tensor object (one copy in memory, and
    # prune_model computes its Gram once for all of them)
    stacked: dict[tuple[int, ...], torch.Tensor | DiskTensor] = {}
    out: dict[str, torch.Tensor | DiskTensor] = {}
    for n, xs in seen.items():
        key = tuple(id(x) for x in xs)
        if key not in stacked:
            combined = store.combine(xs) if store is not None else None
            stacked[key] = combined if combined is not None else (xs[0] if len(xs) == 1 else _stack(xs))
        out[n] = stacked[key]
    return out


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
