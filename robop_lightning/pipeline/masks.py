"""Holding pruned weights at exactly zero while a model is fine-tuned.

Design. The weights stay ordinary ``nn.Parameter`` tensors with exact zeros: nothing about the
model's structure changes, so ``state_dict()`` has the stock keys and dense shapes, and a
checkpoint loads strictly into the unmodified model class (zeros included). The masks live
outside the model, in a :class:`SparsityMasks` (the Lightning callback keeps them in its own
checkpoint state). Two kinds of hooks, owned and removed by the same object, keep the zeros:

* an optimizer **step post-hook** (``optimizer.register_step_post_hook``) re-zeroes every masked
  weight right after each ``optimizer.step()``. It runs inside ``step`` itself, so no trainer
  logic can skip it and no code observes the weights between the update and the re-zeroing; it
  covers momentum, Adam moments and AdamW's decoupled weight decay, whatever the optimizer does.
  A step skipped by an AMP grad scaler (inf gradients) leaves the weights untouched, so zero.
* a **post-accumulate-grad hook** on every masked parameter zeroes the pruned entries of
  ``.grad`` after each backward, so gradient accumulation never sums them, gradient clipping
  computes its norm over the kept weights only, and optimizer moments of pruned entries stay 0.

Sharded models. Under FSDP2 (``fully_shard``) a weight is a DTensor and its mask becomes a DTensor
with the same mesh and placements. Under FSDP1 (``FullyShardedDataParallel(use_orig_params=True)``,
Lightning's ``FSDPStrategy``) a weight is, between forwards, a 1-D view of the part of its flattened
entries this rank holds (possibly none); its mask becomes the same slice of the flattened mask.
FSDP1 assigns ``.grad`` itself after its reduce-scatter, so no per-parameter gradient hook fires:
call :meth:`SparsityMasks.mask_gradients` before each ``optimizer.step()`` (``RobOPCallback`` does, in
``on_before_optimizer_step``). Module names may include FSDP1's ``_fsdp_wrapped_module`` and
activation checkpointing's ``_checkpoint_wrapped_module``: they are matched without them. (FSDP1 has
no public accessor for a rank's slice of a weight, nor torch for the wrappers' attribute names: both
are read in :mod:`robop_lightning.utils.compat`.)

``torch.nn.utils.parametrize`` was the alternative; it renames the parameters
(``weight`` -> ``parametrizations.weight.original``) so checkpoints would need rewriting to load
into the stock class, and every forward would pay for a mask multiplication.

Example:
    >>> import torch
    >>> from torch import nn
    >>> layer = nn.Linear(4, 2)
    >>> model = nn.Sequential(layer)
    >>> masks = SparsityMasks({"0": torch.tensor([[1, 0, 1, 0], [0, 1, 0, 1]], dtype=torch.bool)})
    >>> opt = torch.optim.AdamW(model.parameters(), lr=0.1, weight_decay=0.1)
    >>> masks.attach(model, [opt])
    >>> for _ in range(3):
    ...     model(torch.randn(8, 4)).pow(2).sum().backward()
    ...     opt.step()
    ...     opt.zero_grad()
    >>> bool((layer.weight[~masks["0"]] == 0).all())
    True
    >>> masks.detach()
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import torch
from torch import nn
from torch.distributed.fsdp import FullyShardedDataParallel
from torch.distributed.tensor import DTensor, distribute_tensor

from robop_lightning.utils.compat import fsdp1_shard_ranges, unwrapped_name

__all__ = ["SparsityMasks"]

_BITS = torch.tensor([1, 2, 4, 8, 16, 32, 64, 128], dtype=torch.int32)


def _pack(mask: torch.Tensor) -> torch.Tensor:
    """A bool tensor as uint8, 8 entries per byte (little-endian bit order)."""
    flat = mask.detach().reshape(-1).to("cpu", torch.int32)
    flat = torch.nn.functional.pad(flat, (0, (-flat.numel()) % 8))
    return (flat.view(-1, 8) * _BITS).sum(1).to(torch.uint8)


def _like(mask: torch.Tensor, param: torch.Tensor) -> torch.Tensor:
    """``mask`` placed like ``param``: on its device, or, for a sharded DTensor parameter (FSDP2's
    ``fully_shard``), a DTensor with the same mesh and placements (each rank keeps its own shard)."""
    if isinstance(param, DTensor):
        local = mask.to(param.device_mesh.device_type)
        return distribute_tensor(local, param.device_mesh, param.placements, src_data_rank=None)
    return mask.to(param.device)


def _submodule(model: nn.Module, name: str) -> nn.Module:
    """``model.get_submodule(name)``, also when wrappers (FSDP1, activation checkpointing,
    ``torch.compile``) sit between the modules of ``name``."""
    try:
        return model.get_submodule(name)
    except AttributeError:
        for full, module in model.named_modules():
            if unwrapped_name(full) == name:
                return module
        raise


def _unpack(bits: torch.Tensor, shape: Iterable[int]) -> torch.Tensor:
    """Inverse of :func:`_pack`."""
    shape = tuple(int(d) for d in shape)
    numel = 1
    for d in shape:
        numel *= d
    flat = (bits.to(torch.int32).unsqueeze(1) & _BITS).ne(0).reshape(-1)
    return flat[:numel].reshape(shape).clone()


class SparsityMasks:
    """Keep-masks of pruned linear layers, and the hooks that keep pruned weights at zero.

    Args:
        masks: ``{linear module name: bool keep-mask}`` (``True`` = kept), shaped like the
            weight. Names are relative to the model later passed to :meth:`attach`.

    Raises:
        ValueError: a mask is not a boolean 2-D tensor.
    """

    def __init__(self, masks: Mapping[str, torch.Tensor]) -> None:
        self._masks: dict[str, torch.Tensor] = {}
        for name, mask in masks.items():
            if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool or mask.dim() != 2:
                raise ValueError(f"the mask of {name} must be a 2-D bool tensor (True = kept), got {mask!r:.60}.")
            self._masks[name] = mask.detach().to("cpu", copy=True)
        self._params: dict[str, nn.Parameter] = {}
        self._pruned: dict[str, torch.Tensor] = {}  # ~mask on the parameter's device
        self._handles: list = []
        self._optimizers: set[int] = set()

    # ------------------------------------------------------------------ mapping
    def __getitem__(self, name: str) -> torch.Tensor:
        return self._masks[name]

    def __contains__(self, name: object) -> bool:
        return name in self._masks

    def __iter__(self) -> Iterator[str]:
        return iter(self._masks)

    def __len__(self) -> int:
        return len(self._masks)

    def items(self):
        return self._masks.items()

    @property
    def attached(self) -> bool:
        """Whether the masks are currently bound to a model's parameters."""
        return bool(self._params)

    def sparsity(self) -> float:
        """Fraction of masked-out entries over all masked weights."""
        total = sum(m.numel() for m in self._masks.values())
        kept = sum(int(m.sum()) for m in self._masks.values())
        return 1.0 - kept / total if total else 0.0

    def to_dict(self) -> dict[str, torch.Tensor]:
        """``{name: bool mask}`` on CPU (copies)."""
        return {n: m.clone() for n, m in self._masks.items()}

    def state_dict(self) -> dict[str, dict[str, Any]]:
        """Compact form for checkpoints: ``{name: {"shape": [m, n], "bits": uint8 tensor}}``.

        Masks are bit-packed (8 per byte), so a checkpoint grows by 1/32 of the float32 weights.
        """
        return {n: {"shape": list(m.shape), "bits": _pack(m)} for n, m in self._masks.items()}

    def digest(self) -> str:
        """SHA-256 of the names, shapes and bits of every mask: equal digests, identical masks."""
        h = hashlib.sha256()
        for name, mask in sorted(self._masks.items()):
            h.update(f"{name}:{tuple(mask.shape)};".encode())
            h.update(_pack(mask).numpy().tobytes())
        return h.hexdigest()

    @classmethod
    def from_state_dict(cls, state: Mapping[str, Mapping[str, Any]]) -> SparsityMasks:
        """Inverse of :meth:`state_dict`."""
        return cls({n: _unpack(s["bits"], s["shape"]) for n, s in state.items()})

    # ------------------------------------------------------------------ hooks
    def attach(self, model: nn.Module, optimizers: Iterable[torch.optim.Optimizer] = ()) -> None:
        """Zero the pruned weights of ``model`` and keep them at zero from now on.

        Registers one post-accumulate-grad hook per masked weight (none for FSDP1's sharded
        views, whose gradients :meth:`mask_gradients` masks) and a step post-hook on each
        optimizer (see :meth:`add_optimizer`). Attaching again first detaches. Under FSDP1 pass
        the FSDP root (Lightning's ``trainer.strategy.model``), which owns every shard.

        Raises:
            ValueError: a name is not a module of ``model`` with a ``weight`` of the mask's shape.
        """
        self.detach()
        shards = fsdp1_shard_ranges(model)
        for name, mask in self._masks.items():
            try:
                param = _submodule(model, name).weight
            except AttributeError:
                raise ValueError(f"{name} (masked) is not a module with a weight in {type(model).__name__}.") from None
            shard = shards.get(id(param))
            if shard is not None and tuple(param.shape) != tuple(mask.shape):  # FSDP1: a 1-D slice
                start, stop = shard
                if param.numel() != stop - start or stop > mask.numel():
                    raise ValueError(f"the FSDP shard of {name} does not match its mask of shape {tuple(mask.shape)}.")
                self._params[name] = param
                self._pruned[name] = (~mask).reshape(-1)[start:stop].reshape(param.shape).to(param.device)
                continue  # FSDP1 sets .grad itself: mask_gradients() masks it
            if tuple(param.shape) != tuple(mask.shape):
                raise ValueError(
                    f"the mask of {name} has shape {tuple(mask.shape)} but the weight has {tuple(param.shape)}; "
                    "the masks belong to a different model."
                )
            self._params[name] = param
            self._pruned[name] = _like(~mask, param)
            if param.requires_grad:
                self._handles.append(param.register_post_accumulate_grad_hook(self._grad_hook(name)))
        self.apply()
        for optimizer in optimizers:
            self.add_optimizer(optimizer)

    def add_optimizer(self, optimizer: torch.optim.Optimizer) -> None:
        """Re-zero masked weights after every ``optimizer.step()``; zero its state for pruned entries.

        Adding the same optimizer twice is a no-op.
        """
        if id(optimizer) in self._optimizers:
            return
        self._optimizers.add(id(optimizer))
        self._handles.append(optimizer.register_step_post_hook(lambda *_: self.apply()))
        with torch.no_grad():
            for name, param in self._params.items():
                for value in optimizer.state.get(param, {}).values():
                    if isinstance(value, torch.Tensor) and value.shape == param.shape:
                        pruned = self._pruned[name]
                        value.masked_fill_(pruned if isinstance(value, DTensor) else pruned.to(value.device), 0)

    def detach(self) -> None:
        """Remove every hook; the weights keep their current values."""
        while self._handles:
            self._handles.pop().remove()
        self._params.clear()
        self._pruned.clear()
        self._optimizers.clear()

    def _grad_hook(self, name: str):
        def hook(param: torch.Tensor) -> None:
            if param.grad is not None:
                param.grad.masked_fill_(self._pruned[name], 0)

        return hook

    # ------------------------------------------------------------------ zeroing
    @torch.no_grad()
    def apply(self) -> None:
        """Set the pruned entries of every attached weight to exactly zero."""
        for name, param in self._params.items():
            param.masked_fill_(self._pruned[name], 0)

    @torch.no_grad()
    def mask_gradients(self) -> None:
        """Zero the pruned entries of every attached weight's ``.grad`` (before clipping)."""
        for name, param in self._params.items():
            if param.grad is not None:
                param.grad.masked_fill_(self._pruned[name], 0)

    def holds(self, model: nn.Module) -> bool:
        """Whether every pruned entry of ``model``'s masked weights is exactly zero (whole weights are
        gathered from FSDP1 / FSDP2 shards to check: a collective, so call it on every rank, and
        under FSDP1 with the FSDP root)."""
        if FullyShardedDataParallel.fsdp_modules(model):
            with FullyShardedDataParallel.summon_full_params(model, writeback=False):
                return self._holds(model)
        return self._holds(model)

    def _holds(self, model: nn.Module) -> bool:
        for name, mask in self._masks.items():
            weight = _submodule(model, name).weight.detach()
            if isinstance(weight, DTensor):
                weight = weight.full_tensor()
            if bool((weight[~mask.to(weight.device)] != 0).any()):
                return False
        return True
