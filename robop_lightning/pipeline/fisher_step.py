"""RobOP-CAP with CAP's curvature: prune a model's linears with the empirical block Fisher of its loss.

The pipeline (maths in :mod:`robop_lightning.engine.solvers.fisher_obs`)::

    take m calibration samples (with their labels)
    for each target linear, one at a time:
        accumulate H_b = sum_k g_kb g_kb^T over the m per-sample gradients (vmap, in batches)
        F_b^-1 under the uncertainty set (Baseline: CAP's lam I + H_b / m)
        eliminate every weight of every block by OBS; keep each step's loss and the removal order
    one threshold over all blocks of all layers (global; or per layer: uniform; N:M: per group)
    for each target linear: the same H_b and F_b^-1 again (the same gradients, bit for bit), then
        replay its eliminations up to each block's count: the weights and the mask

Memory: one layer's blocks at a time (``H_b`` and ``F_b^-1``, ``2 x 8 B`` bytes per weight), the
``batch_size`` gradients in flight, and 16 bytes per weight for the orders and losses. Nothing of
size ``B`` per weight is kept for the whole model (that is 32 GB for DeiT-Small in float64): the
blocks are rebuilt from the gradients for the replay, which doubles the gradient passes. The
gradients are those of the *dense* model (CAP's one-shot setting): every layer sees the same
curvature source.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn

from robop_lightning.pipeline.targets import find_blocks, resolve_targets
from robop_lightning.pipeline.gradients import LossFn, batch_size_of, per_sample_gradients, slice_batch
from robop_lightning.report import PruneReport
from robop_lightning.utils.offload import WeightUndo
from robop_lightning.engine.patterns import parse_pattern
from robop_lightning.utils.typed import coerce_options
from robop_lightning.engine.solvers.fisher_obs import (
    SELECTIONS,
    block_grams,
    default_block_size,
    eliminate_blocks,
    replay_blocks,
    select_counts,
    set_block_inverse,
)
from robop_lightning.engine.sets import CLOSED_FORM_SETS, canonical_set_name

__all__ = ["FisherOptions", "prune_model_fisher"]


@dataclass(frozen=True)
class FisherOptions:
    """How CAP's empirical Fisher is built and used (a dict with these keys works too).

    Attributes:
        gradients: ``m``, the number of per-sample gradients (CAP's ViT recipes: 4096; the default
            suits a CPU).
        block_size: ``B`` (``None``: CAP's 192 where it divides the layer's inputs, else the largest
            divisor up to 128).
        lam: CAP's damping ``lambda`` (Baseline's ``D = m lam I``; every set's eigenvalue floor).
        batch_size: per-sample gradients computed at once.
        selection: ``"global"`` (one threshold over all target layers, CAP's) or ``"uniform"`` (the
            same sparsity in every layer). ``N:M`` patterns are per group either way.
        method: per-sample gradients by ``"vmap"``, ``"loop"`` or ``"auto"`` (vmap, else the loop).
    """

    gradients: int = 256
    block_size: int | None = None
    lam: float = 1e-8
    batch_size: int = 32
    selection: str = "global"
    method: str = "auto"

    @classmethod
    def coerce(cls, value: FisherOptions | dict[str, Any] | None) -> FisherOptions:
        out = coerce_options(cls, value, "fisher option(s)")
        for key in ("gradients", "batch_size"):
            v = getattr(out, key)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"fisher {key} must be a positive integer, got {v!r}.")
        if out.block_size is not None and (isinstance(out.block_size, bool) or not isinstance(out.block_size, int)
                                           or out.block_size < 1):
            raise ValueError(f"fisher block_size must be a positive integer or None, got {out.block_size!r}.")
        if not (isinstance(out.lam, (int, float)) and out.lam > 0):
            raise ValueError(f"fisher lam must be a number > 0 (CAP's damping), got {out.lam!r}.")
        if out.selection not in SELECTIONS:
            raise ValueError(f"fisher selection must be one of {', '.join(SELECTIONS)}, got {out.selection!r}.")
        if out.method not in ("auto", "vmap", "loop"):
            raise ValueError(f"fisher method must be 'auto', 'vmap' or 'loop', got {out.method!r}.")
        return out


def _samples(calibration: Iterable[Any], m: int, batch_size: int) -> list[Any]:
    """The first ``m`` samples of ``calibration``, re-cut into batches of at most ``batch_size``."""
    out, seen = [], 0
    for batch in calibration:
        size = batch_size_of(batch)
        for a in range(0, size, batch_size):
            if seen >= m:
                return out
            take = min(batch_size, size - a, m - seen)
            out.append(slice_batch(batch, a, a + take))
            seen += take
        if seen >= m:
            break
    if seen == 0:
        raise ValueError("calibration is empty: pass an iterable with at least one batch.")
    return out


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
    progress: Callable[[str], None] | None = None,
) -> PruneReport:
    """Prune ``model``'s linears in place with CAP's empirical block Fisher (RobOP-CAP as published).

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
        fisher: :class:`FisherOptions` (or a dict).
        progress: called with one line per finished phase (for logs).

    Returns:
        A :class:`robop_lightning.PruneReport`: per layer the sparsity the threshold chose and the
        relative empirical-Fisher error ``e^T F e / w^T F w`` of the pruned weights.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> torch.manual_seed(0)  # doctest: +ELLIPSIS
        <torch._C.Generator object at ...>
        >>> net = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3))
        >>> data = [(torch.randn(16, 8), torch.randint(0, 3, (16,)))]
        >>> loss = lambda m, b: nn.functional.cross_entropy(m(b[0]), b[1], reduction="none")
        >>> report = prune_model_fisher(net, data, loss, sparsity=0.5, targets=["0", "2"], fisher={"gradients": 16})
        >>> round(report.totals["sparsity"], 3)
        0.5
    """
    start = time.perf_counter()
    opts = FisherOptions.coerce(fisher)
    name_set = canonical_set_name(uncertainty) if isinstance(uncertainty, str) else uncertainty
    if name_set not in CLOSED_FORM_SETS:
        raise ValueError(f"curvature='fisher' takes the authors' sets ({', '.join(CLOSED_FORM_SETS)}), "
                         f"got {uncertainty!r}.")
    if not callable(loss_fn):
        raise ValueError("curvature='fisher' needs loss_fn(model, batch) -> per-sample losses (shape (B,)).")
    pat = parse_pattern(pattern, sparsity)
    if pat.kind not in ("unstructured", "nm"):
        raise ValueError(f"curvature='fisher' prunes 'unstructured' or 'N:M' patterns, not {pattern!r}.")
    structure = find_blocks(model, blocks)
    names = resolve_targets(model, targets, ignore, [b for b, _ in structure[1]] if structure else None)
    modules = {n: model.get_submodule(n) for n in names}
    sizes = {}
    for n, mod in modules.items():
        rows, cols = mod.weight.shape
        pat.check_shape(rows, cols, n)
        size = opts.block_size or (192 if cols % 192 == 0 else default_block_size(cols))
        if cols % size:
            raise ValueError(f"{n}: fisher block_size={size} must divide its {cols} inputs; "
                             f"try {default_block_size(cols, size)}.")
        if pat.kind == "nm" and size % pat.m:
            raise ValueError(f"{n}: fisher block_size={size} must be a multiple of M={pat.m}.")
        sizes[n] = size
    batches = _samples(calibration, opts.gradients, opts.batch_size)
    m = sum(batch_size_of(b) for b in batches)
    say = progress or (lambda line: None)

    report = PruneReport(config={
        "sparsity": pat.sparsity, "pattern": pattern, "solver": "cap", "curvature": "fisher",
        "uncertainty": name_set, "radius": radius, "fisher": asdict(opts), "gradients_used": m,
    })
    modes = {mod: mod.training for mod in model.modules()}
    undo = WeightUndo()
    state: dict[str, dict[str, Any]] = {}

    def blocks(n: str) -> tuple[torch.Tensor, torch.Tensor]:
        """``H_b`` (summed over the m gradients) and ``F_b^-1`` under the set, for layer ``n``."""
        w = modules[n].weight
        rows, cols = w.shape
        size = sizes[n]
        h = torch.zeros(rows * cols // size, size, size, dtype=torch.float64, device=w.device)
        for b in batches:
            g = per_sample_gradients(model, [f"{n}.weight"], b, loss_fn, method=opts.method)[f"{n}.weight"]
            h += block_grams(g.reshape(g.shape[0], -1), cols, size)
        return h, set_block_inverse(h, m, opts.lam, name_set, radius)

    try:
        model.eval()
        for n, mod in modules.items():  # one layer at a time: its Fisher blocks, its eliminations
            t = time.perf_counter()
            h, finv = blocks(n)
            order, cum = eliminate_blocks(mod.weight.detach().to(torch.float64).reshape(-1, sizes[n]), finv, pat)
            state[n] = {"order": order.cpu(), "cum": cum.cpu(), "seconds": time.perf_counter() - t}
            say(f"{n}: Fisher blocks of {sizes[n]} from {m} gradients, eliminated in {time.perf_counter() - t:.1f}s")
            del h, finv, order, cum
        cums = [state[n]["cum"] for n in names]
        if pat.kind == "nm":
            counts = [torch.full((c.shape[0],), c.shape[1], dtype=torch.long) for c in cums]
        elif opts.selection == "global":
            total = sum(modules[n].weight.numel() for n in names)
            keep = sum(pat.keep_count(*modules[n].weight.shape) for n in names)
            counts = select_counts(cums, total - keep, "global")
            say(f"global threshold: {total - keep} of {total} weights removed across {len(names)} layers")
        else:
            counts = select_counts(cums, [modules[n].weight.numel() - pat.keep_count(*modules[n].weight.shape)
                                          for n in names], "uniform")
        pruned: dict[str, torch.Tensor] = {}  # the model stays dense until every layer is replayed
        with torch.no_grad():
            for n, count in zip(names, counts):
                t = time.perf_counter()
                w = modules[n].weight.detach()
                h, finv = blocks(n)  # the dense model's gradients again, in the same order: the same blocks
                w_blocks = w.to(torch.float64).reshape(-1, sizes[n])
                out, kept = replay_blocks(w_blocks, finv, state[n]["order"].to(w.device), count.to(w.device))
                err = (w_blocks - out).unsqueeze(-1)
                num = float((err.transpose(1, 2) @ h @ err).sum())
                den = float((w_blocks.unsqueeze(1) @ h @ w_blocks.unsqueeze(-1)).sum())
                del h, finv
                mask = kept.reshape(w.shape)
                pruned[n] = out.reshape(w.shape).to(device="cpu", dtype=w.dtype)
                report.masks[n] = mask.cpu()
                report.layers.append({
                    "name": n, "shape": list(w.shape), "parameters": w.numel(),
                    "sparsity": 1.0 - float(mask.float().mean()),
                    "nominal_error": num / den if den > 0 else 0.0, "robust_error": num / den if den > 0 else 0.0,
                    "heldout_error": None, "srank": None,
                    "seconds": state[n]["seconds"] + time.perf_counter() - t,
                })
            for n, value in pruned.items():
                undo.save(n, modules[n].weight)
                modules[n].weight.data.copy_(value)
    except BaseException:
        undo.restore({n: mod.weight for n, mod in modules.items()})
        raise
    finally:
        for mod, was in modes.items():
            mod.train(was)
        undo.close()
    report.seconds = time.perf_counter() - start
    return report
