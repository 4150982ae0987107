"""Masks (unstructured, ``row``, ``N:M``): the :class:`MaskStep` of a pruning job, and :func:`prune_masks`.

For a model with repeated blocks (timm ``blocks``, Hugging Face ``model.layers``)::

    record the first block's inputs for every batch (the forward stops there: embeddings etc. run once)
    for each block (with the arguments the model passes that block):
        run the block, adding each batch's inputs of its target linears into their Grams
            (all from the same block input; nothing else is kept)
        prune every target with prune_layer
        run the pruned block again: its outputs are the next block's inputs

A model without repeated blocks (an MLP) has its linears pruned one at a time in forward order,
each from inputs that already went through the pruned earlier layers. Targets outside the blocks
(named explicitly) are pruned the same way, before or after the blocks.

The whole job is a transaction: every target weight is copied (host memory, or disk past a budget)
before it is overwritten and restored on any exception (``KeyboardInterrupt`` included), so a
failure leaves the model exactly as it was.
"""

from __future__ import annotations

import dataclasses
import warnings
from typing import Any

import torch
from torch import nn

from robop_lightning.engine.gram import GramAccumulator, GramInputs, LayerInputs, StatsUnavailable
from robop_lightning.engine.layer import prune_layer
from robop_lightning.engine.patterns import parse_pattern
from robop_lightning.engine.selection import AutoOptions
from robop_lightning.engine.sets import CLOSED_FORM_SETS, canonical_set_name
from robop_lightning.pipeline.calibration import forward_order
from robop_lightning.pipeline.dispatch import layer_weight, materialized, read_weight, write_weight
from robop_lightning.pipeline.job import Job
from robop_lightning.pipeline.targets import is_transposed, left_dense
from robop_lightning.pipeline.walk import BlockWalk, heldout_count, split_heldout
from robop_lightning.report import PruneReport
from robop_lightning.utils.offload import WeightUndo

__all__ = ["MaskStep", "prune_masks"]


