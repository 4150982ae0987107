"""Calibration activations within a memory budget: what does not fit is kept on disk.

``prune_model(..., activation_budget="2GB")`` holds at most about that many bytes of calibration
activations in memory: the hidden states of the calibration batches between blocks get half of
the budget, the inputs captured for the current block's linears the other half; whatever would
exceed its half is written to a temporary directory, one ``torch.save`` file per batch, and read
back a few samples at a time. The activations are the same values as in memory; the Grams are
summed over more, smaller chunks (sized to the budget), so results equal the in-memory ones up to
float64 summation order (a few ulps of the Gram), and are themselves deterministic.

A :class:`DiskTensor` stands in for a ``(samples, tokens, features)`` tensor: ``x[a:b]`` is a lazy
view, ``x.to(...)`` reads it (zero-padding shorter sequences, as in memory), and
:class:`robop_lightning.engine.gram.LayerInputs` reduces it to Grams chunk by chunk with chunks sized to
the budget.

The original weights of the layers pruned so far are kept by a :class:`WeightUndo` (in host
memory within a budget, in temporary files past it), so that a failed or interrupted run can put
the model back exactly.

Not covered by the budget: the model itself, one calibration batch in flight, and the Grams of
the layer being pruned (``in_features**2`` float64 each, one layer at a time).
"""

from __future__ import annotations

import re
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from robop_lightning.utils.memory import available_host_bytes

__all__ = ["ActivationStore", "DiskTensor", "WeightUndo", "parse_bytes"]

_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def parse_bytes(value: int | str | None, what: str = "activation_budget") -> int | None:
    """``2_000_000``, ``"512MB"``, ``"2GiB"`` -> bytes; ``None`` stays ``None``.

    Raises:
        ValueError: not a positive size.
    """
    if value is None:
        return None
    if isinstance(value, bool):
        raise ValueError(f"{what} must be a number of bytes or a size such as '2GB', got {value!r}.")
    if isinstance(value, (int, float)) and value > 0:
        return int(value)
    if isinstance(value, str):
        m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", value)
        if m and m.group(2).lower() in _UNITS and float(m.group(1)) > 0:
            return int(float(m.group(1)) * _UNITS[m.group(2).lower()])
    raise ValueError(
        f"{what} must be a positive number of bytes or a size such as '512MB' or '2GiB', got {value!r}."
    )


@dataclass
class _Chunk:
    path: Path | torch.Tensor  # a file, or the tensor itself when it stayed in memory
    samples: int
    tokens: int
    features: int
    dtype: torch.dtype


_LAST: list = [None, None]  # the last chunk file read: Grams read a file a few samples at a time


def _read(path: Path) -> torch.Tensor:
    if _LAST[0] != path:
        _LAST[:] = [None, None]  # drop the old one first: one chunk in memory at a time
        _LAST[:] = [path, torch.load(path, weights_only=True)]
    return _LAST[1]


