"""``prune_model``: prune every target linear of a model block by block (SPEC §5), plain PyTorch.

The pipeline, for a model with repeated blocks (timm ``blocks``, Hugging Face ``model.layers``)::

    record the first block's inputs for every batch (the forward stops there: embeddings etc. run once)
    for each block (with the arguments the model passes that block):
        run the block, adding each batch's inputs of its target linears into their Grams
            (all from the same block input; nothing else is kept)
        prune every target with prune_layer
        run the pruned block again: its outputs are the next block's inputs

A model without repeated blocks (an MLP) has its linears pruned one at a time in forward order,
each from inputs that already went through the pruned earlier layers. Targets outside the blocks
(named explicitly) are pruned the same way, before or after the blocks.

The whole call is a transaction: every target weight is copied (host memory, or disk past a budget)
before it is overwritten and restored on any exception (``KeyboardInterrupt`` included), so a
failure leaves the model exactly as it was.
"""

from __future__ import annotations

import dataclasses
import math
import time
import warnings
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from robop_lightning.pipeline.calibration import default_forward, forward_order
from robop_lightning.config import PruneConfig, StructuredOptions
from robop_lightning.pipeline.dispatch import execution_device, layer_weight, materialized, read_weight, write_weight
from robop_lightning.pipeline.fisher_step import FisherOptions, prune_model_fisher
from robop_lightning.engine.gram import GramAccumulator, GramInputs, LayerInputs, StatsUnavailable
from robop_lightning.engine.layer import prune_layer
from robop_lightning.utils.offload import WeightUndo
from robop_lightning.engine.patterns import parse_pattern
from robop_lightning.pipeline.walk import BlockWalk, heldout_count, open_resume_store, split_heldout
from robop_lightning.report import PruneReport
from robop_lightning.engine.selection import AutoOptions
from robop_lightning.pipeline.shrink_step import prune_model_structured
from robop_lightning.pipeline.targets import default_solver, find_blocks, is_transposed, left_dense, resolve_targets
from robop_lightning.engine.sets import CLOSED_FORM_SETS, canonical_set_name

__all__ = ["PruneReport", "prune_model"]

def _check_shared_weights(model: nn.Module, modules: dict[str, nn.Module]) -> None:
    """Refuse targets whose weight tensor is also held elsewhere (tied or shared weights).

    Pruning writes the weight in place, so a shared tensor would be changed for every holder
    while being calibrated for one: an embedding tied to ``lm_head`` would lose entries chosen
    for the head, and two targets sharing a weight would each prune it for their own inputs.
    """
    holders: dict[int, list[str]] = {}
    for mname, module in model.named_modules(remove_duplicate=False):
        for pname, param in module._parameters.items():
            if param is not None:
                holders.setdefault(id(param), []).append(f"{mname}.{pname}" if mname else pname)
    for name, module in modules.items():
        others = [h for h in dict.fromkeys(holders.get(id(module.weight), [])) if h != f"{name}.weight"]
        if not others:
            continue
        owners = [o.rsplit(".", 1)[0] for o in others]
        shared_targets = [o for o in owners if o in modules]
        if shared_targets:
            raise ValueError(
                f"{name}: its weight is the same tensor as {shared_targets[0]}.weight (weights shared between "
                f"layers); pruning both would prune that tensor twice, each time for other inputs. Untie them first "
                f"(give {shared_targets[0]} its own copy: nn.Parameter(weight.detach().clone())), or leave both out "
                f"of the targets (ignore=[{name!r}, {shared_targets[0]!r}])."
            )
        raise ValueError(
            f"{name}: its weight is tied to {others[0]} (weights shared with another module, such as an embedding "
            f"tied to lm_head); pruning {name} would also zero entries of {owners[0]}, calibrated for {name} only. "
            f"Leave {name} out of the targets, or untie the weights first (give {name} its own copy of the weight; "
            "for Hugging Face models set config.tie_word_embeddings=False)."
        )


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
                result = prune_layer(weight.detach(), inputs, heldout=heldout, name=name,
                                     prior_mask=None if prior is None else prior.to(weight.device), **self.layer_kwargs)
            self.walk.check_ranks(name, result.mask, "masks")
            with self.walk.timed("io"):
                self.undo.save(name, weight)
            write_weight(module, result.weight)
        self.report.masks[name] = (result.mask.T if flip else result.mask).detach().to("cpu", copy=True)
        self.report.layers.append(
            {
                "name": name,
                "shape": list(weight.shape),
                "parameters": weight.numel(),
                "sparsity": float(result.sparsity),
                "nominal_error": float(result.nominal_error),
                "robust_error": float(result.robust_error),
                "heldout_error": None if result.heldout_error is None else float(result.heldout_error),
                "srank": None if result.srank is None or not math.isfinite(result.srank) else float(result.srank),
                "seconds": float(result.seconds),
                **({"selection": result.selection} if result.selection is not None else {}),
            }
        )

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


