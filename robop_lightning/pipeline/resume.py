"""Resumable pruning: a directory of finished blocks that a rerun of the same job continues from.

:func:`robop_lightning.pipeline.prune.prune_model` (``resume_dir=...``) writes every finished *unit* (a
block, or a linear pruned on its own outside the blocks) to the directory as it goes::

    resume_dir/
        manifest.json             the job's fingerprint and the finished units, in order, with
                                  their report rows and the sha256 of their files
        block-00000.safetensors   pruned weights ("<layer>.weight") and keep-masks ("<layer>.mask")
        block-00001.safetensors
        layer-00000.safetensors   a linear pruned on its own (models without blocks, heads, ...)

Every file is written to a temporary sibling, flushed to disk, then renamed over its final name
(``os.replace`` is atomic), and the manifest is updated the same way *after* the unit's file: a
crash or SIGKILL at any moment leaves the previous, consistent state (a unit file that the
manifest does not list yet is simply recomputed). Nothing is ever overwritten in place.

The fingerprint covers everything the result depends on: the pruning configuration, the target
names / shapes / dtypes, every tensor of the model's ``state_dict`` (dense weights, norms,
embeddings), the calibration batches and the prior masks. A rerun with the same fingerprint
loads the finished units' weights into the model and replays the calibration activations
through them exactly as the uninterrupted run did, so the final weights and masks are
bit-identical. A different fingerprint is refused (the directory belongs to another job).

Under ``torch.distributed`` each rank keeps its own sub-directory ``rank-00003`` (ranks hold
different calibration shards) and the ranks agree to resume from the smallest number of units
any of them finished.

A resume directory belongs to one job at a time: two processes must not share one.
"""

from __future__ import annotations

import hashlib
import json
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from robop_lightning.utils.files import atomic_write

__all__ = ["ResumeStore", "fingerprint_tensors", "fingerprint_batches"]

_FORMAT = "robop-resume/1"
_MANIFEST = "manifest.json"


# --------------------------------------------------------------------------- files
# --------------------------------------------------------------------------- fingerprints
def _update_tensor(h: Any, t: torch.Tensor) -> None:
    t = t.detach()
    h.update(f"tensor {t.dtype} {tuple(t.shape)};".encode())
    flat = t.to("cpu").contiguous().reshape(-1)
    if flat.numel():
        h.update(flat.view(torch.uint8).numpy().tobytes() if flat.dtype != torch.uint8 else flat.numpy().tobytes())