class DiskTensor:
    """A read-only ``(samples, tokens, features)`` tensor kept on disk, one file per chunk.

    Only what :class:`~robop_lightning.engine.gram.LayerInputs` and ``prune_model`` use is supported:
    ``shape``, ``dtype``, ``device``, ``dim()``, ``is_floating_point()``, slicing samples with
    ``x[a:b]`` (lazy) and ``to(device, dtype)`` (reads the rows).
    """

    def __init__(self, chunks: list[_Chunk], features: int, dtype: torch.dtype, chunk_elements: int,
                 start: int = 0, stop: int | None = None) -> None:
        self._chunks = chunks
        self._features = features
        self.dtype = dtype
        self.chunk_elements = chunk_elements  # read by LayerInputs to size its Gram chunks
        total = sum(c.samples for c in chunks)
        self._start, self._stop = start, total if stop is None else stop
        self._tokens = max((c.tokens for c in chunks), default=0)

    @property
    def shape(self) -> torch.Size:
        return torch.Size((self._stop - self._start, self._tokens, self._features))

    @property
    def device(self) -> torch.device:
        return torch.device("cpu")

    def dim(self) -> int:
        return 3

    def is_floating_point(self) -> bool:
        return self.dtype.is_floating_point

    def __len__(self) -> int:
        return self._stop - self._start

    def __bool__(self) -> bool:
        return True

    def __getitem__(self, index: slice) -> DiskTensor:
        if not isinstance(index, slice) or index.step not in (None, 1):
            raise TypeError("a DiskTensor can only be sliced along samples with x[a:b].")
        a, b, _ = index.indices(len(self))
        return DiskTensor(self._chunks, self._features, self.dtype, self.chunk_elements,
                          self._start + a, self._start + max(a, b))

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None, **_: Any) -> torch.Tensor:
        """The rows of this view as a tensor (zero-padded to the longest sequence)."""
        parts, offset = [], 0
        for chunk in self._chunks:
            lo, hi = max(self._start - offset, 0), min(self._stop - offset, chunk.samples)
            if lo < hi:
                t = chunk.path if isinstance(chunk.path, torch.Tensor) else _read(chunk.path)
                t = t[lo:hi]
                if t.shape[1] < self._tokens:
                    t = nn.functional.pad(t, (0, 0, 0, self._tokens - t.shape[1]))
                parts.append(t.to(device=device, dtype=dtype))
            offset += chunk.samples
            if offset >= self._stop:
                break
        if not parts:
            return torch.zeros(0, self._tokens, self._features, dtype=dtype or self.dtype, device=device)
        return parts[0] if len(parts) == 1 else torch.cat(parts)

    def __repr__(self) -> str:
        return f"DiskTensor(shape={tuple(self.shape)}, dtype={self.dtype}, chunks={len(self._chunks)})"