def prune_model(
    model: nn.Module,
    calibration: Iterable[Any],
    sparsity: float | None = 0.5,
    pattern: str = "unstructured",
    solver: str | None = None,
    uncertainty: str = "trace",
    radius: float | None = None,
    targets: list[str] | str | None = None,
    ignore: list[str] | str | None = None,
    blocks: str | None = None,
    heldout_fraction: float = 0.0,
    forward: Callable[[nn.Module, Any], Any] | None = None,
    progress: bool | None = None,
    prior_masks: dict[str, torch.Tensor] | None = None,
    resume_dir: str | Path | None = None,
    activation_budget: int | str | None = None,
    curvature: str = "gram",
    loss_fn: Callable[[nn.Module, Any], torch.Tensor] | None = None,
    fisher: FisherOptions | dict[str, Any] | None = None,
    *,
    coupled: bool | None = None,
    rounds: int = 3,
    damping: float = 0.01,
    solver_options: Any = None,
    auto: AutoOptions | dict[str, Any] | None = None,
    device: str | torch.device | None = None,
) -> PruneReport:
    """Prune the linear layers of ``model`` in place, block by block, with :func:`prune_layer`.

    Args:
        model: any ``nn.Module`` (a LightningModule works too); stays on its device.
        calibration: an iterable of batches, iterated once: tensors, tuples / lists (the first
            item is the input) or dicts (passed as keyword arguments).
        sparsity: fraction of weights set to zero in every target (``None``: implied by an
            ``N:M`` pattern).
        pattern: ``"unstructured"``, ``"row"``, ``"N:M"`` such as ``"2:4"``, or ``"structured"``:
            whole heads and MLP channels removed physically (:mod:`robop_lightning.pipeline.shrink_step`;
            ``solver_options`` may hold ``budget``, ``cost``, ``min_keep``, ``max_sparsity``, ``per_step``).
        solver: ``"alps"``, ``"cap"``, ``"sparsegpt"``, ``"wanda"`` or ``"magnitude"``; ``None``: ALPS
            (RobOP-ALPS) for a causal language model, CAP (RobOP-CAP) for anything else
            (:func:`robop_lightning.pipeline.targets.default_solver`; the report's ``config`` says which and why).
        uncertainty: ``"baseline"``, ``"trace"`` (default), ``"e"`` (``"ellipsoid"``) or ``"cte"``: the
            authors' closed forms, one solve; ``"minmax-trace"``, ``"minmax-e"``, ``"cvar"``: this
            project's min-max extension (:mod:`robop_lightning.engine.sets`).
        radius: the authors' ``gamma`` (``None``: 0.01; baseline: ``damping``), or ``rho`` /
            ``alpha`` for the extension.
        targets: linears to prune: module names (a container selects all linears in it) or
            ``"re:<regex>"`` patterns. ``None``: every linear inside the repeated blocks, or for a
            model without blocks every linear except output heads (``head``, ``head_dist``,
            ``lm_head``, ``classifier``, ``score``, or a linear named ``fc``).
        ignore: names or patterns left dense (wins over ``targets``).
        blocks: dotted name of the module list holding the blocks; ``None`` finds it.
        heldout_fraction: share of the calibration samples (the last ones) kept out of pruning
            and used to report each layer's held-out error.
        forward: ``forward(model, batch)`` for batches the default rule cannot run.
        progress: show a progress bar over blocks (``None`` / ``True``: only on a terminal).
        prior_masks: ``{layer name: keep-mask}`` of an earlier pruning (gradual schedules): those
            zeros stay, count towards the budget and are compensated by the solver.
        resume_dir: a directory that makes a long pruning resumable (see
            :mod:`robop_lightning.pipeline.resume`): every finished block (or linear pruned on its own) is
            written there atomically (``block-00012.safetensors`` plus ``manifest.json``). After a
            crash, SIGKILL or Ctrl-C, calling ``prune_model`` again with the same model, data,
            arguments and ``resume_dir`` loads the finished blocks, replays the calibration
            activations through them and continues: the result is bit-identical to an
            uninterrupted run. A directory written by a different job (other arguments, weights
            or calibration data) raises ``ValueError``. ``None``: nothing is written.
        activation_budget: bytes (or a size such as ``"2GB"``, ``"512MiB"``) of calibration
            activations held in memory; what exceeds it (hidden states between blocks, inputs
            captured for a block's linears) is kept in temporary files and read back in chunks
            (:mod:`robop_lightning.utils.offload`). Results equal the in-memory ones up to the float64
            summation order of the Grams. ``None``: everything stays in memory (CPU when the
            model is on an accelerator).
        curvature: ``"gram"`` (default): each layer's reconstruction error under its input Gram,
            block by block. ``"fisher"`` (``solver="cap"`` only): CAP's empirical block Fisher of the
            loss, OBS inside each block and one global threshold
            (:func:`robop_lightning.pipeline.fisher_step.prune_model_fisher`; needs ``loss_fn``).
        loss_fn: ``loss_fn(model, batch) -> (B,)`` per-sample losses, for ``curvature="fisher"``.
        fisher: :class:`robop_lightning.pipeline.fisher_step.FisherOptions` (or a dict): ``gradients``,
            ``block_size``, ``lam``, ``batch_size``, ``selection`` (``"global"`` / ``"uniform"``), ``method``.
        coupled, rounds, damping: engine options of :func:`prune_layer` (the extension's coupled
            form; rounds of the alternating scheme; the Baseline damping).
        solver_options: the solver's options (a dict or its dataclass from
            :mod:`robop_lightning.engine.solvers.options`); for ``pattern="structured"`` the keys of
            :class:`robop_lightning.config.StructuredOptions`.
        device: where blocks are calibrated and solved (``None``: where the model is). With the
            model on the host and ``device="cuda"``, the weights stay on the host and each block moves
            to the GPU for its capture and solving, then back (onloading): the GPU holds about one
            block, its activations and one layer's solver work. The result equals pruning with the
            whole model on ``device``.
        auto: how ``uncertainty="auto"`` / ``radius="auto"`` choose, per layer
            (:class:`robop_lightning.engine.selection.AutoOptions` or a dict); each report row then has a
            ``selection``: the chosen set and every candidate's held-out fold errors.

    All options are checked first, in one place (:class:`robop_lightning.config.PruneConfig`).

    Returns:
        A :class:`PruneReport` (``str(report)`` is a table; ``report.masks`` holds the masks).

    Raises:
        ValueError: empty calibration, NaN / Inf activations, bad arguments, targets that match
            nothing, a ``resume_dir`` of another job; the message names the layer. On any
            exception every weight is restored (the files in ``resume_dir`` stay, to resume from).
        RuntimeError: ranks of a process group ended with different masks.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4))
        >>> batches = [torch.randn(8, 16) for _ in range(4)]
        >>> report = prune_model(model, batches, sparsity=0.5, solver="sparsegpt", uncertainty="baseline")
        >>> round(report.totals["sparsity"], 2)
        0.5
    """
    config = PruneConfig(sparsity=sparsity, pattern=pattern, solver=solver, uncertainty=uncertainty, radius=radius,
                         coupled=coupled, rounds=rounds, damping=damping, solver_options=solver_options, auto=auto,
                         targets=targets, ignore=ignore, blocks=blocks, heldout_fraction=heldout_fraction,
                         resume_dir=resume_dir, activation_budget=activation_budget, curvature=curvature, fisher=fisher,
                         device=None if device is None else str(device))
    chosen_by = None
    if config.solver is None:
        solver, chosen_by = ("cap", "CAP's Fisher path") if curvature == "fisher" else default_solver(model)
        config = dataclasses.replace(config, solver=solver)
    if (curvature == "fisher" or config.structured) and any(is_transposed(m) for m in model.modules()):
        raise ValueError("GPT-2-style Conv1D layers are pruned with masks (pattern 'unstructured', 'row' or 'N:M'); "
                         "pattern='structured' and curvature='fisher' take nn.Linear layers only.")
    if curvature == "fisher":
        given = [k for k, v in (("prior_masks", prior_masks), ("forward", forward)) if v is not None]
        if given:
            raise ValueError(f"curvature='fisher' is CAP's: use solver='cap', without {', '.join(given)} "
                             "(layer-reconstruction options).")
        return prune_model_fisher(model, calibration, loss_fn, sparsity=sparsity, pattern=pattern,
                                  uncertainty=config.uncertainty, radius=radius, targets=targets, ignore=ignore,
                                  blocks=blocks, fisher=fisher)
    if loss_fn is not None:
        raise ValueError("loss_fn and fisher apply to curvature='fisher' only.")
    if config.structured:
        # whole heads / channels removed physically: robop_lightning.pipeline.shrink_step (issue 7)
        if prior_masks:
            raise ValueError("pattern='structured' removes modules physically; prior_masks (gradual schedules) do not apply.")
        return prune_model_structured(
            model, calibration, sparsity=0.5 if sparsity is None else sparsity, uncertainty=config.uncertainty,
            radius=radius, targets=targets, ignore=ignore, blocks=blocks, forward=forward, progress=progress,
            heldout_fraction=heldout_fraction, resume_dir=resume_dir, activation_budget=activation_budget,
            coupled=coupled, rounds=rounds, damping=damping, device=device,
            **dataclasses.asdict(StructuredOptions.coerce(solver_options)),
        )
    start = time.perf_counter()
    forward = forward or default_forward
    structure = find_blocks(model, blocks)
    block_list = structure[1] if structure else []
    names = resolve_targets(model, targets, ignore, [b for b, _ in block_list] if structure else None)
    modules = {n: model.get_submodule(n) for n in names}
    _check_shared_weights(model, modules)
    dense = left_dense(model, names, [b for b, _ in block_list] if structure else None)
    coverage = None
    if dense:
        kept = sum(dense.values())
        coverage = {"matrices_left_dense": len(dense),
                    "fraction_left_dense": kept / (kept + sum(m.weight.numel() for m in modules.values()))}
        warnings.warn(
            f"{len(dense)} weight matrices inside the blocks are not pruned ({coverage['fraction_left_dense']:.1%} of "
            f"the blocks' matrix weights stay dense), such as {', '.join(list(dense)[:3])}. Only nn.Linear and "
            "GPT-2 Conv1D layers are pruned: fused mixture-of-experts tensors (one parameter for all experts of a "
            "layer) are not yet.", RuntimeWarning, stacklevel=2)
    shape_check = parse_pattern(pattern, sparsity)
    for name, module in modules.items():  # fail before any work, not after the earlier blocks
        shape_check.check_shape(*layer_weight(module).shape, name)

    batches = list(calibration)
    if not batches:
        raise ValueError("calibration is empty: pass an iterable with at least one batch.")
    home = next(iter(modules.values())).weight.device
    dispatched = execution_device(model)  # accelerate keeps (some) weights off the device and onloads per forward
    if dispatched is not None:
        if device is not None and torch.device(device) != dispatched:
            raise ValueError(f"the model is dispatched by accelerate to run on {dispatched}; its hooks already onload "
                             f"the weights, so pass device=None (or {str(dispatched)!r}).")
        if resume_dir is not None:
            raise ValueError("resume_dir is not supported for accelerate-offloaded models yet (their weights are not "
                             "in the model's state_dict); prune without it, or load the model onto the host.")
        home = dispatched
    report = PruneReport(
        config={
            "sparsity": parse_pattern(pattern, sparsity).sparsity,
            "pattern": pattern,
            "solver": config.solver,
            **({"solver_default": chosen_by} if chosen_by else {}),
            **({"coverage": coverage} if coverage else {}),
            "uncertainty": config.uncertainty,
            "radius": radius,
            "heldout_fraction": heldout_fraction,
            "blocks": structure[0] if structure else None,
            "calibration_batches": len(batches),
            "coupled": coupled,
            "rounds": rounds,
            "damping": damping,
            **({"auto": dataclasses.asdict(AutoOptions.coerce(auto))} if config.choose else {}),
        }
    )
    store = None
    if resume_dir is not None:
        job = {**{k: v for k, v in report.config.items() if k not in ("coverage", "solver_default")},
               "solver_options": solver_options}
        store = open_resume_store(resume_dir, model, {n: m.weight for n, m in modules.items()}, batches, job, prior_masks)
    first_name, first = next(iter(modules.items()))
    walk = BlockWalk(model, batches, forward, home if device is None else torch.device(device),
                     activation_budget=activation_budget, progress=progress, resume=store,
                     dtype=(first_name, first.weight.dtype), home=home)
    step = MaskStep(walk, modules, report, config.layer_options(), heldout_fraction, prior_masks,
                    folds=AutoOptions.coerce(auto).folds if config.choose else None)
    with walk.transaction():
        if not structure:
            walk.linears(step, forward_order(model, modules, batches[0], forward, home), modules, "pruning layers")
        else:
            step.inside = {b: [n for n in names if n.startswith(b + ".")] for b, _ in block_list}
            outside = [n for n in names if not any(n in group for group in step.inside.values())]
            before, after = [], []
            if outside:  # linears outside the blocks run before or after them, in forward order
                first_block = block_list[0][0]
                order = forward_order(model, {**{n: modules[n] for n in outside}, first_block: block_list[0][1]},
                                      batches[0], forward, home)
                split = order.index(first_block)
                before, after = order[:split], order[split + 1 :]
            walk.linears(step, before, modules)
            walk.blocks(step, block_list, has_work=lambda b: bool(step.inside[b]))
            walk.linears(step, after, modules)
    report.seconds = time.perf_counter() - start
    report.blocks = walk.block_times
    report.peak_memory = walk.peak_memory
    return report