class MaskStep:
    """Unstructured / N:M pruning as a :class:`robop_lightning.pipeline.walk.Step`: a mask per linear.

    Each target is pruned by :func:`prune_layer` from its calibration statistics (q / k / v, or
    gate / up, share one input: one Gram); the weight is overwritten in place (its original goes
    to a :class:`WeightUndo` first) and the mask and a report row are recorded.

    Inside blocks the statistics are *streamed*: every batch's inputs are added into the Grams the
    solve needs (``H``, ``auto``'s fold Grams, the held-out Gram) in the forward hook, on the compute
    device, and the activations are never stored (:class:`robop_lightning.engine.gram.GramAccumulator`).
    Only this project's min-max extension (per-sample losses and reweighted Grams) keeps the
    activations themselves, as do linears outside the blocks and calls whose samples cannot be
    told in advance (a held-out split of inputs that are not batch-major).
    """

    def __init__(self, walk: BlockWalk, modules: dict[str, nn.Module], report: PruneReport,
                 layer_kwargs: dict[str, Any], heldout_fraction: float,
                 prior_masks: dict[str, torch.Tensor] | None, folds: int | None = None) -> None:
        self.walk, self.modules, self.report = walk, modules, report
        self.layer_kwargs, self.heldout_fraction, self.prior_masks = layer_kwargs, heldout_fraction, prior_masks
        self.folds = folds
        uncertainty = str(layer_kwargs.get("uncertainty", "")).strip().lower()
        self.streamed = uncertainty == "auto" or canonical_set_name(uncertainty) in CLOSED_FORM_SETS
        self.inside: dict[str, list[str]] = {}
        self.undo = WeightUndo()  # originals in host memory within a budget, on disk past it
        self._shared: tuple[Any, Any, Any] | None = None

        def restore() -> None:
            for name, value in self.undo.saved():  # (accelerate-offloaded weights: into their weights_map)
                write_weight(modules[name], value)
            report.masks.clear()
            report.resumed.clear()

        walk.on_undo(restore)
        walk.on_close(self.undo.close)

    def _inputs(self, name: str, x: torch.Tensor) -> tuple[LayerInputs, LayerInputs | None]:
        if self._shared is not None and self._shared[0] is x:
            return self._shared[1], self._shared[2]
        self._shared = None  # drop the previous layer's Grams first
        # Under torch.distributed each rank keeps its own samples; LayerInputs sums the partial
        # Grams (and gathers per-sample losses) across ranks, and a NaN on any rank fails all.
        inputs, heldout = split_heldout(x, self.heldout_fraction, name)
        inputs = LayerInputs(inputs, name=f"{name}: calibration inputs", distributed=True)
        if heldout is not None:
            heldout = LayerInputs(heldout, name=f"{name}: held-out inputs", distributed=True)
        self._shared = (x, inputs, heldout)
        return inputs, heldout

    def prune_linear(self, name: str, x: torch.Tensor) -> None:
        self._prune(name, *self._inputs(name, x))

    def _prune(self, name: str, inputs: LayerInputs | GramInputs, heldout: LayerInputs | GramInputs | None) -> None:
        self.walk.current = name
        module = self.modules[name]
        flip = is_transposed(module)  # GPT-2's Conv1D: masks are kept in the parameter's (in, out) layout
        prior = None if self.prior_masks is None or name not in self.prior_masks else self.prior_masks[name]
        if prior is not None and flip:
            prior = prior.T
        with materialized(module):  # an accelerate-offloaded weight is loaded for the solve
            weight = layer_weight(module)
            with self.walk.timed("solve"):
                try:
                    result = prune_layer(weight.detach(), inputs, heldout=heldout, name=name,
                                         prior_mask=None if prior is None else prior.to(weight.device),
                                         **self.layer_kwargs)
                finally:
                    inputs.release()
            self.walk.check_ranks(name, result.mask, "masks")
            with self.walk.timed("io"):
                self.undo.save(name, weight)
            write_weight(module, result.weight)
        self.report.masks[name] = (result.mask.T if flip else result.mask).detach().to("cpu", copy=True)
        self.report.layers.append(result.to_row(name, weight.shape))

    def _streamed(self, walk: BlockWalk, block: nn.Module, names: list[str]) -> dict[str, tuple[Any, Any]]:
        """Each target's (calibration, held-out) statistics, accumulated as the batches pass."""
        expected = walk.samples()
        held = heldout_count(expected, self.heldout_fraction, names[0])

        def make(lname: str) -> GramAccumulator:
            return GramAccumulator(layer_weight(self.modules[lname]).shape[1], walk.device, folds=self.folds,
                                   expected=expected if held else None, heldout=held,
                                   name=f"{lname}: calibration inputs")

        accs = walk.accumulate(block, {n: self.modules[n] for n in names}, make)
        finished: dict[int, GramInputs] = {}
        with walk.timed("capture"):
            for n in names:
                if id(accs[n]) not in finished:
                    finished[id(accs[n])] = accs[n].finish(distributed=True)
        stats = {n: finished[id(accs[n])] for n in names}
        for g in finished.values():  # layers sharing inputs share their factorisations (released in _prune)
            g.consumers = sum(1 for n in names if stats[n] is g)
        return {n: (g, g.heldout) for n, g in stats.items()}

    def prune_block(self, walk: BlockWalk, name: str, block: nn.Module) -> list[str]:
        names = self.inside[name]
        if self.streamed:
            try:
                stats = self._streamed(walk, block, names)
            except StatsUnavailable:
                stats = None  # keep the activations instead (see the class docstring)
            if stats is not None:
                for n in names:
                    self._prune(n, *stats.pop(n))
                return names
        captured = walk.capture(block, {n: self.modules[n] for n in names})
        for n in names:
            self.prune_linear(n, captured.pop(n))
        del captured
        self._shared = None
        return names

    def save(self, names: list[str]) -> tuple[list[dict[str, Any]], dict[str, torch.Tensor]]:
        tensors = {f"{n}.weight": read_weight(self.modules[n]) for n in names}
        tensors.update({f"{n}.mask": self.report.masks[n] for n in names})
        return self.report.layers[-len(names):], tensors

    def restore(self, rows: list[dict[str, Any]], tensors: dict[str, torch.Tensor]) -> None:
        for row in rows:
            name = row["name"]
            self.undo.save(name, read_weight(self.modules[name]))
            write_weight(self.modules[name], tensors[f"{name}.weight"])
            self.report.masks[name] = tensors[f"{name}.mask"]
            self.report.layers.append(row)
            self.report.resumed.append(name)


