"""Structured OBS: choose whole input-column groups of a linear layer to remove, and compensate.

With ``X`` the layer's calibration inputs and ``H = X^T X``, removing the column groups ``S`` and
keeping ``R`` costs, after the best update of the kept columns,

    ``L(S) = min_{W'_R} ||X W^T - X_R W'^T_R||^2 = tr(W_S [(H^-1)_SS]^-1 W_S^T)``,
    ``W'_R = W_R + W_S H_SR H_RR^-1``                           (exact least squares on the kept columns).

Groups are chosen greedily: remove the group with the smallest saliency
``tr(W_G [(H^-1)_GG]^-1 W_G^T)``, update the weights and down-date ``H^-1``, repeat; the survivors
are then refitted exactly. A consumer bias is the weight of a constant input: it is appended to
``X`` as a ones column (never removable), so the refit also corrects the bias through the input
mean. The uncertainty sets of :mod:`robop_lightning.engine.sets` apply unchanged: static sets (the
authors' four) hand ``H + D`` to the greedy search, dynamic ones (minmax-trace / minmax-e, cvar) run the
alternating scheme of :func:`robop_lightning.engine.alternation.alternate` with the whole structured
selection as the solver.

The modules themselves shrink in :mod:`robop_lightning.pipeline.surgery`.
"""

from __future__ import annotations

import functools
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch

from robop_lightning.engine.damping import damp_until_definite
from robop_lightning.engine.gram import LayerInputs
from robop_lightning.report import StructuredResult
from robop_lightning.engine.alternation import alternate, clamp_robust, quad, relative_error
from robop_lightning.engine.sets import ClosedFormSet, UncertaintySet, make_uncertainty

__all__ = ["select_groups", "compensate"]

def _group_index(groups: Sequence[Sequence[int] | torch.Tensor], cols: int, name: str) -> torch.Tensor:
    """``(num_groups, group_size)`` long tensor; groups must be disjoint, equal-sized, in range."""
    if len(groups) == 0:
        raise ValueError(f"{name}: groups is empty; pass one index list per removable group of input columns.")
    rows = [torch.as_tensor(g, dtype=torch.long).flatten() for g in groups]
    size = rows[0].numel()
    if size == 0 or any(r.numel() != size for r in rows):
        raise ValueError(
            f"{name}: every group must hold the same positive number of columns (a channel, or a head's "
            f"head_dim columns), got sizes {sorted({r.numel() for r in rows})}."
        )
    idx = torch.stack(rows)
    flat = idx.flatten()
    if int(flat.min()) < 0 or int(flat.max()) >= cols:
        raise ValueError(f"{name}: group indices must lie in [0, {cols}) (the layer's in_features).")
    if flat.unique().numel() != flat.numel():
        raise ValueError(f"{name}: groups overlap; each input column may belong to one group only.")
    return idx


