"""Structured RobOP: remove whole heads and MLP channels of every block, physically.

Block by block (the pipeline of docs/method.md): each unit of :mod:`robop_lightning.pipeline.surgery` (attention, then MLP) is
chosen by robust structured OBS (:func:`robop_lightning.engine.solvers.structured_obs.select_groups`) from
its consumer's calibration inputs, then the block shrinks and its outputs feed the next block.
Budgets are per block (``budget="layer"``) or one ranking over the model (``"global"``, in
parameters or FLOPs). ``prune_model(pattern="structured")`` calls :func:`prune_model_structured`.
Shrunk models save and load:

* Lightning: ``DeiTClassifier.load_from_checkpoint(path)`` / ``CausalLMModule.load_from_checkpoint(path)``
  (the checkpoint carries the shapes; the module's ``on_load_checkpoint`` shrinks before loading);
* plain PyTorch / HF: ``save_structured(model, directory)`` then
  ``load_structured(directory, model_factory)`` (or ``load_structured(directory)`` for a Hugging Face
  directory, rebuilt from its ``config.json``).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from robop_lightning.config import PruneConfig, StructuredOptions
from robop_lightning.engine.gram import LayerInputs
from robop_lightning.engine.solvers.structured_obs import select_groups
from robop_lightning.pipeline.job import Job, prepare_job
from robop_lightning.pipeline.surgery import Unit, block_units, load_structured, mark_shrunk, record_config, save_structured
from robop_lightning.pipeline.walk import BlockWalk, split_heldout
from robop_lightning.report import PruneReport

__all__ = ["STRUCTURED_OPTIONS", "ShrinkStep", "load_structured", "prune_model_structured", "save_structured", "shrink"]

# the options of prune_model(pattern="structured", solver_options=...) and RobOPCallback(structured_options=...)
STRUCTURED_OPTIONS = ("budget", "cost", "min_keep", "max_sparsity", "per_step")


def _allocate(plans: list[dict[str, Any]], target: float) -> None:
    """Global budget: take greedy steps from any unit by increasing marginal relative loss per cost.

    Each unit's marginals are made non-decreasing (running max), so its steps are taken in order.
    Sets ``plan["remove"]``; stops once the removed cost reaches ``target``.
    """
    steps = []
    for u, plan in enumerate(plans):
        prev, worst, done = 0.0, 0.0, 0
        for j, (size, loss) in enumerate(zip(plan["steps"], plan["trajectory"], strict=True)):
            marginal = max(loss - prev, 0.0) / (size * plan["cost"])
            worst = max(worst, marginal)
            done += size
            steps.append((worst, u, j, done, size * plan["cost"]))
            prev = loss
        plan["remove"] = 0
    steps.sort(key=lambda s: (s[0], s[2], s[1]))
    removed = 0.0
    for _, u, _, done, c in steps:
        if removed >= target:
            break
        plans[u]["remove"] = max(plans[u]["remove"], done)
        removed += c


def _balance_block(plans: list[dict[str, Any]], sparsity: float, min_keep: int) -> None:
    """Per-layer budget: make each block lose ``sparsity`` of its parameters, not each unit.

    Rounding every unit on its own over- or under-shoots on models with few heads (3 heads at 50 %:
    ``round(1.5) = 2``, 67 % of the attention). The coarsest unit (attention) is rounded down or up,
    whichever lets the finer units (MLP channels) hit the block's share closest, fewer heads removed
    on a tie; the finer units then share the remainder in proportion to their size.
    """
    if len(plans) < 2 or sparsity <= 0:
        return
    plans = sorted(plans, key=lambda p: -p["unit"].params_per_group)
    coarse, fine = plans[0], plans[1:]
    cu = coarse["unit"]
    total = sum(p["unit"].params_per_group * p["unit"].n_groups for p in plans)
    target = sparsity * total
    top = cu.n_groups - min_keep
    grain = max(p["unit"].params_per_group for p in fine)
    fine_total = sum(p["unit"].params_per_group * p["unit"].n_groups for p in fine)
    best = None
    for r in sorted({min(math.floor(sparsity * cu.n_groups), top), min(math.ceil(sparsity * cu.n_groups), top)}):
        share = min(max((target - r * cu.params_per_group) / fine_total, 0.0), 1.0)
        removes = [min(int(round(share * p["unit"].n_groups)), p["unit"].n_groups - min_keep) for p in fine]
        got = r * cu.params_per_group + sum(k * p["unit"].params_per_group for k, p in zip(removes, fine, strict=True))
        # within one MLP channel of each other counts as a tie: keep the extra head
        if best is None or abs(got - target) < best[0] - grain:
            best = (abs(got - target), r, removes)
    _, coarse["remove"], removes = best
    for p, k in zip(fine, removes, strict=True):
        p["remove"] = k


def prune_model_structured(
    model: nn.Module,
    calibration: Iterable[Any],
    sparsity: float = 0.5,
    uncertainty: str = "trace",
    radius: float | None = None,
    budget: str = "layer",
    cost: str = "params",
    targets: list[str] | str | None = None,
    ignore: list[str] | str | None = None,
    blocks: str | None = None,
    forward: Callable[[nn.Module, Any], Any] | None = None,
    coupled: bool | None = None,
    rounds: int = 3,
    damping: float = 0.01,
    min_keep: int = 1,
    max_sparsity: float = 0.9,
    per_step: int | None = None,
    progress: bool | None = None,
    heldout_fraction: float = 0.0,
    resume_dir: str | Path | None = None,
    activation_budget: int | str | None = None,
    device: str | torch.device | None = None,
) -> PruneReport:
    """Remove whole heads / KV groups and MLP channels of every block, physically, in place.

    Block by block: the attention unit is pruned first from the block's calibration
    inputs, then the MLP unit from inputs that went through the pruned attention, then the pruned
    block's outputs feed the next block. Each unit runs :func:`select_groups` (robust structured OBS
    with exact compensation of the consumer, bias included) and the block shrinks.

    Args:
        model: a timm ViT / DeiT, a Hugging Face decoder (``LlamaForCausalLM`` and relatives) or a
            module containing one (a LightningModule works).
        calibration: batches, as for :func:`robop_lightning.prune_model`.
        sparsity: fraction of the block parameters removed (weights and biases of q/k/v/o or
            qkv/proj and of the MLP linears; consumer biases and norms are not counted), in ``[0, 1)``.
        uncertainty, radius, coupled, rounds, damping: the uncertainty set and engine options, as in
            :func:`robop_lightning.prune_layer`.
        budget: ``"layer"``: every block loses ``sparsity`` of its parameters (its attention rounded to
            whole heads / KV groups, its MLP channels making up the rest; a unit alone in its block
            loses ``round(sparsity * groups)`` groups); ``"global"``: one
            ranking over all units by marginal relative loss per ``cost`` (a first pass on the dense model
            records every unit's greedy loss trajectory), until the removed cost reaches the share.
        cost: what the global budget counts: ``"params"`` or ``"flops"`` (per token, attention included).
        targets, ignore: linears whose units are pruned / left alone (names or ``"re:<regex>"``,
            matched against the consumers ``attn.proj``, ``mlp.fc2``, ``o_proj``, ``down_proj``).
        blocks: dotted name of the block list (``None``: found automatically).
        forward: ``forward(model, batch)`` for unusual batches.
        min_keep: groups every unit keeps (at least 1: a block with no head cannot run).
        max_sparsity: the largest share of groups any unit may lose under the global budget.
        per_step: groups removed per greedy step (``None``: 1 up to 256 groups, else 1/256 of them).
        progress: progress bar over blocks (``None``: on a terminal).
        heldout_fraction, resume_dir, activation_budget, device: as in :func:`robop_lightning.prune_model`
            (held-out errors per unit; a resumable run, bit-identical after an interruption;
            activations beyond a budget on disk; blocks onloaded to ``device`` one at a time).

    Returns:
        A :class:`robop_lightning.PruneReport`: one row per unit (``name`` = the consumer, ``shape`` its
        new shape, ``parameters`` the unit's prunable parameters before, ``sparsity`` the share removed,
        errors, ``removed``: the original indices of the removed heads / KV groups / channels,
        ``kept``: how many stay). ``config["params_removed"]`` / ``config["flops_removed"]`` give the
        achieved shares.

    Raises:
        ValueError: sparsity / budget out of range, a block type that is not supported (naming it),
            no blocks found. On any exception the model is restored exactly.

    Example:
        >>> import timm, torch
        >>> vit = timm.create_model("deit_tiny_patch16_224", img_size=32, patch_size=8, embed_dim=48,
        ...                         depth=2, num_heads=4, num_classes=3).eval()
        >>> report = prune_model_structured(vit, [torch.randn(8, 3, 32, 32)], sparsity=0.5, uncertainty="baseline")
        >>> vit.blocks[0].attn.num_heads, vit.blocks[0].mlp.fc1.out_features, round(report.totals["sparsity"], 2)
        (2, 96, 0.5)
    """
    config = PruneConfig(sparsity=sparsity, pattern="structured", uncertainty=uncertainty, radius=radius,
                         coupled=coupled, rounds=rounds, damping=damping,
                         solver_options=StructuredOptions(budget=budget, cost=cost, min_keep=min_keep,
                                                          max_sparsity=max_sparsity, per_step=per_step),
                         targets=targets, ignore=ignore, blocks=blocks, heldout_fraction=heldout_fraction,
                         resume_dir=resume_dir, activation_budget=activation_budget,
                         device=None if device is None else str(device))
    return shrink(prepare_job(model, calibration, config, forward=forward, progress=progress))


def _plans(job: Job, units: list[tuple[int, Unit]], opts: StructuredOptions) -> list[dict[str, Any]]:
    """One plan per unit: how many groups it loses (per block, balanced; refined by the global budget)."""
    sparsity = float(job.config.sparsity)
    return [
        {
            "unit": u,
            "block": job.block_list[i][0],
            "remove": min(int(round(sparsity * u.n_groups)), u.n_groups - opts.min_keep),
            "max": min(int(math.floor(opts.max_sparsity * u.n_groups)), u.n_groups - opts.min_keep),
        }
        for i, u in units
    ]


def _report(job: Job, opts: StructuredOptions) -> PruneReport:
    c = job.config
    return PruneReport(
        config={
            "sparsity": float(c.sparsity),
            "pattern": "structured",
            "solver": "structured-obs",
            "uncertainty": c.uncertainty,
            "radius": c.radius,
            "budget": opts.budget,
            "cost": opts.cost,
            "blocks": job.container,
            "calibration_batches": len(job.batches),
            "coupled": c.coupled,
            "rounds": c.rounds,
            "damping": c.damping,
            **({"heldout_fraction": c.heldout_fraction} if c.heldout_fraction else {}),
        }
    )


def shrink(job: Job) -> PruneReport:
    """Remove ``job``'s heads and channels block by block (see :func:`prune_model_structured`)."""
    c, opts = job.config, job.config.structured_options
    chosen = set(job.names)
    units = [(i, unit) for i, (bname, block) in enumerate(job.block_list) for unit in block_units(block, bname)
             if unit.consumer_name in chosen]
    if not units:
        raise ValueError(
            "pattern='structured': no unit to prune; targets / ignore must select consumers such as "
            "'re:attn.proj', 're:mlp.fc2', 're:o_proj' or 're:down_proj'."
        )
    engine = dict(uncertainty=c.uncertainty, radius=c.radius, coupled=c.coupled, rounds=c.rounds, damping=c.damping,
                  per_step=opts.per_step)
    report = _report(job, opts)
    plans = _plans(job, units, opts)
    by_block: dict[str, list[dict[str, Any]]] = {}
    for p in plans:
        by_block.setdefault(p["block"], []).append(p)
    if opts.budget == "layer":
        for block_plans in by_block.values():
            _balance_block(block_plans, float(c.sparsity), opts.min_keep)
    identity = {**report.config, "min_keep": opts.min_keep, "max_sparsity": opts.max_sparsity, "per_step": opts.per_step}
    walk = job.open_walk(identity, {u.consumer_name: u.consumer.weight for _, u in units},
                         restored_note="the model was restored")
    step = ShrinkStep(walk, by_block, engine, report, c.heldout_fraction, [b for _, b in job.block_list])
    with walk.transaction():
        if opts.budget == "global" and c.sparsity > 0:
            walk.blocks(step.planner(), job.block_list, has_work=lambda b: b in by_block, desc="planning blocks",
                        checkpoint=False)
            measure = ((lambda u: u.params_per_group) if opts.cost == "params"
                       else (lambda u: u.flops_per_token(step.tokens)))
            for p in plans:
                p["cost"] = float(measure(p["unit"]))
            _allocate(plans, c.sparsity * sum(p["cost"] * p["unit"].n_groups for p in plans))
        walk.blocks(step, job.block_list, has_work=lambda b: b in by_block)
    for key, fn in (("params", lambda u: u.params_per_group), ("flops", lambda u: u.flops_per_token(step.tokens))):
        total = sum(u.n_groups * fn(u) for _, u in units)
        removed = sum(p["remove"] * fn(p["unit"]) for p in plans)
        report.config[f"{key}_removed"] = removed / total if total else 0.0
    record_config(job.model)
    return job.finish(report, walk)


class ShrinkStep:
    """Structured pruning as a :class:`robop_lightning.pipeline.walk.Step`: a shrink per unit.

    In each block the units run in order (attention, then MLP from inputs that went through the
    pruned attention): structured OBS chooses the groups, the block shrinks (its undo is
    registered with the walk) and a report row is recorded.
    """

    def __init__(self, walk: BlockWalk, plans: dict[str, list[dict[str, Any]]], engine: dict[str, Any],
                 report: PruneReport, heldout_fraction: float, blocks: list[nn.Module]) -> None:
        self.walk, self.plans, self.engine, self.report = walk, plans, engine, report
        self.heldout_fraction = heldout_fraction
        self.tokens = 1  # the calibration sequence length (FLOPs of attention)
        self._units = {p["unit"].consumer_name: (p["unit"], p["block"]) for ps in plans.values() for p in ps}
        premarked = {id(b) for b in blocks if getattr(b, "_robop_structured", False)}

        def unmark() -> None:
            for b in blocks:
                if id(b) not in premarked and hasattr(b, "_robop_structured"):
                    del b._robop_structured

        walk.on_undo(unmark)

    def _inputs(self, walk: BlockWalk, block: nn.Module, unit: Unit) -> tuple[LayerInputs, LayerInputs | None]:
        x = walk.capture(block, {unit.consumer_name: unit.consumer})[unit.consumer_name]
        self.tokens = x.shape[1]
        x, held = split_heldout(x, self.heldout_fraction, unit.consumer_name)
        name = unit.consumer_name
        return (LayerInputs(x, name=f"{name}: calibration inputs", distributed=True),
                None if held is None else LayerInputs(held, name=f"{name}: held-out inputs", distributed=True))

    def planner(self) -> _PlanStep:
        return _PlanStep(self)

    def prune_block(self, walk: BlockWalk, name: str, block: nn.Module) -> list[str]:
        for p in self.plans[name]:
            u = p["unit"]
            walk.current = u.consumer_name
            x, held = self._inputs(walk, block, u)
            r = select_groups(u.consumer.weight.detach(), x, u.groups(), p["remove"], bias=u.consumer.bias,
                              name=u.consumer_name, heldout=held, **self.engine)
            del x, held
            walk.check_ranks(u.consumer_name, torch.tensor(r.kept), "groups")
            if p["remove"] > 0:
                walk.on_undo(u.apply(torch.tensor(r.kept), r.weight, r.bias))
                mark_shrunk(block)
            self.report.layers.append(r.to_row(u.consumer_name, u.consumer.weight.shape, u.name, u.kind,
                                               u.params_per_group))
        return [p["unit"].consumer_name for p in self.plans[name]]

    def prune_linear(self, name: str, inputs: torch.Tensor) -> None:  # pragma: no cover - units live in blocks
        raise NotImplementedError("structured pruning works on blocks")

    def save(self, names: list[str]) -> tuple[list[dict[str, Any]], dict[str, torch.Tensor]]:
        tensors = {"tokens": torch.tensor(self.tokens)}
        for n in names:
            consumer = self._units[n][0].consumer
            tensors[f"{n}.weight"] = consumer.weight
            if consumer.bias is not None:
                tensors[f"{n}.bias"] = consumer.bias
        return self.report.layers[-len(names):], tensors

    def restore(self, rows: list[dict[str, Any]], tensors: dict[str, torch.Tensor]) -> None:
        self.tokens = int(tensors["tokens"])
        for row in rows:
            name = row["name"]
            unit, block_name = self._units[name]
            if row["removed"]:
                keep = sorted(set(range(row["groups"])) - set(row["removed"]))
                self.walk.on_undo(unit.apply(torch.tensor(keep), tensors[f"{name}.weight"], tensors.get(f"{name}.bias")))
                mark_shrunk(self.walk.model.get_submodule(block_name))
            self.report.layers.append(row)
            self.report.resumed.append(name)


class _PlanStep:
    """The global budget's first pass: every unit's greedy loss trajectory on the dense model."""

    def __init__(self, shrink: ShrinkStep) -> None:
        self.shrink = shrink

    def prune_block(self, walk: BlockWalk, name: str, block: nn.Module) -> list[str]:
        for p in self.shrink.plans[name]:
            u = p["unit"]
            x, _ = self.shrink._inputs(walk, block, u)
            r = select_groups(u.consumer.weight.detach(), x, u.groups(), 0, bias=u.consumer.bias,
                              trajectory_to=p["max"], name=u.consumer_name, **self.shrink.engine)
            p["trajectory"], p["steps"] = r.trajectory, r.steps
        return []

    def prune_linear(self, name: str, inputs: torch.Tensor) -> None:  # pragma: no cover - units live in blocks
        raise NotImplementedError("structured pruning works on blocks")

    def save(self, names):  # pragma: no cover - the planning pass is never checkpointed
        raise NotImplementedError

    def restore(self, rows, tensors):  # pragma: no cover
        raise NotImplementedError
