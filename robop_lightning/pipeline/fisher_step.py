"""RobOP-CAP with CAP's curvature: prune a model's linears with the empirical block Fisher of its loss.

The :class:`FisherStep` of a pruning job (maths in :mod:`robop_lightning.engine.solvers.fisher_obs`)::

    take m calibration samples (with their labels)
    pass 1, for each target linear (a unit of the walk, checkpointed in resume_dir):
        accumulate H_b = sum_k g_kb g_kb^T over the m per-sample gradients (vmap, in batches)
        F_b^-1 under the uncertainty set (Baseline: CAP's lam I + H_b / m)
        eliminate every weight of every block by OBS; keep each step's loss and the removal order
    one threshold over all blocks of all layers (global; or per layer: uniform; N:M: per group)
    pass 2, for each target linear: the same H_b and F_b^-1 again (the same gradients, bit for bit),
        then replay its eliminations up to each block's count: the weights and the mask
    write every pruned weight (the model stays dense until then: every layer sees the dense
    model's gradients, CAP's one-shot setting)

Memory: one layer's blocks at a time (``H_b`` and ``F_b^-1``, ``2 x 8 B`` bytes per weight), the
``batch_size`` gradients in flight, and 16 bytes per weight for the orders and losses. Nothing of
size ``B`` per weight is kept for the whole model (that is 32 GB for DeiT-Small in float64): the
blocks are rebuilt from the gradients for the replay, which doubles the gradient passes.
"""

from __future__ import annotations

import logging
import time
import warnings
from collections.abc import Iterable
from dataclasses import asdict
from typing import Any

import torch
from torch import nn

from robop_lightning.config import FisherOptions, PruneConfig
from robop_lightning.engine.gram import sum_over_ranks
from robop_lightning.engine.patterns import parse_pattern
from robop_lightning.engine.solvers.fisher_obs import (
    block_grams,
    default_block_size,
    eliminate_blocks,
    replay_blocks,
    select_counts,
    set_block_inverse,
)
from robop_lightning.pipeline.gradients import LossFn, batch_size_of, minibatch_gradient, per_sample_gradients
from robop_lightning.pipeline.job import Job, prepare_job
from robop_lightning.pipeline.walk import BlockWalk
from robop_lightning.report import LayerResult, PruneReport
from robop_lightning.utils.offload import WeightUndo

__all__ = ["FisherOptions", "FisherStep", "prune_fisher", "prune_model_fisher"]

log = logging.getLogger("robop_lightning")

CTE_DOMINATES = 10.0  # CTE's gamma over the averaged Fisher's mean diagonal past which it is warned about


def block_sizes(job: Job, pat: Any, opts: FisherOptions) -> dict[str, int]:
    """Each target's Fisher block size ``B`` (checked against its inputs and the pattern's ``M``)."""
    sizes = {}
    for n, mod in job.modules.items():
        rows, cols = mod.weight.shape
        pat.check_shape(rows, cols, n)
        size = opts.block_size or (192 if cols % 192 == 0 else default_block_size(cols))
        if cols % size:
            raise ValueError(f"{n}: fisher block_size={size} must divide its {cols} inputs; "
                             f"try {default_block_size(cols, size)}.")
        if pat.kind == "nm" and size % pat.m:
            raise ValueError(f"{n}: fisher block_size={size} must be a multiple of M={pat.m}.")
        sizes[n] = size
    return sizes