def _greedy(w: torch.Tensor, hinv: torch.Tensor, idx: torch.Tensor, remove: int, per_step: int):
    """Greedy structured OBS on float64 copies. Returns (order, cumulative losses, step sizes).

    ``w`` (m x n') and ``hinv`` (n' x n') are modified in place: after each step the removed
    columns are compensated exactly (``w -= w_U (Hinv_UU)^-1 Hinv_U:``) and ``Hinv`` is down-dated,
    so the next saliencies see the earlier removals.
    """
    g, s = idx.shape
    removed = torch.zeros(g, dtype=torch.bool)
    order: list[int] = []
    losses: list[float] = []
    steps: list[int] = []
    total = 0.0
    eye = torch.eye(s, dtype=hinv.dtype)
    while len(order) < remove:
        if s == 1:
            cols = idx[:, 0]
            sal = w[:, cols].pow(2).sum(0) / hinv.diagonal()[cols].clamp_min(1e-300)
        else:
            blocks = hinv[idx[:, :, None], idx[:, None, :]]  # (g, s, s)
            blocks = 0.5 * (blocks + blocks.transpose(1, 2))
            blocks = torch.where(removed[:, None, None], eye.expand(g, s, s), blocks)
            chol, info = torch.linalg.cholesky_ex(blocks)
            wg = w[:, idx].permute(1, 0, 2)  # (g, m, s)
            sol = torch.cholesky_solve(wg.transpose(1, 2), chol)  # (g, s, m)
            sal = (wg.transpose(1, 2) * sol).sum((1, 2))
            sal = torch.where(info == 0, sal, torch.full_like(sal, math.inf))
        sal = sal.masked_fill(removed, math.inf)
        take = min(per_step, remove - len(order))
        chosen = torch.topk(sal, take, largest=False, sorted=True).indices
        cols = idx[chosen].flatten()
        rows_u = hinv[cols, :]  # (|U|, n'); hinv stays symmetric, so hinv[:, U] = rows_u^T
        huu = rows_u[:, cols]
        huu_inv = torch.linalg.inv(0.5 * (huu + huu.T))
        a = huu_inv @ rows_u
        wu = w[:, cols]
        total += float(((wu @ huu_inv) * wu).sum())  # tr(W_U Hinv_UU^-1 W_U^T)
        w.addmm_(wu, a, alpha=-1.0)
        hinv.addmm_(rows_u.T, a, alpha=-1.0)
        w[:, cols] = 0.0
        removed[chosen] = True
        order.extend(int(c) for c in chosen)
        losses.append(total)
        steps.append(take)
    return order, losses, steps


def _subset_loss(w: torch.Tensor, hinv: torch.Tensor, cols: torch.Tensor) -> float:
    """``tr(W_S [(H^-1)_SS]^-1 W_S^T)``: the loss of removing the columns ``cols`` after compensation."""
    hs = hinv[cols][:, cols]
    ws = w[:, cols]
    return float((ws.T * torch.linalg.solve(0.5 * (hs + hs.T), ws.T)).sum())


def _swap_refine(w: torch.Tensor, hinv: torch.Tensor, idx: torch.Tensor, chosen: list[int], max_rounds: int = 20):
    """Local search after the greedy pass: swap a removed and a kept group while the exact loss drops.

    Greedy OBS can be far from the best subset when groups are few and correlated (heads); each
    candidate is scored exactly, so the result is never worse than the greedy one.
    """
    g = idx.shape[0]
    current = list(chosen)
    best = _subset_loss(w, hinv, idx[current].flatten())
    for _ in range(max_rounds):
        move = None
        for a in range(len(current)):
            for b in range(g):
                if b in current:
                    continue
                trial = current[:a] + [b] + current[a + 1 :]
                loss = _subset_loss(w, hinv, idx[trial].flatten())
                if loss < best * (1 - 1e-12) and (move is None or loss < move[0]):
                    move = (loss, trial)
        if move is None:
            break
        best, current = move
    return current