def _coverage(job: Job) -> dict[str, Any] | None:
    """Matrices inside the blocks left dense (fused MoE tensors...), with a warning; ``None`` when all are pruned."""
    dense = left_dense(job.model, job.names, job.block_names)
    if not dense:
        return None
    kept = sum(dense.values())
    coverage = {"matrices_left_dense": len(dense),
                "fraction_left_dense": kept / (kept + sum(m.weight.numel() for m in job.modules.values()))}
    warnings.warn(
        f"{len(dense)} weight matrices inside the blocks are not pruned ({coverage['fraction_left_dense']:.1%} of "
        f"the blocks' matrix weights stay dense), such as {', '.join(list(dense)[:3])}. Only nn.Linear and "
        "GPT-2 Conv1D layers are pruned: fused mixture-of-experts tensors (one parameter for all experts of a "
        "layer) are not yet.", RuntimeWarning, stacklevel=4)
    return coverage


def _report(job: Job, coverage: dict[str, Any] | None) -> PruneReport:
    c = job.config
    return PruneReport(config={
        "sparsity": parse_pattern(c.pattern, c.sparsity).sparsity,
        "pattern": c.pattern,
        "solver": c.solver,
        **({"solver_default": job.solver_default} if job.solver_default else {}),
        "curvature": "gram",
        **({"curvature_default": job.curvature_default} if job.curvature_default else {}),
        **({"coverage": coverage} if coverage else {}),
        "uncertainty": c.uncertainty,
        "radius": c.radius,
        "heldout_fraction": c.heldout_fraction,
        "blocks": job.container,
        "calibration_batches": len(job.batches),
        "coupled": c.coupled,
        "rounds": c.rounds,
        "damping": c.damping,
        **({"auto": dataclasses.asdict(AutoOptions.coerce(c.auto))} if c.choose else {}),
    })


def _walk_order(job: Job, step: MaskStep, walk: BlockWalk) -> None:
    """Prune the targets: blocks in order, linears outside them before or after, in forward order."""
    modules, batches = job.modules, job.batches
    if job.container is None:
        walk.linears(step, forward_order(job.model, modules, batches[0], job.forward, job.home), modules,
                     "pruning layers")
        return
    step.inside = {b: [n for n in job.names if n.startswith(b + ".")] for b, _ in job.block_list}
    outside = [n for n in job.names if not any(n in group for group in step.inside.values())]
    before, after = [], []
    if outside:
        first_block, first = job.block_list[0]
        order = forward_order(job.model, {**{n: modules[n] for n in outside}, first_block: first}, batches[0],
                              job.forward, job.home)
        split = order.index(first_block)
        before, after = order[:split], order[split + 1:]
    walk.linears(step, before, modules)
    walk.blocks(step, job.block_list, has_work=lambda b: bool(step.inside[b]))
    walk.linears(step, after, modules)


def prune_masks(job: Job) -> PruneReport:
    """Prune ``job``'s targets with a mask each (see the module docstring)."""
    c = job.config
    coverage = _coverage(job)
    shape_check = parse_pattern(c.pattern, c.sparsity)
    for name, module in job.modules.items():  # fail before any work, not after the earlier blocks
        shape_check.check_shape(*layer_weight(module).shape, name)
    report = _report(job, coverage)
    identity = {**{k: v for k, v in report.config.items() if k not in ("coverage", "solver_default", "curvature_default")},
                "solver_options": c.solver_options}
    first_name, first = next(iter(job.modules.items()))
    walk = job.open_walk(identity, {n: m.weight for n, m in job.modules.items()}, dtype=(first_name, first.weight.dtype))
    step = MaskStep(walk, job.modules, report, c.layer_options(), c.heldout_fraction, job.prior_masks,
                    folds=AutoOptions.coerce(c.auto).folds if c.choose else None)
    with walk.transaction():
        _walk_order(job, step, walk)
    return job.finish(report, walk)
