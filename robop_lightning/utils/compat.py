"""Every use of a private name of torch (FSDP, pytree) or accelerate, in one place.

The rest of the package uses these libraries through their public APIs only. Where no public way
exists, the access lives here, as a small function that says which library version it was written
against and why nothing public does the job; ``tests/utils/test_compat.py`` exercises each one
against the installed library and fails with a message naming the private name that changed.

Nothing here imports Lightning or accelerate (the pruning chain imports this module and must not
need them); each function takes the library's objects as arguments.

Example:
    >>> import torch
    >>> unwrapped_name("model._fsdp_wrapped_module.layers.0._checkpoint_wrapped_module.mlp")
    'model.layers.0.mlp'
    >>> fsdp1_shard_ranges(torch.nn.Linear(2, 2))  # no FSDP1 unit: nothing sharded
    {}
    >>> tree_map(lambda x: x.shape[0], {"x": torch.zeros(3, 2), "y": (torch.zeros(3),)})
    {'x': 3, 'y': (3,)}
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch.distributed.fsdp import FullyShardedDataParallel
from torch.utils import _pytree

__all__ = [
    "WRAPPER_ATTRIBUTES",
    "fsdp1_shard_ranges",
    "offload_execution_device",
    "offload_weights_map",
    "tree_leaves",
    "tree_map",
    "unwrapped_name",
]

# ---------------------------------------------------------------------------------------- Lightning


# -------------------------------------------------------------------------------------- torch FSDP1


def fsdp1_shard_ranges(model: nn.Module) -> dict[int, tuple[int, int]]:
    """``{id(original parameter): (start, stop)}``: the entries of each parameter's flattened
    weight that this rank holds under FSDP1 (``FullyShardedDataParallel(use_orig_params=True)``,
    Lightning's ``FSDPStrategy``); ``(0, 0)`` where it holds none. ``{}`` without FSDP1 units.

    Written against torch 2.14 (``torch.distributed.fsdp._flat_param``): each FSDP1 unit's
    ``_flat_param`` (a ``FlatParameter``) lists its original parameters in ``_params`` and this
    rank's part of each in ``_shard_param_infos`` (``in_shard``, ``intra_param_start_idx``,
    ``intra_param_end_idx`` inclusive). FSDP1 has no public accessor for a rank's slice of an
    original parameter (``FlatParamHandle.shard_metadata()`` is public but the handle is not), and
    with ``use_orig_params=True`` each parameter is just a 1-D view of that slice.

    Raises:
        ValueError: a unit without ``use_orig_params=True`` (no original parameters to map to).
    """
    ranges: dict[int, tuple[int, int]] = {}
    for unit in FullyShardedDataParallel.fsdp_modules(model):
        flat = getattr(unit, "_flat_param", None)
        if flat is None:  # a unit that manages no parameters
            continue
        params, infos = getattr(flat, "_params", None), getattr(flat, "_shard_param_infos", None)
        if params is None or infos is None:
            raise ValueError(
                "RobOP masks need FullyShardedDataParallel(use_orig_params=True) (Lightning's FSDPStrategy default): "
                "with flat parameters only, the pruned entries of a weight cannot be found."
            )
        for param, info in zip(params, infos, strict=True):
            ranges[id(param)] = (info.intra_param_start_idx, info.intra_param_end_idx + 1) if info.in_shard else (0, 0)
    return ranges


# module attributes that wrappers insert between a model's modules: FSDP1's FullyShardedDataParallel,
# activation checkpointing's CheckpointWrapper, and torch.compile's OptimizedModule
WRAPPER_ATTRIBUTES = frozenset({"_fsdp_wrapped_module", "_checkpoint_wrapped_module", "_orig_mod"})


def unwrapped_name(name: str) -> str:
    """A module name of a wrapped model with the wrappers' own attributes removed (the name the
    module had before wrapping): ``"_fsdp_wrapped_module.layers.0"`` -> ``"layers.0"``.

    Written against torch 2.14: the attribute names are private constants
    (``torch.distributed.fsdp._common_utils.FSDP_WRAPPED_MODULE``,
    ``torch.distributed.algorithms._checkpoint.checkpoint_wrapper._CHECKPOINT_WRAPPED_MODULE``, and
    ``OptimizedModule._orig_mod``). FSDP1 and the checkpoint wrapper clean them out of
    ``named_parameters`` but not out of ``named_modules``, which is what masks of modules need.
    """
    return ".".join(part for part in name.split(".") if part not in WRAPPER_ATTRIBUTES)


# ------------------------------------------------------------------------------------- torch pytree


def tree_leaves(tree: Any) -> list[Any]:
    """The leaves of a nested batch (tensors and other values in tuples, lists, dicts, named
    tuples...), in the order ``torch.func.vmap`` flattens it.

    Written against torch 2.14 (``torch.utils._pytree.tree_leaves``): torch has no public pytree
    module (no ``torch.utils.pytree``), and per-sample gradients must see a batch exactly as
    ``vmap`` does: its ``in_dims`` is a tree of the batch's own structure, matched node by node
    against torch's pytree (types registered with it, such as Hugging Face model outputs, included).
    No public helper of torch or another library (``lightning_utilities``' ``apply_to_collection``)
    guarantees the same nodes.
    """
    return _pytree.tree_leaves(tree)


def tree_map(fn: Callable[[Any], Any], tree: Any) -> Any:
    """``tree`` with every leaf replaced by ``fn(leaf)``, by torch's pytree (the structure ``vmap``
    matches ``in_dims`` against).

    Written against torch 2.14 (``torch.utils._pytree.tree_map``): no public equivalent, as for
    :func:`tree_leaves`.
    """
    return _pytree.tree_map(fn, tree)


# --------------------------------------------------------------------------------------- accelerate


def _align_devices_hook(module: nn.Module) -> Any:
    hook = getattr(module, "_hf_hook", None)
    if hook is None:
        raise ValueError(f"{type(module).__name__} has no accelerate hook (_hf_hook): it is not offloaded.")
    return hook


def offload_execution_device(module: nn.Module) -> torch.device:
    """The device accelerate onloads an offloaded ``module``'s parameters to for each forward.

    Written against accelerate 1.16: ``AlignDevicesHook.execution_device`` is public, but the hook
    is reached only as the private ``module._hf_hook`` (``accelerate.utils.has_offloaded_params``
    reads it the same way); ``align_module_device`` would onload the weights just to learn the device.
    Call it for modules where ``has_offloaded_params(module)`` is true.
    """
    return torch.device(_align_devices_hook(module).execution_device)


def offload_weights_map(module: nn.Module) -> Any:
    """The ``weights_map`` accelerate loads an offloaded ``module``'s parameters from (a
    ``PrefixedDataset`` over host memory or an ``OffloadedWeightsLoader`` on disk).

    Written against accelerate 1.16: accelerate has no public function that reads or replaces an
    offloaded parameter in place (``align_module_device`` gives a copy on the device for the duration
    of a ``with``, and what is written to it is dropped afterwards), so pruning writes its result into
    ``module._hf_hook.weights_map``. Call it for modules where ``has_offloaded_params(module)`` is true.
    """
    return _align_devices_hook(module).weights_map