def compensate(
    weight: torch.Tensor, h: torch.Tensor, keep: torch.Tensor, bias: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Exact compensation of the kept columns: ``W'_R = W_R + W_S H_SR H_RR^-1``.

    ``h`` is the (damped) Gram of the inputs, augmented with a ones column when ``bias`` is given
    (its last row / column); then the bias is refitted too (it is a kept column of ``[W, b]``).
    Equals ``lstsq(X_R, X W^T)`` (with ``X`` augmented likewise) when ``h = X^T X``.

    Example:
        >>> x, w = torch.randn(64, 6, dtype=torch.float64), torch.randn(3, 6, dtype=torch.float64)
        >>> keep = torch.tensor([0, 2, 3, 5])
        >>> new, _ = compensate(w, x.T @ x, keep)
        >>> ref = torch.linalg.lstsq(x[:, keep], x @ w.T).solution.T
        >>> torch.allclose(new, ref)
        True
    """
    w = weight.double()
    if bias is not None:
        w = torch.cat([w, bias.double()[:, None]], dim=1)
        keep = torch.cat([keep, torch.tensor([w.shape[1] - 1])])
    h = h.double()
    n = w.shape[1]
    mask = torch.zeros(n, dtype=torch.bool)
    mask[keep] = True
    r, s = mask.nonzero().flatten(), (~mask).nonzero().flatten()
    new = w[:, r].clone()
    if s.numel():
        h_rr = h[r][:, r]
        chol, info = torch.linalg.cholesky_ex(0.5 * (h_rr + h_rr.T))
        rhs = h[r][:, s] @ w[:, s].T  # (|R|, m)
        sol = torch.cholesky_solve(rhs, chol) if int(info) == 0 else torch.linalg.lstsq(h_rr, rhs).solution
        new = new + sol.T
    if bias is not None:
        return new[:, :-1], new[:, -1]
    return new, None


def _augmented(inputs: LayerInputs) -> LayerInputs:
    x = inputs.x
    ones = torch.ones(*x.shape[:-1], 1, dtype=x.dtype, device=x.device)
    return LayerInputs(torch.cat([x, ones], dim=-1), name=inputs.name, distributed=inputs.distributed)


@dataclass
class _Groups:
    """One structured selection, set up: the float64 ``[W, b]`` and what every solve needs.

    ``ridge`` is the damping on the feature columns, raised (and kept raised) when a solve needs
    it; ``bias_ridge`` a tiny fixed ridge on the constant input (``None`` without a bias).
    """

    name: str
    w_full: torch.Tensor
    idx: torch.Tensor
    cols: int
    per_step: int
    swap_limit: int
    ridge: float
    bias_ridge: torch.Tensor | None
    has_bias: bool


class _Solve(NamedTuple):
    """One greedy selection and its exact compensation (``err``: ``[W, b]`` minus the result)."""

    chosen: list[int]
    keep_groups: list[int]
    keep_cols: torch.Tensor
    new_w: torch.Tensor
    new_b: torch.Tensor | None
    err: torch.Tensor
    losses: list[float]
    steps: list[int]


def _checked_inputs(weight, inputs, groups, remove, damping, bias, name) -> tuple[torch.Tensor, LayerInputs]:
    """The argument checks of :func:`select_groups`: ``(group index, inputs)``."""
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2 or not weight.is_floating_point():
        raise ValueError(f"{name}: weight must be a 2-D float tensor (out_features, in_features).")
    rows, cols = weight.shape
    idx = _group_index(groups, cols, name)
    g = idx.shape[0]
    if isinstance(remove, bool) or not isinstance(remove, int) or not 0 <= remove < g:
        raise ValueError(
            f"{name}: remove must be an integer in [0, {g - 1}] (at least one of the {g} groups stays), got {remove!r}."
        )
    if not isinstance(damping, (int, float)) or isinstance(damping, bool) or not damping >= 0:
        raise ValueError(f"{name}: damping must be a number >= 0, got {damping!r}.")
    li = inputs if isinstance(inputs, LayerInputs) else LayerInputs(inputs, name=f"{name}: calibration inputs")
    if li.in_features != cols:
        raise ValueError(
            f"{name}: inputs have {li.in_features} features but the weight has in_features={cols}; pass this layer's inputs."
        )
    if bias is not None and (bias.dim() != 1 or bias.shape[0] != rows):
        raise ValueError(f"{name}: bias must have shape ({rows},), got {tuple(bias.shape)}.")
    return idx, li


def _closed_form_loss(uset: ClosedFormSet, h: torch.Tensor, cols: int, e: torch.Tensor) -> float:
    """The authors' robust loss of ``[E, e_b]``: the set acts on the feature columns only."""
    return float(((e @ h) * e).sum()) + uset.robust_loss(e[:, :cols]) - quad(uset.h, e[:, :cols])


def _prepare_set(uset: UncertaintySet, h: torch.Tensor, aug: LayerInputs, li: LayerInputs, cols: int,
                 lam0: float) -> tuple[torch.Tensor, Callable[[torch.Tensor], float]]:
    """Prepare ``uset`` on the (augmented) Gram: ``(the static sets' matrix, the robust loss of an error)``."""
    if isinstance(uset, ClosedFormSet):
        # the authors' D acts on the feature columns (the bias column is a constant input)
        uset.prepare(h[:cols, :cols], li, lam0)
        h_static = h.clone()
        if uset.matrix is not None:
            h_static[:cols, :cols] += uset.matrix
        return h_static, functools.partial(_closed_form_loss, uset, h, cols)
    uset.prepare(h, aug, lam0)
    return uset.effective(), uset.robust_loss


def _damped(p: _Groups, h_eff: torch.Tensor) -> torch.Tensor:
    """``h_eff`` plus the bias ridge and the feature ridge, raised (in ``p``) until definite."""
    if p.bias_ridge is not None:
        h_eff = h_eff + torch.diag(p.bias_ridge)
    hd, p.ridge = damp_until_definite(h_eff, p.ridge, p.name, warn=False, columns=p.cols, float32=False)
    return hd


def _solve(p: _Groups, h_eff: torch.Tensor, count: int, record: int | None = None) -> _Solve:
    """Greedy OBS under ``h_eff`` (to ``record`` removals for the trajectory), swap-refined, then compensated."""
    cols, idx = p.cols, p.idx
    g = idx.shape[0]
    hd = _damped(p, h_eff)
    hinv = torch.linalg.inv(hd)  # (cholesky_inverse is ~20x slower on CPU here)
    hinv = 0.5 * (hinv + hinv.T)
    order, losses, steps = _greedy(p.w_full.clone(), hinv.clone(), idx, max(count, record or 0), p.per_step)
    chosen = order[:count]
    if 0 < count < g <= p.swap_limit:
        chosen = _swap_refine(p.w_full, hinv, idx, chosen)
    keep_groups = sorted(set(torch.arange(g).tolist()) - set(chosen))
    keep_cols = torch.sort(idx[keep_groups].flatten()).values if keep_groups else torch.zeros(0, dtype=torch.long)
    free = torch.ones(cols, dtype=torch.bool)
    free[idx.flatten()] = False
    keep_cols = torch.sort(torch.cat([keep_cols, free.nonzero().flatten()])).values
    new_w, new_b = compensate(p.w_full[:, :cols], hd, keep_cols, p.w_full[:, cols] if p.has_bias else None)
    err = p.w_full.clone()
    err[:, keep_cols] -= new_w
    if p.has_bias:
        err[:, cols] -= new_b
    return _Solve(chosen, keep_groups, keep_cols, new_w, new_b, err, losses, steps)


def _alternation_step(p: _Groups, remove: int, trajectory_to: int | None, solves: list[_Solve], h_k: torch.Tensor,
                      previous):
    """:func:`alternate`'s solve; every solve is appended to ``solves`` (the first records the trajectory)."""
    solves.append(_solve(p, h_k, remove, trajectory_to if previous is None else None))
    return solves[-1], solves[-1].err


def _heldout_error(heldout, has_bias: bool, w_full: torch.Tensor, err: torch.Tensor, name: str) -> float:
    held = heldout if isinstance(heldout, LayerInputs) else LayerInputs(heldout, name=f"{name}: held-out inputs")
    hh = (_augmented(held) if has_bias else held).gram(device="cpu")
    return relative_error(hh, w_full, err)


def select_groups(
    weight: torch.Tensor,
    inputs: torch.Tensor | LayerInputs,
    groups: Sequence[Sequence[int] | torch.Tensor],
    remove: int,
    uncertainty: str = "baseline",
    radius: float | None = None,
    coupled: bool | None = None,
    damping: float = 0.01,
    bias: torch.Tensor | None = None,
    rounds: int = 3,
    per_step: int | None = None,
    trajectory_to: int | None = None,
    swap_limit: int = 64,
    name: str = "layer",
    heldout: torch.Tensor | LayerInputs | None = None,
) -> StructuredResult:
    """Choose ``remove`` input-column groups of a linear layer by robust structured OBS, and compensate.

    Args:
        weight: ``(out_features, in_features)`` consumer weight; never modified.
        inputs: its calibration inputs, ``(samples, tokens, in_features)`` / ``(N, in_features)``
            or a :class:`LayerInputs`.
        groups: one index list per removable group (single channels, or a head's columns); equal sizes.
            Columns in no group are always kept.
        remove: how many groups to remove (``0 <= remove < len(groups)``).
        uncertainty, radius, coupled: the set, as in :func:`robop_lightning.prune_layer`.
        damping: base damping relative to ``mean(diag H)`` (added to the feature columns only).
        bias: the layer's bias, if any: refitted through the input mean (augmented Gram).
        rounds: outer rounds of the alternating scheme for dynamic sets.
        per_step: groups removed per greedy step (``None``: 1 up to 256 groups, else ``ceil(g / 256)``).
        trajectory_to: run the first greedy pass up to this many removals to record the loss
            trajectory (global budgets), then use its first ``remove`` removals.
        swap_limit: with at most this many groups (heads, KV groups) the greedy subset is refined by
            exact 1-swap local search (never worse than greedy); 0 turns it off.
        name: the layer's name in messages.
        heldout: held-out inputs of the layer: ``heldout_error`` is the result's relative error on them.

    Returns:
        A :class:`robop_lightning.report.StructuredResult`.

    Example:
        >>> torch.manual_seed(0) and None
        >>> w, x = torch.randn(8, 12), torch.randn(64, 12)
        >>> r = select_groups(w, x, [[i] for i in range(12)], remove=4)
        >>> r.weight.shape, len(r.kept), 0 < r.nominal_error < 1
        (torch.Size([8, 8]), 8, True)
    """
    start = time.perf_counter()
    idx, li = _checked_inputs(weight, inputs, groups, remove, damping, bias, name)
    cols, g = weight.shape[1], idx.shape[0]
    uset: UncertaintySet = make_uncertainty(uncertainty, radius, coupled)
    aug = _augmented(li) if bias is not None else li
    h = aug.gram(device="cpu")
    mean_diag = float(h.diagonal()[:cols].mean())
    h_static, robust_loss = _prepare_set(uset, h, aug, li, cols, damping * mean_diag if mean_diag > 0 else 1.0)
    bias_ridge = None
    if bias is not None:  # a tiny fixed ridge on the constant input
        bias_ridge = torch.zeros(h.shape[0], dtype=torch.float64)
        bias_ridge[cols] = 1e-12 * float(h[cols, cols])
    w_full = weight.detach().to("cpu", torch.float64)
    if bias is not None:
        w_full = torch.cat([w_full, bias.detach().to("cpu", torch.float64)[:, None]], dim=1)
    p = _Groups(name, w_full, idx, cols, per_step or (1 if g <= 256 else math.ceil(g / 256)), swap_limit,
                uset.ridge, bias_ridge, bias is not None)
    denom = quad(h, w_full)
    rel = lambda v: v / denom if denom > 0 else 0.0  # noqa: E731
    history: list[dict[str, Any]] = []
    if uset.dynamic and remove > 0:
        solves: list[_Solve] = []
        step = functools.partial(_alternation_step, p, remove, trajectory_to, solves)
        won, history = alternate(step, h, uset, rounds, functools.partial(quad, h))
        first, best = solves[0], won.solution
    else:
        first = best = _solve(p, h_static if not uset.dynamic else h, remove, trajectory_to)
    nom = rel(quad(h, best.err))
    return StructuredResult(
        removed=list(best.chosen),
        kept=list(best.keep_groups),
        kept_columns=best.keep_cols,
        weight=best.new_w.to(weight.dtype),
        bias=None if best.new_b is None else best.new_b.to(bias.dtype),
        nominal_error=nom,
        robust_error=clamp_robust(nom, rel(robust_loss(best.err))),
        heldout_error=None if heldout is None else _heldout_error(heldout, bias is not None, w_full, best.err, name),
        trajectory=[rel(v) for v in first.losses],
        steps=first.steps,
        uncertainty=uset.describe(),
        history=history,
        seconds=time.perf_counter() - start,
    )