class ActivationStore:
    """Decides, item by item, whether activations stay in memory or go to disk.

    Args:
        budget: bytes of activations held in memory (half for the hidden states between blocks,
            half for the current block's captured inputs); ``None``: no limit, nothing on disk.
        storage: where in-memory activations live (CPU for a model on an accelerator).
    """

    def __init__(self, budget: int | None, storage: torch.device) -> None:
        self.budget = budget
        self.storage = storage
        self._held = {"hidden": 0, "captured": 0}
        self._dir: tempfile.TemporaryDirectory | None = None
        self._count = 0
        self.spilled_bytes = 0

    @property
    def limited(self) -> bool:
        return self.budget is not None

    @property
    def chunk_elements(self) -> int:
        # float64 elements converted at once by a Gram: an eighth of the budget
        return max(1, (self.budget or 0) // 64)

    def reset(self, kind: str) -> None:
        """A new set of ``kind`` activations replaces the previous one (a new block / pass)."""
        self._held[kind] = 0

    def fits(self, kind: str, nbytes: int) -> bool:
        """Whether ``nbytes`` more of ``kind`` stay in memory (and count them if so)."""
        if self.budget is None or self._held[kind] + nbytes <= self.budget // 2:
            self._held[kind] += nbytes
            return True
        return False

    def put(self, t: torch.Tensor) -> _Chunk:
        """Write a ``(samples, tokens, features)`` tensor to a new file; its chunk handle."""
        if self._dir is None:
            self._dir = tempfile.TemporaryDirectory(prefix="robop-activations-")
        path = Path(self._dir.name) / f"{self._count:07d}.pt"
        self._count += 1
        t = t.detach().to("cpu").contiguous()
        torch.save(t, path)
        self.spilled_bytes += t.numel() * t.element_size()
        return _Chunk(path, t.shape[0], t.shape[1], t.shape[2], t.dtype)

    def keep_hidden(self, t: torch.Tensor) -> torch.Tensor | DiskTensor:
        """A hidden state between blocks: in memory on ``storage`` if it fits, else on disk."""
        if t.dim() < 2 or self.fits("hidden", t.numel() * t.element_size()):
            return t.detach().to(self.storage)
        shape = t.shape
        flat = t.detach().reshape(shape[0], -1, shape[-1])
        return _HiddenOnDisk(self.put(flat), shape, t.dtype)

    def keep_captured(self, t: torch.Tensor) -> torch.Tensor | _Chunk:
        """Captured layer inputs ``(samples, tokens, features)``: a copy on ``storage`` if it fits, else a file."""
        if self.fits("captured", t.numel() * t.element_size()):
            return t.detach().to(self.storage, copy=True)
        return self.put(t)

    def combine(self, items: list[torch.Tensor | _Chunk]) -> DiskTensor | None:
        """The captured items as one DiskTensor when any went to disk; ``None`` when all stayed in memory."""
        if all(isinstance(i, torch.Tensor) for i in items):
            return None
        chunks = [i if isinstance(i, _Chunk) else _Chunk(i, *i.shape, i.dtype) for i in items]
        return DiskTensor(chunks, chunks[0].features, chunks[0].dtype, self.chunk_elements)

    def close(self) -> None:
        """Delete the temporary files."""
        _LAST[:] = [None, None]
        if self._dir is not None:
            shutil.rmtree(self._dir.name, ignore_errors=True)
            self._dir.cleanup()
            self._dir = None


class _HiddenOnDisk:
    """A block call's hidden states stored on disk; ``move_to`` reads them back."""

    def __init__(self, chunk: _Chunk, shape: torch.Size, dtype: torch.dtype) -> None:
        self.chunk, self.shape, self.dtype = chunk, shape, dtype

    def load(self, device: torch.device | str) -> torch.Tensor:
        return torch.load(self.chunk.path, weights_only=True).reshape(self.shape).to(device)


# Share of the host memory available at the first undo copy that the copies may fill before the rest
# go to temporary files.
UNDO_HOST_FRACTION = 0.25


class WeightUndo:
    """The original values of the weights overwritten so far, to restore after a failure.

    ``save(name, tensor)`` before overwriting ``tensor`` in place (only the first call per name
    copies); ``restore(tensors)`` copies every saved value back; ``close()`` drops the copies.
    The copies stay in host memory up to ``budget`` bytes (default: :data:`UNDO_HOST_FRACTION` of the
    host memory available when the first copy is made); past it each one goes to a temporary file.

    Example:
        >>> undo = WeightUndo(budget=64)  # room for two 4 x 2 float32 tensors, the third on disk
        >>> ws = {n: torch.full((4, 2), float(i)) for i, n in enumerate("abc")}
        >>> for n, w in ws.items():
        ...     undo.save(n, w); _ = w.zero_()
        >>> undo.on_disk
        1
        >>> undo.restore(ws); [float(w[0, 0]) for w in ws.values()]
        [0.0, 1.0, 2.0]
        >>> undo.close()
    """

    def __init__(self, budget: int | None = None) -> None:
        self.budget = budget
        self._dir: tempfile.TemporaryDirectory | None = None
        self._saved: dict[str, Path | torch.Tensor] = {}
        self._held = 0
        self.on_disk = 0
        self.seconds = 0.0  # time spent copying (the report's "io")

    def __contains__(self, name: str) -> bool:
        return name in self._saved

    def save(self, name: str, tensor: torch.Tensor) -> None:
        if name in self._saved:
            return
        start = time.perf_counter()
        if self.budget is None:
            free = available_host_bytes()
            self.budget = int(free * UNDO_HOST_FRACTION) if free is not None else 0
        nbytes = tensor.numel() * tensor.element_size()
        if self._held + nbytes <= self.budget:
            self._saved[name] = tensor.detach().to("cpu", copy=True)
            self._held += nbytes
        else:
            if self._dir is None:
                self._dir = tempfile.TemporaryDirectory(prefix="robop-undo-")
            path = Path(self._dir.name) / f"{len(self._saved):06d}.pt"
            torch.save(tensor.detach().to("cpu", copy=True), path)
            self._saved[name] = path
            self.on_disk += 1
        self.seconds += time.perf_counter() - start

    def restore(self, tensors: dict[str, torch.Tensor]) -> None:
        """Copy every saved value back into ``tensors[name]`` (in place)."""
        for name, value in self.saved():
            tensors[name].data.copy_(value)

    def saved(self):
        """``(name, original value)`` of every weight saved so far (files read back one at a time)."""
        for name, value in self._saved.items():
            yield name, value if isinstance(value, torch.Tensor) else torch.load(value, weights_only=True)

    def close(self) -> None:
        self._saved.clear()
        self._held = 0
        if self._dir is not None:
            self._dir.cleanup()
            self._dir = None