def fingerprint_tensors(tensors: Mapping[str, torch.Tensor]) -> str:
    """sha256 over names, dtypes, shapes and raw bytes of ``tensors`` (in sorted-name order)."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        h.update(f"{name}=".encode())
        _update_tensor(h, tensors[name])
    return h.hexdigest()


def _update_obj(h: Any, obj: Any) -> None:
    if isinstance(obj, torch.Tensor):
        _update_tensor(h, obj)
    elif isinstance(obj, Mapping):
        h.update(f"map {len(obj)}{{".encode())
        for key in sorted(obj, key=repr):
            h.update(f"{key!r}:".encode())
            _update_obj(h, obj[key])
        h.update(b"}")
    elif isinstance(obj, (list, tuple)):
        h.update(f"seq {len(obj)}[".encode())
        for item in obj:
            _update_obj(h, item)
        h.update(b"]")
    elif obj is None or isinstance(obj, (bool, int, float, str, bytes)):
        h.update(f"{type(obj).__name__} {obj!r};".encode())
    elif hasattr(obj, "__array__"):  # numpy arrays
        _update_tensor(h, torch.as_tensor(obj.__array__()))
    else:  # an object we cannot read: its type at least (its repr may hold a memory address)
        h.update(f"object {type(obj).__module__}.{type(obj).__qualname__};".encode())


def fingerprint_batches(batches: list[Any]) -> str:
    """sha256 of calibration batches: tensors by content, containers recursively."""
    h = hashlib.sha256()
    _update_obj(h, batches)
    return h.hexdigest()


# --------------------------------------------------------------------------- distributed
def _world() -> tuple[int, int]:
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _min_over_ranks(value: int) -> int:
    if _world()[1] == 1:
        return value
    dist = torch.distributed
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
    t = torch.tensor([value], dtype=torch.long, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return int(t.item())


# --------------------------------------------------------------------------- the store
class ResumeStore:
    """The finished units of one pruning job in a directory (see the module docstring).

    Units are consumed in the order the job meets them: :meth:`take` returns the saved unit when
    it is the next finished one (and the job may skip it), :meth:`save` records a newly finished
    unit after the ones taken so far.

    Args:
        directory: the resume directory (created when missing).
        components: ``{part: sha256}`` of what the result depends on (config, targets, model,
            calibration, ...); their combination is the job's fingerprint.
        job: a human-readable description of the job, stored in the manifest.

    Raises:
        ValueError: the directory holds the manifest of another job, an unreadable manifest, or
            is a file.
    """

    def __init__(self, directory: str | Path, components: Mapping[str, str], job: Mapping[str, Any]) -> None:
        root = Path(directory)
        if root.exists() and not root.is_dir():
            raise ValueError(f"resume_dir={str(root)!r} is a file; pass a directory (it is created when missing).")
        rank, world = _world()
        self.root = root
        self.dir = root / f"rank-{rank:05d}" if world > 1 else root
        self.dir.mkdir(parents=True, exist_ok=True)
        for stale in self.dir.glob(".*.tmp"):  # left by a killed run of this job
            stale.unlink(missing_ok=True)
        self.components = dict(components)
        self.fingerprint = hashlib.sha256(json.dumps(self.components, sort_keys=True).encode()).hexdigest()
        self.job = dict(job)
        self.finished: list[dict[str, Any]] = []
        path = self.dir / _MANIFEST
        if path.exists():
            try:
                manifest = json.loads(path.read_text())
                theirs, their_parts = manifest["fingerprint"], dict(manifest.get("components", {}))
                finished = list(manifest["finished"])
            except (OSError, ValueError, KeyError, TypeError) as err:
                raise ValueError(
                    f"resume_dir {str(self.dir)!r}: {_MANIFEST} is unreadable ({err}); it was not written by "
                    "prune_model. Pass a new resume_dir, or delete this directory to start over."
                ) from None
            if manifest.get("format") != _FORMAT or theirs != self.fingerprint:
                differ = sorted(k for k in set(their_parts) | set(self.components)
                                if their_parts.get(k) != self.components.get(k))
                raise ValueError(
                    f"resume_dir {str(self.dir)!r} belongs to another pruning job: its "
                    f"{', '.join(differ) or 'format'} differ(s) from this call's (the pruning arguments, the "
                    "targets, the model's weights, the calibration batches and the prior masks must all be the "
                    "same to resume). Pass a new resume_dir for this job, or delete the directory to start over."
                )
            self.finished = self._valid_prefix(finished)
        done = _min_over_ranks(len(self.finished))
        self.finished = self.finished[:done]
        self.cursor = 0
        if not path.exists():
            self._write_manifest()

    # ------------------------------------------------------------------ reading
    def _valid_prefix(self, finished: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """The finished units whose files are present and intact, up to the first that is not."""
        out = []
        for entry in finished:
            file = self.dir / entry.get("file", "")
            if not file.is_file() or _sha256(file.read_bytes()) != entry.get("sha256"):
                warnings.warn(
                    f"resume_dir {str(self.dir)!r}: {entry.get('file')} is missing or damaged; pruning resumes "
                    f"from {entry.get('unit')}.",
                    RuntimeWarning,
                    stacklevel=3,
                )
                break
            out.append(entry)
        return out

    def peek(self, units: list[str]) -> bool:
        """Whether the next finished units are exactly ``units`` (all of them can be taken)."""
        nxt = [e["unit"] for e in self.finished[self.cursor : self.cursor + len(units)]]
        return nxt == list(units)

    def take(self, unit: str) -> tuple[list[dict[str, Any]], dict[str, torch.Tensor]] | None:
        """``(report rows, {"<layer>.weight" / "<layer>.mask": tensor})`` of ``unit`` when it is
        the next finished unit; otherwise ``None`` (and every later saved unit is recomputed)."""
        if self.cursor < len(self.finished) and self.finished[self.cursor]["unit"] == unit:
            entry = self.finished[self.cursor]
            from safetensors.torch import load

            data = (self.dir / entry["file"]).read_bytes()
            if _sha256(data) != entry["sha256"]:
                raise ValueError(
                    f"resume_dir {str(self.dir)!r}: {entry['file']} changed while pruning; delete the directory "
                    "to start over."
                )
            self.cursor += 1
            return [dict(r) for r in entry["layers"]], load(data)
        del self.finished[self.cursor :]
        return None

    # ------------------------------------------------------------------ writing
    def save(self, unit: str, file: str, rows: list[dict[str, Any]], tensors: Mapping[str, torch.Tensor]) -> None:
        """Write ``unit``'s tensors to ``file``, then list it in the manifest (both atomically)."""
        from safetensors.torch import save

        data = save({k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}, metadata={"unit": unit})
        atomic_write(self.dir / file, data)
        del self.finished[self.cursor :]
        self.finished.append({"unit": unit, "file": file, "sha256": _sha256(data), "layers": [dict(r) for r in rows]})
        self.cursor += 1
        self._write_manifest()

    def _write_manifest(self) -> None:
        manifest = {
            "format": _FORMAT,
            "fingerprint": self.fingerprint,
            "components": self.components,
            "job": self.job,
            "finished": self.finished,
        }
        atomic_write(self.dir / _MANIFEST, json.dumps(manifest, indent=1, default=repr) + "\n")


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()
