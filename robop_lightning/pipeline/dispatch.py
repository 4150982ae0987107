"""Models whose weights accelerate keeps off the device (``device_map`` with offload, ``cpu_offload``).

accelerate's ``AlignDevicesHook`` keeps each offloaded parameter on the ``meta`` device and loads it
from its ``weights_map`` (host memory or disk) to the execution device for every forward, then drops
it. Calibration forwards therefore onload one module at a time by themselves; pruning must read a
weight through the hook and write the result back into the ``weights_map``, or the next forward
would load the dense weight again. These helpers do that and do nothing for ordinary modules. accelerate
has no public way to reach an offloaded module's hook (``module._hf_hook``): that one access is in
:mod:`robop_lightning.utils.compat`.

Example:
    >>> import torch
    >>> from accelerate import cpu_offload
    >>> layer = torch.nn.Sequential(torch.nn.Linear(4, 2))
    >>> _ = cpu_offload(layer, execution_device=torch.device("cpu"))
    >>> layer[0].weight.device.type, is_offloaded(layer[0])
    ('meta', True)
    >>> write_weight(layer[0], torch.zeros(2, 4))
    >>> with materialized(layer[0]):
    ...     bias = layer[0].bias.clone()
    >>> bool((read_weight(layer[0]) == 0).all()), torch.equal(layer(torch.ones(1, 4)), bias[None])  # forwards see it
    (True, True)
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn

from robop_lightning.pipeline.targets import is_transposed
from robop_lightning.utils.compat import offload_execution_device, offload_weights_map

try:  # the `llm` extra; without accelerate no model can be dispatched by it, so nothing is offloaded
    from accelerate.utils import align_module_device, has_offloaded_params
    from accelerate.utils.offload import OffloadedWeightsLoader
except ImportError:  # pragma: no cover - exercised by the core-only import check
    align_module_device = None
    OffloadedWeightsLoader = ()

    def has_offloaded_params(module: nn.Module) -> bool:
        return False

__all__ = ["execution_device", "is_offloaded", "layer_weight", "materialized", "read_weight", "write_weight"]


def layer_weight(module: nn.Module) -> torch.Tensor:
    """``module``'s weight as ``(out_features, in_features)``: the parameter, or for GPT-2's
    ``Conv1D`` its transposed view."""
    return module.weight.T if is_transposed(module) else module.weight


def is_offloaded(module: nn.Module) -> bool:
    """Whether accelerate keeps ``module``'s own parameters off the device (loaded per forward)."""
    return has_offloaded_params(module)


def execution_device(model: nn.Module) -> torch.device | None:
    """The device accelerate runs an offloaded ``model``'s modules on (``None``: nothing offloaded)."""
    for module in model.modules():
        if has_offloaded_params(module):
            return offload_execution_device(module)
    return None


@contextlib.contextmanager
def materialized(module: nn.Module) -> Iterator[nn.Module]:
    """``module``'s parameters real on its execution device inside (offloaded or not)."""
    if align_module_device is None:
        yield module
        return
    with align_module_device(module):
        yield module


def read_weight(module: nn.Module) -> torch.Tensor:
    """``module``'s weight as ``(out, in)`` (:func:`layer_weight`), from accelerate's ``weights_map`` when offloaded."""
    if has_offloaded_params(module):
        stored = offload_weights_map(module)["weight"]
        return stored.T if is_transposed(module) else stored
    return layer_weight(module)


@torch.no_grad()
def write_weight(module: nn.Module, value: torch.Tensor) -> None:
    """Set ``module``'s weight to ``value`` (``(out, in)``) in place; for an offloaded module, in its ``weights_map``."""
    if is_transposed(module):
        value = value.T
    if not has_offloaded_params(module):
        module.weight.data.copy_(value)
        return
    weights = offload_weights_map(module)
    key = weights.prefix + "weight"
    stored = weights["weight"]
    new = value.detach().to(device=stored.device, dtype=stored.dtype).clone()
    if isinstance(weights.dataset, OffloadedWeightsLoader):  # disk: its in-memory state dict has priority
        weights.dataset.state_dict[key] = new
    else:
        weights.dataset[key] = new
