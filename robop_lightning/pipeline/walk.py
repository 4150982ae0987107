"""One block walk for every kind of pruning: :class:`BlockWalk` and the :class:`Step` it runs.

The walk owns everything that is not the pruning itself::

    record the first block's inputs for every batch (embeddings etc. run once)
    for each block:
        (before block 1: record every later block's own arguments, one pass-through forward)
        if resume_dir holds it finished: load it            (Step.restore)
        else: stream its targets' Grams (or capture inputs), prune
                                                            (Step.prune_block, via BlockWalk.accumulate / capture)
              and checkpoint it                             (Step.save)
        run the (pruned) block: its outputs are the next block's inputs

plus capture of single linears outside the blocks (in forward order), where activations live
(hidden states on the compute device within a budget, then host memory, then disk past the
activation budget: :mod:`robop_lightning.utils.offload`), where the time goes (:attr:`BlockWalk.block_times`), progress (a bar on a terminal, a log line per block for logs),
the undo transaction (every registered undo runs, newest first, on any exception, Ctrl-C
included), naming the layer in errors, and the check that every rank of a process group computed
the same result. A :class:`Step` is the pruning of one kind: a mask per linear
(:mod:`robop_lightning.pipeline.mask_step`), a shrink per unit
(:mod:`robop_lightning.pipeline.shrink_step`) or CAP's Fisher per linear
(:mod:`robop_lightning.pipeline.fisher_step`, walked by :meth:`BlockWalk.units`). The job that sets
a walk up is :func:`robop_lightning.pipeline.job.prepare_job`.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import sys
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn
from tqdm.auto import tqdm

from robop_lightning.pipeline.calibration import (
    BlockCall,
    capture_block_inputs,
    capture_linear_input,
    run_block,
    same_on_all_ranks,
)
from robop_lightning.engine.gram import GramAccumulator
from robop_lightning.utils.memory import PeakRSS, device_free_bytes
from robop_lightning.utils.offload import ActivationStore, parse_bytes
from robop_lightning.pipeline.resume import ResumeStore, fingerprint_batches, fingerprint_tensors
from robop_lightning.pipeline.streaming import accumulate_block, record_block_args

__all__ = ["BlockWalk", "Step", "heldout_count", "open_resume_store", "split_heldout"]

log = logging.getLogger("robop_lightning")


class Step(Protocol):
    """What a kind of pruning plugs into :class:`BlockWalk`."""

    def prune_block(self, walk: BlockWalk, name: str, block: nn.Module) -> list[str]:
        """Prune the work of one block (capturing inputs with ``walk.capture``); the names done."""

    def prune_linear(self, name: str, inputs: torch.Tensor) -> None:
        """Prune one linear outside the blocks from its captured inputs."""

    def save(self, names: list[str]) -> tuple[list[dict[str, Any]], dict[str, torch.Tensor]]:
        """The report rows and tensors of finished ``names``, for ``resume_dir``."""

    def restore(self, rows: list[dict[str, Any]], tensors: dict[str, torch.Tensor]) -> None:
        """Apply a unit finished by an earlier run (from :meth:`save`'s output)."""


def split_heldout(x: torch.Tensor, fraction: float, name: str) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Calibration and held-out samples: the last ``fraction`` of the samples are held out.

    Example:
        >>> a, b = split_heldout(torch.zeros(8, 3, 2), 0.25, "layer")
        >>> a.shape[0], b.shape[0]
        (6, 2)
    """
    if fraction <= 0:
        return x, None
    n = x.shape[0]
    held = heldout_count(n, fraction, name)
    return x[: n - held], x[n - held :]


def heldout_count(n: int, fraction: float, name: str) -> int:
    """How many of ``n`` samples ``fraction`` holds out (at least one when ``fraction > 0``).

    Raises:
        ValueError: none would be left to prune with.
    """
    if fraction <= 0:
        return 0
    held = max(1, int(round(fraction * n)))
    if n - held < 1:
        raise ValueError(
            f"{name}: heldout_fraction={fraction} of {n} calibration sample(s) leaves none to prune with; "
            "pass more calibration batches or a smaller heldout_fraction."
        )
    return held


def open_resume_store(
    resume_dir: str | Path,
    model: nn.Module,
    targets: Mapping[str, torch.Tensor],
    batches: list[Any],
    job: Mapping[str, Any],
    prior_masks: Mapping[str, torch.Tensor] | None = None,
) -> ResumeStore:
    """The :class:`ResumeStore` of this job in ``resume_dir`` (raises if it belongs to another job).

    The job is identified by its arguments, the targets' shapes and dtypes, the model's weights,
    the calibration batches and the prior masks.
    """
    shapes = {n: [list(w.shape), str(w.dtype)] for n, w in targets.items()}

    def digest(obj: Any) -> str:
        return hashlib.sha256(json.dumps(obj, sort_keys=True, default=repr).encode()).hexdigest()

    components = {
        "arguments": digest(dict(job)),
        "targets": digest(shapes),
        "model weights": fingerprint_tensors(model.state_dict()),
        "calibration batches": fingerprint_batches(batches),
        "prior masks": fingerprint_tensors(prior_masks or {}),
    }
    return ResumeStore(resume_dir, components, {**job, "targets": list(targets)})


def _dtype_mismatch(err: BaseException, batches: list[Any], dtype: torch.dtype, name: str) -> ValueError | None:
    """A clear error for a forward that failed because float batches differ in dtype from the model."""
    if not isinstance(err, RuntimeError) or not batches:
        return None
    found: list[torch.dtype] = []

    def scan(obj: Any) -> None:
        if isinstance(obj, torch.Tensor):
            if obj.is_floating_point() and obj.dtype != dtype:
                found.append(obj.dtype)
        elif isinstance(obj, (tuple, list)):
            for o in obj:
                scan(o)
        elif isinstance(obj, dict):
            for o in obj.values():
                scan(o)

    scan(batches[0])
    if not found:
        return None
    have, want = str(found[0]).replace("torch.", ""), str(dtype).replace("torch.", "")
    return ValueError(
        f"{name}: the model's forward failed on a calibration batch ({err}). The batch holds {have} tensors "
        f"but the layers to prune are {want}: cast the calibration data to the model's dtype "
        f"(batch.to(torch.{want})), or calibrate the model in {have} (model.to(torch.{have})) and cast it after pruning."
    )


class BlockWalk:
    """Walk a model block by block for a :class:`Step` (see the module docstring).

    Args:
        model: the model (pruned in place by the step).
        batches: the calibration batches (a list: iterated once per pass).
        forward: ``forward(model, batch)``.
        device: where the blocks run (capture, solving, propagation).
        home: where the model lives (``None``: ``device``). When it differs from ``device`` the model
            is *onloaded*: its weights stay at ``home`` and each block (or linear outside the blocks)
            moves to ``device`` for its capture and solving, then back, so ``device`` holds about one
            block, its activations and one layer's solver work (SparseGPT's and llm-compressor's
            sequential onloading). The first forward up to the first block runs at ``home``.
        activation_budget: bytes (or ``"2GB"``) of activations kept in memory; the rest on disk.
        progress: a progress bar on a terminal (``None`` / ``True``); ``False`` for none. Each
            finished block is also logged (``logging.getLogger("robop_lightning")``, INFO).
        resume: the job's :class:`ResumeStore`, or ``None``.
        dtype: ``(name, dtype)`` of the first layer pruned (for the error on calibration batches of
            another dtype).
        restored_note: what the error note says about the model after a failure.
        device_budget: bytes of hidden states (and the blocks' other arguments) kept on an
            accelerator ``device`` between blocks (``None``: a quarter of its free memory when the
            walk starts); past it they go to host memory (pinned), and past ``activation_budget`` to
            disk. On the CPU everything is in memory up to ``activation_budget``.

    Attributes:
        block_times: one row per block walked: ``name``, ``seconds`` and where they went
            (``capture``: forwards that feed the Grams, with the Grams; ``solve``; ``forward``: the
            forward that feeds the next block; ``io``: undo copies and checkpoints).
        record_seconds: the pass that recorded every block's arguments.
        peak_memory: ``{"device": bytes, "host": bytes}``: the accelerator's peak allocation
            (``None`` on the CPU) and the peak resident memory above the start (sampled), over the walk.
    """

    def __init__(
        self,
        model: nn.Module,
        batches: list[Any],
        forward: Callable[[nn.Module, Any], Any],
        device: torch.device,
        activation_budget: int | str | None = None,
        progress: bool | None = None,
        resume: ResumeStore | None = None,
        dtype: tuple[str, torch.dtype] | None = None,
        restored_note: str = "every weight of the model was restored",
        home: torch.device | None = None,
        device_budget: int | None = None,
    ) -> None:
        self.model = model
        self.batches = batches
        self.forward = forward
        self.device = torch.device(device)
        self.home = self.device if home is None else torch.device(home)
        self.onload = self.home != self.device
        self.storage = torch.device("cpu") if self.device.type != "cpu" else self.device
        budget = parse_bytes(activation_budget)
        self.acts = ActivationStore(budget, self.storage) if budget is not None else None
        self.progress = progress
        self.resume = resume
        self.dtype = dtype
        self.restored_note = restored_note
        self.current = type(model).__name__
        self.calls: list[BlockCall] | None = None
        self._undo: list[Callable[[], None]] = []
        self._close: list[Callable[[], None]] = []
        self._files = 0
        if self.device.type == "cpu":
            device_budget = 0
        elif device_budget is None:
            free = device_free_bytes(self.device)
            device_budget = free // 4 if free is not None else 0
        self._device_budget = device_budget
        self._device_used = {"hidden": 0, "args": 0}
        self.index = 0  # the block being walked
        self.block_times: list[dict[str, Any]] = []
        self._clock: dict[str, float] = {}
        self.record_seconds = 0.0
        self.peak_memory: dict[str, int | None] = {"device": None, "host": None}

    # ------------------------------------------------------------------ memory tiers
    def _keep(self, t: torch.Tensor, kind: str) -> Any:
        """Where a hidden state (``kind="hidden"``) or another block argument (``"args"``) is kept."""
        nbytes = t.numel() * t.element_size()
        if self._device_budget and sum(self._device_used.values()) + nbytes <= self._device_budget:
            self._device_used[kind] += nbytes
            return t.to(self.device)
        if kind == "hidden" and self.acts is not None:
            return self.acts.keep_hidden(t)
        if t.device.type == "cpu":
            return t
        if t.device.type == "cuda" and t.dim() > 0:  # pinned: the copy back to the device is asynchronous
            host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
            return host.copy_(t)
        return t.to("cpu")

    def keep_hidden(self, t: torch.Tensor) -> Any:
        """Keep a hidden state between blocks: on the device within its budget, then host memory, then disk."""
        return self._keep(t, "hidden")

    def keep_arg(self, t: torch.Tensor) -> Any:
        """Keep another block argument (masks, position encodings): on the device within its budget, else the host."""
        return self._keep(t, "args")

    # ------------------------------------------------------------------ timing
    @contextlib.contextmanager
    def timed(self, key: str) -> Iterator[None]:
        """Add the seconds inside to the current block's ``key`` (the device synchronised at the end)."""
        start = time.perf_counter()
        try:
            yield
        finally:
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            self._clock[key] = self._clock.get(key, 0.0) + time.perf_counter() - start

    # ------------------------------------------------------------------ transaction
    def on_undo(self, fn: Callable[[], None]) -> None:
        """Run ``fn`` if the walk fails (newest first)."""
        self._undo.append(fn)

    def on_close(self, fn: Callable[[], None]) -> None:
        """Run ``fn`` when the walk ends, failed or not (after the undos)."""
        self._close.append(fn)

    @contextlib.contextmanager
    def transaction(self) -> Iterator[BlockWalk]:
        """Eval mode and no grad inside; on any exception every undo runs and the error names the layer."""
        modes = {m: m.training for m in self.model.modules()}
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        peak = PeakRSS(interval=0.05)
        try:
            self.model.eval()
            with torch.no_grad(), peak:
                yield self
        except BaseException as err:
            with torch.no_grad():
                for undo in reversed(self._undo):
                    undo()
                if self.onload:  # parameters put back by an undo may still be on the execution device
                    self.model.to(self.home)
            mismatch = _dtype_mismatch(err, self.batches, self.dtype[1], self.dtype[0]) if self.dtype else None
            if mismatch is not None:
                raise mismatch from err
            renamed = self._renamed(err)
            if renamed is err:
                raise
            raise renamed from err
        finally:
            for close in reversed(self._close):
                close()
            if self.acts is not None:
                self.acts.close()
            for m, mode in modes.items():
                m.training = mode
            self.peak_memory = {
                "device": int(torch.cuda.max_memory_allocated(self.device)) if self.device.type == "cuda" else None,
                "host": None if peak.peak is None or peak.start is None else int(peak.peak - peak.start),
            }

    def _renamed(self, err: BaseException) -> BaseException:
        note = f"while pruning {self.current} ({self.restored_note})"
        if type(err) in (ValueError, RuntimeError, TypeError) and self.current not in str(err):
            return type(err)(f"{self.current}: {err} [{note}]")
        if hasattr(err, "add_note"):
            err.add_note(note)
        return err

    # ------------------------------------------------------------------ capture
    def capture(self, block: nn.Module, modules: Mapping[str, nn.Module]) -> dict[str, torch.Tensor]:
        """The inputs of ``modules`` (inside ``block``) on the current block inputs; nothing propagates."""
        with self.timed("capture"):
            return run_block(block, self.calls, self.device, self.storage, dict(modules), propagate=False,
                             store=self.acts, index=self.index)

    def accumulate(self, block: nn.Module, modules: Mapping[str, nn.Module],
                   make: Callable[[str], GramAccumulator]) -> dict[str, GramAccumulator]:
        """Run ``block`` on the current block inputs, each target's inputs reduced into its accumulator."""
        with self.timed("capture"):
            return accumulate_block(block, self.calls, self.device, dict(modules), make, self.index)

    def samples(self) -> int:
        """Calibration samples of the current block inputs (the first dimension of every hidden state)."""
        return sum(call.hidden.shape[0] for call in self.calls)

    def check_ranks(self, name: str, result: torch.Tensor, what: str = "results") -> None:
        """Under ``torch.distributed``: every rank must have computed the same ``result``."""
        if not same_on_all_ranks(result):
            raise RuntimeError(f"{name}: ranks computed different {what}; pruning must be deterministic across ranks.")

    # ------------------------------------------------------------------ walks
    @contextlib.contextmanager
    def _onloaded(self, module: nn.Module) -> Iterator[None]:
        """``module`` on the execution device inside, back home after (whatever happened)."""
        if not self.onload:
            yield
            return
        module.to(self.device)
        try:
            yield
        finally:
            module.to(self.home)

    def _bar(self, items: list, desc: str) -> Any:
        if self.progress is False or not sys.stderr.isatty():
            return items
        return tqdm(items, desc=desc, leave=False)

    def _unit(self, step: Step, unit: str, file: str, work: Callable[[], list[str]]) -> None:
        """Restore ``unit`` from ``resume_dir`` when it was finished there, else do it and checkpoint it."""
        saved = self.resume.take(unit) if self.resume is not None else None
        if saved is not None:
            step.restore(*saved)
            return
        names = work()
        if self.resume is not None:
            with self.timed("io"):
                rows, tensors = step.save(names)
                self.resume.save(unit, file, rows, tensors)

    def linears(self, step: Step, names: list[str], modules: Mapping[str, nn.Module], desc: str | None = None) -> None:
        """Prune linears one at a time in ``names`` order, each from whole-model forwards."""
        for name in self._bar(names, desc) if desc else names:
            self.current = name
            file = f"layer-{self._files:05d}.safetensors"
            self._files += 1

            def work(name: str = name) -> list[str]:
                x = capture_linear_input(self.model, modules[name], self.batches, self.forward, self.home,
                                         self.storage, name, self.acts)
                with self._onloaded(modules[name]):
                    step.prune_linear(name, x)
                return [name]

            self._unit(step, name, file, work)

    def units(self, step: Any, names: list[str], desc: str, prefix: str) -> None:
        """Work per target that needs no captured activations (CAP's Fisher: gradients of the whole model).

        ``step.prune_unit(walk, name)`` does one; each is checkpointed in ``resume_dir`` as unit
        ``"<prefix>:<name>"`` (``prefix`` tells passes over the same targets apart).
        """
        for name in self._bar(names, desc):
            self.current = name
            file = f"{prefix}-{self._files:05d}.safetensors"
            self._files += 1
            self._unit(step, f"{prefix}:{name}", file, lambda name=name: step.prune_unit(self, name))
            log.info("%s: %s", desc, name)

    def blocks(
        self,
        step: Step,
        block_list: list[tuple[str, nn.Module]],
        has_work: Callable[[str], bool] = lambda name: True,
        desc: str = "pruning blocks",
        checkpoint: bool = True,
    ) -> None:
        """Walk ``block_list`` up to the last block with work; each block's outputs feed the next.

        ``checkpoint=False``: a pass that changes nothing (planning); ``resume_dir`` is not used.
        """
        last = max((i for i, (b, _) in enumerate(block_list) if has_work(b)), default=-1)
        if last < 0:
            return
        resume = self.resume if checkpoint else None
        with_work = [b for b, _ in block_list[: last + 1] if has_work(b)]
        if resume is not None and resume.peek(with_work):
            for name, _ in block_list[: last + 1]:  # every block finished: no activations to replay
                self.current = name
                if has_work(name):
                    step.restore(*resume.take(name))
            log.info("%s: %d blocks loaded from %s", desc, len(with_work), resume.dir)
            return
        first_name, first = block_list[0]
        self.current = first_name
        start = time.perf_counter()
        self._device_used = {"hidden": 0, "args": 0}
        self.calls = capture_block_inputs(self.model, first, self.batches, self.forward, self.home, self.storage,
                                          first_name, keep=self.keep_arg, keep_hidden=self.keep_hidden)
        self.record_seconds = time.perf_counter() - start
        structure: list = []  # what the blocks return besides the hidden states (learnt from block 0)
        try:
            bar = self._bar(block_list[: last + 1], desc)
            for i, (name, block) in enumerate(bar):
                self.current, self.index, self._clock = name, i, {}
                start = time.perf_counter()
                if i == 1:  # every later block's own arguments, from one pass through the model's forward
                    record_block_args(self.model, [b for _, b in block_list[: last + 1]], self.calls, self.batches,
                                      self.forward, self.home, structure[0] if structure else None, self.keep_arg,
                                      first_name)
                    self.record_seconds += time.perf_counter() - start
                    start = time.perf_counter()
                with self._onloaded(block):
                    if has_work(name):
                        if checkpoint:
                            self._unit(step, name, f"block-{i:05d}.safetensors",
                                       lambda name=name, block=block: step.prune_block(self, name, block))
                        else:
                            step.prune_block(self, name, block)
                    if i < last:
                        self.current = name
                        self._device_used["hidden"] = 0  # the outputs replace the inputs
                        with self.timed("forward"):
                            run_block(block, self.calls, self.device, self.storage, store=self.acts, index=i,
                                      keep_hidden=self.keep_hidden, structure=structure if i == 0 else None)
                row = {"name": name, "seconds": time.perf_counter() - start,
                       **{k: self._clock.get(k, 0.0) for k in ("capture", "solve", "forward", "io")}}
                self.block_times.append(row)
                log.info("%s: %d/%d %s (%.1f s: capture %.1f, solve %.1f, forward %.1f, io %.1f)", desc, i + 1,
                         last + 1, name, row["seconds"], row["capture"], row["solve"], row["forward"], row["io"])
                if hasattr(bar, "set_postfix_str"):
                    bar.set_postfix_str(f"{name}: {row['seconds']:.1f} s (capture {row['capture']:.1f}, "
                                        f"solve {row['solve']:.1f}, forward {row['forward']:.1f})")
        finally:
            self.calls = None