class FisherStep:
    """CAP's Fisher pruning as units of a :class:`BlockWalk`: one per target linear, in two passes.

    ``phase`` is ``"eliminate"`` (pass 1: each layer's OBS order and losses) or ``"replay"`` (pass 2:
    each layer's weights and mask at the counts the threshold chose). Both passes are checkpointed
    per layer in ``resume_dir``; the weights are written when every layer is replayed.
    """

    def __init__(self, job: Job, walk: BlockWalk, report: PruneReport, sizes: dict[str, int], m: int) -> None:
        self.job, self.walk, self.report, self.sizes, self.m = job, walk, report, sizes, m
        self.opts = job.config.fisher_options
        self.pattern = parse_pattern(job.config.pattern, job.config.sparsity)
        self.phase = "eliminate"
        self.cte_ratio = 0.0  # CTE's gamma over the largest layer's mean Fisher diagonal
        self.state: dict[str, dict[str, torch.Tensor | float]] = {}
        self.counts: dict[str, torch.Tensor] = {}
        self.pruned: dict[str, torch.Tensor] = {}  # the model stays dense until every layer is replayed
        self.undo = WeightUndo()

        def restore() -> None:
            self.undo.restore({n: mod.weight for n, mod in job.modules.items()})
            report.masks.clear()
            report.resumed.clear()

        walk.on_undo(restore)
        walk.on_close(self.undo.close)

    def _blocks(self, n: str) -> tuple[torch.Tensor, torch.Tensor]:
        """``H_b`` (summed over the m gradients) and ``F_b^-1`` under the set, for layer ``n``."""
        w = self.job.modules[n].weight
        rows, cols = w.shape
        size = self.sizes[n]
        h = torch.zeros(rows * cols // size, size, size, dtype=torch.float64, device=w.device)
        with torch.enable_grad():
            for b in self.job.batches:
                if self.opts.grad_batch == 1:
                    g = per_sample_gradients(self.job.model, [f"{n}.weight"], b, self.job.loss_fn,
                                             method=self.opts.method)[f"{n}.weight"]
                else:  # CAP's mini-batch gradients: one per batch of grad_batch samples
                    g = minibatch_gradient(self.job.model, [f"{n}.weight"], b, self.job.loss_fn)[f"{n}.weight"]
                h += block_grams(g.reshape(g.shape[0], -1), cols, size)
        h = sum_over_ranks(h)  # under DDP every rank has the Fisher of all ranks' gradients
        return h, set_block_inverse(h, self.m, self.opts.lam, self.job.config.uncertainty, self.job.config.radius)

    def prune_unit(self, walk: BlockWalk, n: str) -> list[str]:
        return self._eliminate(n) if self.phase == "eliminate" else self._replay(n)

    def _eliminate(self, n: str) -> list[str]:
        t = time.perf_counter()
        with self.walk.timed("solve"):
            h, finv = self._blocks(n)
            w = self.job.modules[n].weight.detach().to(torch.float64).reshape(-1, self.sizes[n])
            order, cum = eliminate_blocks(w, finv, self.pattern)
        if self.job.config.uncertainty == "cte":  # an absolute ridge: how it compares with this Fisher
            mean_diag = float(h.diagonal(dim1=1, dim2=2).mean()) / self.m
            gamma = 0.01 if self.job.config.radius is None else float(self.job.config.radius)
            self.cte_ratio = max(self.cte_ratio, gamma / mean_diag if mean_diag > 0 else float("inf"))
        self.state[n] = {"order": order.cpu(), "cum": cum.cpu(), "seconds": time.perf_counter() - t}
        log.info("%s: Fisher blocks of %d from %d gradients, eliminated in %.1fs", n, self.sizes[n], self.m,
                 time.perf_counter() - t)
        return [n]

    def threshold(self) -> None:
        """Every layer's per-block counts: one threshold over all layers (or per layer, or per group)."""
        names, modules, pat = self.job.names, self.job.modules, self.pattern
        cums = [self.state[n]["cum"] for n in names]
        if pat.kind == "nm":
            counts = [torch.full((c.shape[0],), c.shape[1], dtype=torch.long) for c in cums]
        elif self.opts.selection == "global":
            total = sum(modules[n].weight.numel() for n in names)
            keep = sum(pat.keep_count(*modules[n].weight.shape) for n in names)
            counts = select_counts(cums, total - keep, "global")
            log.info("global threshold: %d of %d weights removed across %d layers", total - keep, total, len(names))
        else:
            counts = select_counts(cums, [modules[n].weight.numel() - pat.keep_count(*modules[n].weight.shape)
                                          for n in names], "uniform")
        self.counts = dict(zip(names, counts))
        self.phase = "replay"
        if self.cte_ratio > CTE_DOMINATES:
            self.report.config["cte_ridge_over_fisher"] = self.cte_ratio
            warnings.warn(
                f"CTE's ridge gamma={0.01 if self.job.config.radius is None else self.job.config.radius} is up to "
                f"{self.cte_ratio:.3g}x the mean diagonal of CAP's averaged Fisher here: it outweighs the curvature "
                "and the pruning drifts away from the loss. CTE is an absolute ridge; choose gamma on this Fisher's "
                "scale (report.config['cte_ridge_over_fisher'] gives the ratio), or use Trace / E, which scale with it.",
                RuntimeWarning, stacklevel=2)

    def _replay(self, n: str) -> list[str]:
        t = time.perf_counter()
        w = self.job.modules[n].weight.detach()
        with self.walk.timed("solve"):
            h, finv = self._blocks(n)  # the dense model's gradients again, in the same order: the same blocks
            w_blocks = w.to(torch.float64).reshape(-1, self.sizes[n])
            out, kept = replay_blocks(w_blocks, finv, self.state[n]["order"].to(w.device),
                                      self.counts[n].to(w.device))
            err = (w_blocks - out).unsqueeze(-1)
            num = float((err.transpose(1, 2) @ h @ err).sum())
            den = float((w_blocks.unsqueeze(1) @ h @ w_blocks.unsqueeze(-1)).sum())
        del h, finv
        mask = kept.reshape(w.shape)
        self.walk.check_ranks(n, mask, "masks")
        self.pruned[n] = out.reshape(w.shape).to(device="cpu", dtype=w.dtype)
        self.report.masks[n] = mask.cpu()
        relative = num / den if den > 0 else 0.0
        result = LayerResult(self.pruned[n], mask, nominal_error=relative, robust_error=relative,
                             sparsity=1.0 - float(mask.float().mean()),
                             seconds=self.state[n]["seconds"] + time.perf_counter() - t)
        self.report.layers.append(result.to_row(n, w.shape))
        return [n]

    def save(self, names: list[str]) -> tuple[list[dict[str, Any]], dict[str, torch.Tensor]]:
        if self.phase == "eliminate":
            rows = [{"name": n, "seconds": self.state[n]["seconds"]} for n in names]
            return rows, {**{f"{n}.order": self.state[n]["order"] for n in names},
                          **{f"{n}.cum": self.state[n]["cum"] for n in names}}
        return self.report.layers[-len(names):], {**{f"{n}.weight": self.pruned[n] for n in names},
                                                  **{f"{n}.mask": self.report.masks[n] for n in names}}

    def restore(self, rows: list[dict[str, Any]], tensors: dict[str, torch.Tensor]) -> None:
        for row in rows:
            n = row["name"]
            if self.phase == "eliminate":
                self.state[n] = {"order": tensors[f"{n}.order"], "cum": tensors[f"{n}.cum"], "seconds": row["seconds"]}
                continue
            self.pruned[n] = tensors[f"{n}.weight"]
            self.report.masks[n] = tensors[f"{n}.mask"]
            self.report.layers.append(row)
            self.report.resumed.append(n)

    def write(self) -> None:
        """Every pruned weight into the model (each original saved for the walk's undo first)."""
        for n, value in self.pruned.items():
            self.undo.save(n, self.job.modules[n].weight)
            self.job.modules[n].weight.data.copy_(value)

    def prune_block(self, walk: BlockWalk, name: str, block: nn.Module) -> list[str]:  # pragma: no cover
        raise NotImplementedError("CAP's Fisher pass walks linears (BlockWalk.units), not blocks")

    def prune_linear(self, name: str, inputs: torch.Tensor) -> None:  # pragma: no cover
        raise NotImplementedError("CAP's Fisher pass needs no captured inputs (BlockWalk.units)")


def prune_fisher(job: Job) -> PruneReport:
    """Prune ``job``'s targets with CAP's empirical block Fisher (see the module docstring)."""
    c = job.config
    pat = parse_pattern(c.pattern, c.sparsity)
    sizes = block_sizes(job, pat, c.fisher_options)
    local = sum(batch_size_of(b) for b in job.batches)
    counts = sum_over_ranks(torch.tensor([local, len(job.batches)], dtype=torch.float64))
    samples, batches = int(counts[0]), int(counts[1])
    m = batches if c.fisher_options.grad_batch > 1 else samples
    report = PruneReport(config={
        "sparsity": pat.sparsity, "pattern": c.pattern, "solver": "cap", "curvature": "fisher",
        **({"curvature_default": job.curvature_default} if job.curvature_default else {}),
        "uncertainty": c.uncertainty, "radius": c.radius, "fisher": asdict(c.fisher_options), "gradients_used": m,
        "samples_used": samples,
    })
    identity = {k: v for k, v in report.config.items() if k != "curvature_default"}
    walk = job.open_walk(identity, {n: mod.weight for n, mod in job.modules.items()})
    step = FisherStep(job, walk, report, sizes, m)
    with walk.transaction():
        walk.units(step, job.names, "Fisher blocks", prefix="eliminate")
        step.threshold()
        walk.units(step, job.names, "replaying", prefix="replay")
        step.write()
    return job.finish(report, walk)


def prune_model_fisher(
    model: nn.Module,
    calibration: Iterable[Any],
    loss_fn: LossFn,
    sparsity: float | None = 0.5,
    pattern: str = "unstructured",
    uncertainty: str = "baseline",
    radius: float | None = None,
    targets: list[str] | str | None = None,
    ignore: list[str] | str | None = None,
    blocks: str | None = None,
    fisher: FisherOptions | dict[str, Any] | None = None,
    progress: bool | None = None,
    resume_dir: str | None = None,
) -> PruneReport:
    """Prune ``model``'s linears in place with CAP's empirical block Fisher (RobOP-CAP as published).

    The same job as ``prune_model(model, calibration, solver="cap", curvature="fisher", loss_fn=...)``.

    Args:
        model: any ``nn.Module``.
        calibration: batches with labels, as ``loss_fn`` reads them; the first ``fisher.gradients``
            samples are used.
        loss_fn: ``loss_fn(model, batch) -> (B,)`` per-sample losses (``reduction="none"``).
        sparsity: fraction of zeros: over all targets together (``selection="global"``) or in every
            target (``"uniform"``); ``None`` with an ``N:M`` pattern.
        pattern: ``"unstructured"`` or ``"N:M"``.
        uncertainty: one of the authors' sets, applied to each Fisher block (``H_b`` summed over the
            ``m`` gradients, ``N = m``); ``"baseline"`` is CAP's own damping.
        radius: the set's gamma (``None``: 0.01).
        targets, ignore, blocks: which linears, as in :func:`robop_lightning.prune_model`.
        fisher: :class:`robop_lightning.config.FisherOptions` (or a dict).
        progress: a progress bar over layers (``None``: on a terminal); each layer is also logged.
        resume_dir: make the job resumable (as in :func:`robop_lightning.prune_model`).

    Returns:
        A :class:`robop_lightning.PruneReport`: per layer the sparsity the threshold chose and the
        relative empirical-Fisher error ``e^T F e / w^T F w`` of the pruned weights.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> _ = torch.manual_seed(0)
        >>> net = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3))
        >>> data = [(torch.randn(16, 8), torch.randint(0, 3, (16,)))]
        >>> loss = lambda m, b: nn.functional.cross_entropy(m(b[0]), b[1], reduction="none")
        >>> report = prune_model_fisher(net, data, loss, sparsity=0.5, targets=["0", "2"], fisher={"gradients": 16})
        >>> round(report.totals["sparsity"], 3)
        0.5
    """
    config = PruneConfig(sparsity=sparsity, pattern=pattern, solver="cap", uncertainty=uncertainty, radius=radius,
                         targets=targets, ignore=ignore, blocks=blocks, curvature="fisher", fisher=fisher,
                         resume_dir=resume_dir)
    return prune_fisher(prepare_job(model, calibration, config, loss_fn=loss_fn, progress=progress))
