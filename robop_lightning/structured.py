"""Structured RobOP: remove whole heads and MLP channels, physically (issue 7).

A transformer block holds two *units*, each a consumer linear fed by one or more producers:

==========================  ==============================  ===============================  =============
unit                        consumer (columns removed)      producers (rows removed)         group
==========================  ==============================  ===============================  =============
timm attention              ``attn.proj``                   ``attn.qkv`` (q, k, v rows)      one head
timm MLP                    ``mlp.fc2``                     ``mlp.fc1``                      one channel
HF attention (Llama, ...)   ``self_attn.o_proj``            ``q_proj``, ``k_proj``,          one KV group
                                                            ``v_proj``                       (its q heads)
HF MLP                      ``mlp.down_proj``               ``mlp.gate_proj``, ``up_proj``   one channel
==========================  ==============================  ===============================  =============

The maths (:func:`select_groups`) works on the consumer only. With ``X`` its calibration inputs
and ``H = X^T X``, removing the column groups ``S`` and keeping ``R`` costs, after the best update
of the kept columns,

    ``L(S) = min_{W'_R} ||X W^T - X_R W'^T_R||^2 = tr(W_S [(H^-1)_SS]^-1 W_S^T)``,
    ``W'_R = W_R + W_S H_SR H_RR^-1``                           (exact least squares on the kept columns).

Groups are chosen greedily (structured OBS): remove the group with the smallest saliency
``tr(W_G [(H^-1)_GG]^-1 W_G^T)``, update the weights and down-date ``H^-1``, repeat; the survivors
are then refitted exactly. A consumer bias is the weight of a constant input: it is appended to
``X`` as a ones column (never removable), so the refit also corrects the bias through the input
mean. The uncertainty sets of :mod:`robop_lightning.uncertainty` apply unchanged: static sets (the
authors' four) hand ``H + D`` to the greedy search, dynamic ones (minmax-trace / minmax-e, cvar) run the
alternating scheme of SPEC §3 with the whole structured selection as the solver.

Then the modules shrink (:func:`shrink_vit_block`, :func:`shrink_decoder_layer`): fewer heads
(``num_heads`` updated, ``head_dim`` unchanged), narrower MLPs, ordinary dense ``nn.Linear``, so the
model runs faster everywhere with no special kernel. :func:`prune_model_structured` does this block by
block, with per-layer or global budgets in parameters or FLOPs; ``prune_model(pattern="structured")``
calls it. Shrunk models save and load:

* Lightning: ``DeiTClassifier.load_from_checkpoint(path)`` / ``CausalLMModule.load_from_checkpoint(path)``
  (the checkpoint carries the shapes; the module's ``on_load_checkpoint`` shrinks before loading);
* plain PyTorch / HF: ``save_structured(model, directory)`` then
  ``load_structured(directory, model_factory)`` (or ``load_structured(directory)`` for a Hugging Face
  directory, rebuilt from its ``config.json``).
"""

from __future__ import annotations

import json
import math
import time
import warnings
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from robop_lightning.calibration import (
    capture_block_inputs,
    default_forward,
    find_blocks,
    resolve_targets,
    run_block,
)
from robop_lightning.gram import LayerInputs
from robop_lightning.report import LayerResult, PruneReport
from robop_lightning.uncertainty import ClosedFormSet, UncertaintySet, make_uncertainty
from robop_lightning.uncertainty.base import inner

__all__ = [
    "StructuredResult",
    "select_groups",
    "compensate",
    "shrink_vit_block",
    "shrink_decoder_layer",
    "block_units",
    "prune_model_structured",
    "structured_shapes",
    "apply_structured_shapes",
    "save_structured",
    "load_structured",
    "CHECKPOINT_KEY",
]

CHECKPOINT_KEY = "robop_structured"
_STEP = lambda k: 2 / (k + 2)  # noqa: E731


# =============================================================================== maths
@dataclass
class StructuredResult:
    """What :func:`select_groups` returns.

    Attributes:
        removed: indices (into ``groups``) of the removed groups, in greedy order.
        kept: indices of the kept groups, ascending.
        kept_columns: the consumer columns that stay, ascending (the new column order).
        weight: ``(out_features, len(kept_columns))`` compensated weight (input dtype).
        bias: the corrected bias (``None`` when the layer has none).
        nominal_error: ``tr(E H E^T) / tr(W H W^T)`` on the calibration inputs (bias included).
        robust_error: the set's robust loss of the result, same normalisation.
        trajectory: relative nominal loss after each greedy step (cumulative; for global budgets).
        steps: number of groups removed at each greedy step.
        uncertainty: the set used, with its radius.
        history: one entry per solve of the alternating scheme.
        seconds: wall time.
    """

    removed: list[int]
    kept: list[int]
    kept_columns: torch.Tensor
    weight: torch.Tensor
    bias: torch.Tensor | None
    nominal_error: float
    robust_error: float
    trajectory: list[float] = field(default_factory=list)
    steps: list[int] = field(default_factory=list)
    uncertainty: str = ""
    history: list[dict[str, Any]] = field(default_factory=list)
    seconds: float = 0.0


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

    Returns:
        A :class:`StructuredResult`.

    Example:
        >>> torch.manual_seed(0) and None
        >>> w, x = torch.randn(8, 12), torch.randn(64, 12)
        >>> r = select_groups(w, x, [[i] for i in range(12)], remove=4)
        >>> r.weight.shape, len(r.kept), 0 < r.nominal_error < 1
        (torch.Size([8, 8]), 8, True)
    """
    start = time.perf_counter()
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
    per_step = per_step or (1 if g <= 256 else math.ceil(g / 256))
    uset: UncertaintySet = make_uncertainty(uncertainty, radius, coupled)

    aug = _augmented(li) if bias is not None else li
    h = aug.gram(device="cpu")
    n1 = h.shape[0]
    mean_diag = float(h.diagonal()[:cols].mean())
    lam0 = damping * mean_diag if mean_diag > 0 else 1.0
    if isinstance(uset, ClosedFormSet):
        # the authors' D acts on the feature columns (the bias column is a constant input)
        uset.prepare(h[:cols, :cols], li, lam0)
        h_static = h.clone()
        if uset.matrix is not None:
            h_static[:cols, :cols] += uset.matrix
        robust_loss = lambda e: float(((e @ h) * e).sum()) + uset.robust_loss(e[:, :cols]) - inner(uset.h, e[:, :cols])  # noqa: E731
    else:
        uset.prepare(h, aug, lam0)
        h_static = uset.effective()
        robust_loss = uset.robust_loss
    damp = torch.zeros(n1, dtype=torch.float64)
    damp[:cols] = uset.ridge
    if bias is not None:
        damp[cols] = 1e-12 * float(h[cols, cols])

    w_full = weight.detach().to("cpu", torch.float64)
    if bias is not None:
        w_full = torch.cat([w_full, bias.detach().to("cpu", torch.float64)[:, None]], dim=1)
    all_groups = torch.arange(g)

    def damped(h_eff: torch.Tensor) -> torch.Tensor:
        hd = h_eff + torch.diag(damp)
        for _ in range(7):
            if int(torch.linalg.cholesky_ex(hd).info) == 0:
                return hd
            # x10, from no lower than 1e-6 of the Gram's scale (the authors' E has no ridge of its own)
            damp[:cols] = torch.clamp(damp[:cols] * 10, min=1e-6 * max(float(h_eff.diagonal()[:cols].mean()), 1e-300))
            hd = h_eff + torch.diag(damp)
        raise ValueError(f"{name}: the calibration Gram stays singular after damping; use more calibration data.")

    def solve(h_eff: torch.Tensor, count: int, record: int | None = None):
        hd = damped(h_eff)
        hinv = torch.linalg.inv(hd)  # (cholesky_inverse is ~20x slower on CPU here)
        hinv = 0.5 * (hinv + hinv.T)
        order, losses, steps = _greedy(w_full.clone(), hinv.clone(), idx, max(count, record or 0), per_step)
        chosen = order[:count]
        if 0 < count < g <= swap_limit:
            chosen = _swap_refine(w_full, hinv, idx, chosen)
        keep_groups = sorted(set(all_groups.tolist()) - set(chosen))
        keep_cols = torch.sort(idx[keep_groups].flatten()).values if keep_groups else torch.zeros(0, dtype=torch.long)
        free = torch.ones(cols, dtype=torch.bool)
        free[idx.flatten()] = False
        keep_cols = torch.sort(torch.cat([keep_cols, free.nonzero().flatten()])).values
        new_w, new_b = compensate(w_full[:, :cols], hd, keep_cols, None if bias is None else w_full[:, cols])
        err = w_full.clone()
        err[:, keep_cols] -= new_w
        if bias is not None:
            err[:, cols] -= new_b
        return chosen, keep_groups, keep_cols, new_w, new_b, err, losses, steps

    denom = float(((w_full @ h) * w_full).sum())
    rel = lambda v: v / denom if denom > 0 else 0.0  # noqa: E731
    nominal = lambda e: float(((e @ h) * e).sum())  # noqa: E731
    history: list[dict[str, Any]] = []

    first = solve(h_static if not uset.dynamic else h, remove, trajectory_to)
    traj_abs, steps = first[6], first[7]
    best = first
    if uset.dynamic and remove > 0:
        phi = robust_loss(first[5])
        history.append({"round": 0, "robust_loss": phi, "nominal_loss": nominal(first[5])})
        h_k, current = h, first
        for k in range(rounds):
            gk = _STEP(k)
            h_k = (1 - gk) * h_k + gk * uset.worst_case(current[5])
            current = solve(h_k, remove)
            phi_k = robust_loss(current[5])
            history.append({"round": k + 1, "robust_loss": phi_k, "nominal_loss": nominal(current[5])})
            if phi_k < phi:
                phi, best = phi_k, current
    chosen, keep_groups, keep_cols, new_w, new_b, err, _, _ = best
    robust = rel(robust_loss(err))
    nom = rel(nominal(err))
    if nom - 1e-6 * max(nom, 1e-30) <= robust < nom:
        robust = nom
    return StructuredResult(
        removed=list(chosen),
        kept=list(keep_groups),
        kept_columns=keep_cols,
        weight=new_w.to(weight.dtype),
        bias=None if new_b is None else new_b.to(bias.dtype),
        nominal_error=nom,
        robust_error=robust,
        trajectory=[rel(v) for v in traj_abs],
        steps=steps,
        uncertainty=uset.describe(),
        history=history,
        seconds=time.perf_counter() - start,
    )


# =============================================================================== surgery
def _index_rows(linear: nn.Linear, rows: torch.Tensor) -> None:
    """Keep only ``rows`` (output features) of ``linear``, in place (new Parameters, same module)."""
    rows = rows.to(linear.weight.device)
    linear.weight = nn.Parameter(linear.weight.detach()[rows].clone(), requires_grad=linear.weight.requires_grad)
    if linear.bias is not None:
        linear.bias = nn.Parameter(linear.bias.detach()[rows].clone(), requires_grad=linear.bias.requires_grad)
    linear.out_features = int(rows.numel())


def _set_columns(linear: nn.Linear, cols: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None) -> None:
    """Keep only input columns ``cols`` of ``linear``; ``weight`` / ``bias`` replace them when given."""
    old = linear.weight
    new = old.detach()[:, cols.to(old.device)].clone() if weight is None else weight.to(old.device, old.dtype).clone()
    linear.weight = nn.Parameter(new, requires_grad=old.requires_grad)
    if bias is not None and linear.bias is not None:
        linear.bias = nn.Parameter(bias.to(linear.bias.device, linear.bias.dtype).clone(), requires_grad=linear.bias.requires_grad)
    linear.in_features = int(new.shape[1])


def _snapshot(modules: dict[str, nn.Module], attrs: dict[str, tuple[nn.Module, str]]) -> Callable[[], None]:
    """An undo closure restoring the parameters and feature sizes of ``modules`` and the attributes."""
    saved = {
        n: (m, m.weight, m.bias, m.in_features, m.out_features) for n, m in modules.items() if isinstance(m, nn.Linear)
    }
    saved_attrs = {k: (obj, a, getattr(obj, a)) for k, (obj, a) in attrs.items() if hasattr(obj, a)}

    def undo() -> None:
        for m, w, b, i, o in saved.values():
            m.weight, m.in_features, m.out_features = w, i, o
            if b is not None:
                m.bias = b
        for obj, a, v in saved_attrs.values():
            setattr(obj, a, v)

    return undo


def _check_identity(module: nn.Module | None, what: str, name: str) -> None:
    if module is not None and not isinstance(module, nn.Identity):
        raise ValueError(
            f"{name}: {what} is a {type(module).__name__}, which mixes channels across heads / hidden units, so "
            "removing some changes it; structured pruning supports blocks without it (targets= other blocks)."
        )


def _keep_tensor(keep: Sequence[int] | torch.Tensor, total: int, what: str, name: str) -> torch.Tensor:
    k = torch.as_tensor(keep, dtype=torch.long).flatten()
    if k.numel() == 0:
        raise ValueError(f"{name}: keep at least one {what} (a block with none cannot run); got an empty list.")
    if k.unique().numel() != k.numel() or int(k.min()) < 0 or int(k.max()) >= total:
        raise ValueError(f"{name}: {what} indices must be distinct and in [0, {total}), got {k.tolist()}.")
    return torch.sort(k).values


@dataclass
class _Unit:
    """A consumer linear, its producers and the groups that can be removed together."""

    name: str  # the unit: "<block>.attn" / "<block>.mlp"
    kind: str  # "heads", "kv_groups" or "channels"
    consumer_name: str
    consumer: nn.Linear
    n_groups: int
    group_size: int  # consumer columns per group
    params_per_group: int
    flops_per_token: Callable[[int], float]  # per group, given the sequence length
    apply: Callable[..., Callable[[], None]]  # apply(keep, weight=None, bias=None) -> undo

    def groups(self) -> list[list[int]]:
        s = self.group_size
        return [list(range(i * s, (i + 1) * s)) for i in range(self.n_groups)]

    def columns(self, keep: torch.Tensor) -> torch.Tensor:
        s = self.group_size
        return (keep[:, None] * s + torch.arange(s)[None, :]).flatten()


def _vit_units(block: nn.Module, name: str) -> list[_Unit]:
    attn, mlp = getattr(block, "attn", None), getattr(block, "mlp", None)
    units: list[_Unit] = []
    if attn is not None:
        for a in ("qkv", "proj", "num_heads", "head_dim"):
            if not hasattr(attn, a):
                raise ValueError(
                    f"{name}.attn ({type(attn).__name__}) has no {a!r}: structured pruning supports timm's fused "
                    "`Attention` (qkv, proj, num_heads, head_dim)."
                )
        _check_identity(getattr(attn, "norm", None), "attn.norm (scale_norm)", name)
        heads, hd = int(attn.num_heads), int(attn.head_dim)
        if attn.qkv.out_features != 3 * heads * hd or attn.proj.in_features != heads * hd:
            raise ValueError(f"{name}.attn: qkv / proj shapes do not match num_heads x head_dim; unsupported layout.")
        dim = attn.qkv.in_features
        units.append(
            _Unit(
                name=f"{name}.attn",
                kind="heads",
                consumer_name=f"{name}.attn.proj",
                consumer=attn.proj,
                n_groups=heads,
                group_size=hd,
                params_per_group=3 * hd * (dim + (attn.qkv.bias is not None)) + hd * attn.proj.out_features,
                flops_per_token=lambda t, hd=hd, dim=dim, out=attn.proj.out_features: 2.0 * (3 * hd * dim + hd * out + 2 * t * hd),
                apply=lambda keep, weight=None, bias=None, block=block, name=name: shrink_vit_block(
                    block, keep_heads=keep, proj_weight=weight, proj_bias=bias, name=name
                ),
            )
        )
    if mlp is not None:
        if not (hasattr(mlp, "fc1") and hasattr(mlp, "fc2")) or mlp.fc1.out_features != mlp.fc2.in_features:
            raise ValueError(
                f"{name}.mlp ({type(mlp).__name__}) is not a plain timm `Mlp` (fc1 -> act -> fc2 with matching widths); "
                "gated MLPs (GluMlp, SwiGLU) are not supported by structured pruning yet."
            )
        _check_identity(getattr(mlp, "norm", None), "mlp.norm", name)
        dim, out = mlp.fc1.in_features, mlp.fc2.out_features
        units.append(
            _Unit(
                name=f"{name}.mlp",
                kind="channels",
                consumer_name=f"{name}.mlp.fc2",
                consumer=mlp.fc2,
                n_groups=mlp.fc1.out_features,
                group_size=1,
                params_per_group=dim + (mlp.fc1.bias is not None) + out,
                flops_per_token=lambda t, dim=dim, out=out: 2.0 * (dim + out),
                apply=lambda keep, weight=None, bias=None, block=block, name=name: shrink_vit_block(
                    block, keep_hidden=keep, fc2_weight=weight, fc2_bias=bias, name=name
                ),
            )
        )
    return units


def shrink_vit_block(
    block: nn.Module,
    keep_heads: Sequence[int] | torch.Tensor | None = None,
    keep_hidden: Sequence[int] | torch.Tensor | None = None,
    proj_weight: torch.Tensor | None = None,
    proj_bias: torch.Tensor | None = None,
    fc2_weight: torch.Tensor | None = None,
    fc2_bias: torch.Tensor | None = None,
    name: str = "block",
) -> Callable[[], None]:
    """Physically remove heads and MLP channels of a timm ViT / DeiT ``Block``, in place.

    ``qkv`` keeps the q, k and v rows of the kept heads, ``proj`` their columns, ``num_heads`` /
    ``attn_dim`` shrink (``head_dim`` and the scale are unchanged); ``fc1`` keeps the rows of the kept
    hidden channels and ``fc2`` their columns. Without ``proj_weight`` / ``fc2_weight`` the kept
    columns are copied as they are (no compensation).

    Args:
        block: a timm ``Block`` (``attn``: ``Attention``, ``mlp``: ``Mlp``).
        keep_heads: indices of the heads to keep (``None``: attention untouched).
        keep_hidden: indices of the MLP hidden channels to keep (``None``: MLP untouched).
        proj_weight, proj_bias: new ``attn.proj`` weight ``(dim, kept_heads * head_dim)`` / bias.
        fc2_weight, fc2_bias: new ``mlp.fc2`` weight ``(dim, kept_hidden)`` / bias.
        name: the block's name in messages.

    Returns:
        A function that undoes the surgery.

    Example:
        >>> import timm, torch
        >>> vit = timm.create_model("deit_tiny_patch16_224", img_size=32, patch_size=8, embed_dim=48,
        ...                         depth=2, num_heads=4, num_classes=3)
        >>> _ = shrink_vit_block(vit.blocks[0], keep_heads=[0, 2], keep_hidden=range(100))
        >>> vit.blocks[0].attn.num_heads, vit.blocks[0].mlp.fc1.out_features, vit(torch.randn(1, 3, 32, 32)).shape
        (2, 100, torch.Size([1, 3]))
    """
    attn, mlp = getattr(block, "attn", None), getattr(block, "mlp", None)
    mods: dict[str, nn.Module] = {}
    attrs: dict[str, tuple[nn.Module, str]] = {}
    if keep_heads is not None:
        _vit_units(block, name)  # validates the layout
        mods.update({"qkv": attn.qkv, "proj": attn.proj})
        if getattr(attn, "gate", None) is not None:
            mods["gate"] = attn.gate
        attrs.update({"h": (attn, "num_heads"), "d": (attn, "attn_dim")})
    if keep_hidden is not None:
        mods.update({"fc1": mlp.fc1, "fc2": mlp.fc2})
    undo = _snapshot(mods, attrs)
    try:
        if keep_heads is not None:
            heads, hd = int(attn.num_heads), int(attn.head_dim)
            k = _keep_tensor(keep_heads, heads, "head", f"{name}.attn")
            cols = (k[:, None] * hd + torch.arange(hd)[None, :]).flatten()
            rows = torch.cat([cols + t * heads * hd for t in range(3)])
            _index_rows(attn.qkv, rows)
            if getattr(attn, "gate", None) is not None:
                _index_rows(attn.gate, cols)
            _set_columns(attn.proj, cols, proj_weight, proj_bias)
            attn.num_heads = int(k.numel())
            if hasattr(attn, "attn_dim"):
                attn.attn_dim = int(k.numel()) * hd
        if keep_hidden is not None:
            k = _keep_tensor(keep_hidden, mlp.fc1.out_features, "MLP channel", f"{name}.mlp")
            _index_rows(mlp.fc1, k)
            _set_columns(mlp.fc2, k, fc2_weight, fc2_bias)
    except BaseException:
        undo()
        raise
    return undo


def _decoder_units(layer: nn.Module, name: str) -> list[_Unit]:
    attn, mlp = getattr(layer, "self_attn", None), getattr(layer, "mlp", None)
    units: list[_Unit] = []
    if attn is not None:
        for a in ("q_proj", "k_proj", "v_proj", "o_proj", "head_dim"):
            if not hasattr(attn, a):
                raise ValueError(
                    f"{name}.self_attn ({type(attn).__name__}) has no {a!r}: structured pruning supports Hugging Face "
                    "attention with separate q_proj / k_proj / v_proj / o_proj (Llama, Mistral, Qwen, Gemma)."
                )
        hd = int(attn.head_dim)
        q_heads, kv_heads = attn.q_proj.out_features // hd, attn.k_proj.out_features // hd
        if q_heads * hd != attn.q_proj.out_features or q_heads % kv_heads or attn.o_proj.in_features != q_heads * hd:
            raise ValueError(f"{name}.self_attn: projection shapes do not match head_dim={hd}; unsupported layout.")
        r = q_heads // kv_heads
        dim, out = attn.q_proj.in_features, attn.o_proj.out_features
        bias = int(attn.q_proj.bias is not None)
        units.append(
            _Unit(
                name=f"{name}.self_attn",
                kind="kv_groups",
                consumer_name=f"{name}.self_attn.o_proj",
                consumer=attn.o_proj,
                n_groups=kv_heads,
                group_size=r * hd,
                params_per_group=(r + 2) * hd * (dim + bias) + r * hd * out,
                flops_per_token=lambda t, hd=hd, r=r, dim=dim, out=out: 2.0 * ((r + 2) * hd * dim + r * hd * out + 2 * t * r * hd),
                apply=lambda keep, weight=None, bias=None, layer=layer, name=name: shrink_decoder_layer(
                    layer, keep_kv_groups=keep, o_weight=weight, o_bias=bias, name=name
                ),
            )
        )
    if mlp is not None:
        for a in ("gate_proj", "up_proj", "down_proj"):
            if not hasattr(mlp, a):
                raise ValueError(
                    f"{name}.mlp ({type(mlp).__name__}) has no {a!r}: structured pruning supports gated MLPs "
                    "(gate_proj, up_proj, down_proj) of Hugging Face decoders."
                )
        dim, out = mlp.gate_proj.in_features, mlp.down_proj.out_features
        bias = int(mlp.gate_proj.bias is not None)
        units.append(
            _Unit(
                name=f"{name}.mlp",
                kind="channels",
                consumer_name=f"{name}.mlp.down_proj",
                consumer=mlp.down_proj,
                n_groups=mlp.down_proj.in_features,
                group_size=1,
                params_per_group=2 * (dim + bias) + out,
                flops_per_token=lambda t, dim=dim, out=out: 2.0 * (2 * dim + out),
                apply=lambda keep, weight=None, bias=None, layer=layer, name=name: shrink_decoder_layer(
                    layer, keep_hidden=keep, down_weight=weight, down_bias=bias, name=name
                ),
            )
        )
    return units


def shrink_decoder_layer(
    layer: nn.Module,
    keep_kv_groups: Sequence[int] | torch.Tensor | None = None,
    keep_hidden: Sequence[int] | torch.Tensor | None = None,
    o_weight: torch.Tensor | None = None,
    o_bias: torch.Tensor | None = None,
    down_weight: torch.Tensor | None = None,
    down_bias: torch.Tensor | None = None,
    name: str = "layer",
) -> Callable[[], None]:
    """Physically remove KV groups and MLP channels of a Hugging Face decoder layer, in place.

    Grouped-query attention: a KV group is one key / value head with the ``num_attention_heads /
    num_key_value_heads`` query heads that read it; keeping whole groups keeps that ratio, so the
    stock forward (which infers the head count from the projection width) runs unchanged. ``q_proj``,
    ``k_proj``, ``v_proj`` keep the rows of the kept groups, ``o_proj`` their columns; per-head
    ``q_norm`` / ``k_norm`` (Gemma 3, Qwen 3) act on ``head_dim`` and are unaffected. The MLP keeps
    rows of ``gate_proj`` / ``up_proj`` and columns of ``down_proj``. The layer records its new
    sizes as ``self_attn.num_heads``, ``self_attn.num_key_value_heads`` and ``mlp.intermediate_size``.

    Args:
        layer: a decoder layer (``LlamaDecoderLayer`` and relatives).
        keep_kv_groups: indices of the KV heads to keep (``None``: attention untouched).
        keep_hidden: indices of the MLP channels to keep (``None``: MLP untouched).
        o_weight, o_bias: new ``o_proj`` weight / bias for the kept columns (``None``: sliced).
        down_weight, down_bias: new ``down_proj`` weight / bias (``None``: sliced).
        name: the layer's name in messages.

    Returns:
        A function that undoes the surgery.

    Example:
        >>> import torch
        >>> from transformers import LlamaConfig, LlamaForCausalLM
        >>> cfg = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
        ...                   num_attention_heads=4, num_key_value_heads=2, vocab_size=64)
        >>> lm = LlamaForCausalLM(cfg)
        >>> _ = shrink_decoder_layer(lm.model.layers[0], keep_kv_groups=[1], keep_hidden=range(40))
        >>> lm.model.layers[0].self_attn.q_proj.out_features, lm(torch.tensor([[1, 2, 3]])).logits.shape
        (16, torch.Size([1, 3, 64]))
    """
    units = _decoder_units(layer, name)
    attn, mlp = getattr(layer, "self_attn", None), getattr(layer, "mlp", None)
    mods: dict[str, nn.Module] = {}
    attrs: dict[str, tuple[nn.Module, str]] = {}
    if keep_kv_groups is not None:
        mods.update({"q": attn.q_proj, "k": attn.k_proj, "v": attn.v_proj, "o": attn.o_proj})
        attrs.update({"nh": (attn, "num_heads"), "nkv": (attn, "num_key_value_heads")})
    if keep_hidden is not None:
        mods.update({"g": mlp.gate_proj, "u": mlp.up_proj, "d": mlp.down_proj})
        attrs["i"] = (mlp, "intermediate_size")
    undo = _snapshot(mods, attrs)
    try:
        if keep_kv_groups is not None:
            unit = units[0]
            hd = int(attn.head_dim)
            kv = _keep_tensor(keep_kv_groups, unit.n_groups, "KV group", f"{name}.self_attn")
            q_cols = unit.columns(kv)
            kv_rows = (kv[:, None] * hd + torch.arange(hd)[None, :]).flatten()
            _index_rows(attn.q_proj, q_cols)
            _index_rows(attn.k_proj, kv_rows)
            _index_rows(attn.v_proj, kv_rows)
            _set_columns(attn.o_proj, q_cols, o_weight, o_bias)
            attn.num_key_value_heads = int(kv.numel())
            attn.num_heads = int(q_cols.numel()) // hd
        if keep_hidden is not None:
            k = _keep_tensor(keep_hidden, mlp.down_proj.in_features, "MLP channel", f"{name}.mlp")
            _index_rows(mlp.gate_proj, k)
            _index_rows(mlp.up_proj, k)
            _set_columns(mlp.down_proj, k, down_weight, down_bias)
            mlp.intermediate_size = int(k.numel())
    except BaseException:
        undo()
        raise
    return undo


def block_units(block: nn.Module, name: str = "block") -> list[_Unit]:
    """The prunable units of a block: timm ``Block`` (attn / mlp) or HF decoder layer (self_attn / mlp).

    Raises:
        ValueError: the block is neither (naming the block and what is supported).
    """
    if hasattr(block, "self_attn") or hasattr(getattr(block, "mlp", None), "down_proj"):
        return _decoder_units(block, name)
    if hasattr(getattr(block, "attn", None), "qkv") or hasattr(getattr(block, "mlp", None), "fc2"):
        return _vit_units(block, name)
    raise ValueError(
        f"{name} ({type(block).__name__}) is not a supported block for pattern='structured': use a timm ViT / DeiT "
        "(blocks with attn.qkv / attn.proj and mlp.fc1 / mlp.fc2) or a Hugging Face decoder (self_attn.q_proj / "
        "k_proj / v_proj / o_proj and mlp.gate_proj / up_proj / down_proj)."
    )


# =============================================================================== model level
def _mark(block: nn.Module) -> None:
    block._robop_structured = True  # read by structured_shapes (checkpoints of shrunk models)


def _check_budget(sparsity, budget, cost, min_keep, max_sparsity) -> None:
    if isinstance(sparsity, bool) or not isinstance(sparsity, (int, float)) or not 0.0 <= float(sparsity) < 1.0:
        raise ValueError(
            f"pattern='structured': sparsity must be in [0, 1) (the fraction of block parameters removed), got "
            f"{sparsity!r}. For half of the heads and MLP channels pass 0.5."
        )
    if budget not in ("layer", "global"):
        raise ValueError(f"budget must be 'layer' (every unit loses the same share) or 'global', got {budget!r}.")
    if cost not in ("params", "flops"):
        raise ValueError(f"cost must be 'params' or 'flops' (what the global budget counts), got {cost!r}.")
    if isinstance(min_keep, bool) or not isinstance(min_keep, int) or min_keep < 1:
        raise ValueError(f"min_keep must be an integer >= 1 (groups every unit keeps), got {min_keep!r}.")
    if not isinstance(max_sparsity, (int, float)) or not 0.0 < max_sparsity < 1.0:
        raise ValueError(f"max_sparsity must be in (0, 1) (the most any unit may lose), got {max_sparsity!r}.")
    if float(sparsity) > max_sparsity:
        raise ValueError(f"sparsity={sparsity} exceeds max_sparsity={max_sparsity}; raise max_sparsity.")


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
):
    """Remove whole heads / KV groups and MLP channels of every block, physically, in place.

    Block by block (SPEC §5): the attention unit is pruned first from the block's calibration
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
    start = time.perf_counter()
    _check_budget(sparsity, budget, cost, min_keep, max_sparsity)
    make_uncertainty(uncertainty, radius, coupled)
    forward = forward or default_forward
    structure = find_blocks(model, blocks)
    if structure is None:
        raise ValueError(
            f"pattern='structured' needs a model with repeated transformer blocks; none found in {type(model).__name__}. "
            "Pass blocks='<dotted name of the block list>'."
        )
    container, block_list = structure
    chosen = set(resolve_targets(model, targets, ignore, [b for b, _ in block_list]))
    units: list[tuple[int, _Unit]] = []
    for i, (bname, block) in enumerate(block_list):
        for unit in block_units(block, bname):
            if unit.consumer_name in chosen:
                units.append((i, unit))
    if not units:
        raise ValueError(
            "pattern='structured': no unit to prune; targets / ignore must select consumers such as "
            "'re:attn.proj', 're:mlp.fc2', 're:o_proj' or 're:down_proj'."
        )
    batches = list(calibration)
    if not batches:
        raise ValueError("calibration is empty: pass an iterable with at least one batch.")
    first_param = next(model.parameters())
    device = first_param.device
    storage = torch.device("cpu")
    engine = dict(uncertainty=uncertainty, radius=radius, coupled=coupled, rounds=rounds, damping=damping, per_step=per_step)
    report = PruneReport(
        config={
            "sparsity": float(sparsity),
            "pattern": "structured",
            "solver": "structured-obs",
            "uncertainty": uncertainty,
            "radius": radius,
            "budget": budget,
            "cost": cost,
            "blocks": container,
            "calibration_batches": len(batches),
            "coupled": coupled,
            "rounds": rounds,
            "damping": damping,
        }
    )
    plans = [
        {
            "unit": u,
            "block": i,
            "remove": min(int(round(sparsity * u.n_groups)), u.n_groups - min_keep),
            "max": min(int(math.floor(max_sparsity * u.n_groups)), u.n_groups - min_keep),
        }
        for i, u in units
    ]
    by_block: dict[int, list[dict[str, Any]]] = {}
    for p in plans:
        by_block.setdefault(p["block"], []).append(p)
    if budget == "layer":
        for block_plans in by_block.values():
            _balance_block(block_plans, float(sparsity), min_keep)
    last = max(by_block)
    undos: list[Callable[[], None]] = []
    premarked = {id(b) for _, b in block_list if getattr(b, "_robop_structured", False)}
    modes = {m: m.training for m in model.modules()}
    current = [container]
    tokens = [1]

    def capture(block: nn.Module, calls, unit: _Unit) -> torch.Tensor:
        return run_block(block, calls, device, storage, {unit.consumer_name: unit.consumer}, propagate=False)[
            unit.consumer_name
        ]

    try:
        model.eval()
        with torch.no_grad():
            if budget == "global" and sparsity > 0:
                calls = capture_block_inputs(model, block_list[0][1], batches, forward, device, storage, block_list[0][0])
                for i, (bname, block) in enumerate(_bar(block_list[: last + 1], progress, "planning blocks")):
                    current[0] = bname
                    for p in by_block.get(i, []):
                        u = p["unit"]
                        x = capture(block, calls, u)
                        tokens[0] = x.shape[1]
                        r = select_groups(
                            u.consumer.weight.detach(), x, u.groups(), 0, bias=u.consumer.bias,
                            trajectory_to=p["max"], name=u.consumer_name, **engine,
                        )
                        p["trajectory"], p["steps"] = r.trajectory, r.steps
                    if i < last:
                        run_block(block, calls, device, storage)
                del calls
            measure = (lambda u: u.params_per_group) if cost == "params" else (lambda u: u.flops_per_token(tokens[0]))
            if budget == "global" and sparsity > 0:
                for p in plans:
                    p["cost"] = float(measure(p["unit"]))
                total = sum(p["cost"] * p["unit"].n_groups for p in plans)
                _allocate(plans, sparsity * total)

            calls = capture_block_inputs(model, block_list[0][1], batches, forward, device, storage, block_list[0][0])
            for i, (bname, block) in enumerate(_bar(block_list[: last + 1], progress, "pruning blocks")):
                current[0] = bname
                for p in by_block.get(i, []):
                    u = p["unit"]
                    current[0] = u.consumer_name
                    x = capture(block, calls, u)
                    tokens[0] = x.shape[1]
                    r = select_groups(
                        u.consumer.weight.detach(), x, u.groups(), p["remove"], bias=u.consumer.bias,
                        name=u.consumer_name, **engine,
                    )
                    del x
                    if p["remove"] > 0:
                        undos.append(u.apply(torch.tensor(r.kept), r.weight, r.bias))
                        _mark(block)
                    report.layers.append(
                        {
                            "name": u.consumer_name,
                            "unit": u.name,
                            "kind": u.kind,
                            "shape": list(u.consumer.weight.shape),
                            "parameters": u.n_groups * u.params_per_group,
                            "sparsity": p["remove"] / u.n_groups,
                            "groups": u.n_groups,
                            "kept": u.n_groups - p["remove"],
                            "removed": sorted(r.removed),
                            "nominal_error": float(r.nominal_error),
                            "robust_error": float(r.robust_error),
                            "heldout_error": None,
                            "srank": None,
                            "seconds": float(r.seconds),
                        }
                    )
                if i < last:
                    current[0] = bname
                    run_block(block, calls, device, storage)
            del calls
    except BaseException as err:
        for undo in reversed(undos):
            undo()
        for _, block in block_list:
            if id(block) not in premarked and hasattr(block, "_robop_structured"):
                del block._robop_structured
        note = f"while pruning {current[0]} structurally (the model was restored)"
        if type(err) in (ValueError, RuntimeError) and current[0] not in str(err):
            raise type(err)(f"{current[0]}: {err} [{note}]") from err
        if hasattr(err, "add_note"):
            err.add_note(note)
        raise
    finally:
        for m, mode in modes.items():
            m.training = mode
    all_cost = {
        "params": sum(u.n_groups * u.params_per_group for _, u in units),
        "flops": sum(u.n_groups * u.flops_per_token(tokens[0]) for _, u in units),
    }
    for key, fn in (("params", lambda u: u.params_per_group), ("flops", lambda u: u.flops_per_token(tokens[0]))):
        removed = sum(p["remove"] * fn(p["unit"]) for p in plans)
        report.config[f"{key}_removed"] = removed / all_cost[key] if all_cost[key] else 0.0
    report.seconds = time.perf_counter() - start
    _record_config(model)
    return report


def _bar(items: list, progress: bool | None, desc: str):
    import sys

    if progress is False or not sys.stderr.isatty():
        return items
    from tqdm.auto import tqdm

    return tqdm(items, desc=desc, leave=False)


# =============================================================================== save / load
def _unit_key(unit: _Unit, block_name: str) -> str:
    return unit.name[len(block_name) + 1 :]


def structured_shapes(model: nn.Module) -> dict[str, Any] | None:
    """The per-block sizes of a structurally pruned model, or ``None`` when no block was shrunk.

    ``{"version": 1, "blocks": "<container>", "layers": {"<block name>": {"attn": heads, "mlp": channels}}}``
    (``self_attn`` counts KV groups for Hugging Face decoders); names are relative to ``model``.
    """
    structure = find_blocks(model)
    if structure is None:
        return None
    container, block_list = structure
    layers = {}
    for bname, block in block_list:
        if getattr(block, "_robop_structured", False):
            layers[bname] = {_unit_key(u, bname): u.n_groups for u in block_units(block, bname)}
    if not layers:
        return None
    return {"version": 1, "blocks": container, "layers": layers}


def apply_structured_shapes(model: nn.Module, spec: dict[str, Any] | None) -> nn.Module:
    """Shrink a freshly built model to the sizes in ``spec`` (from :func:`structured_shapes`), in place.

    The kept weights are placeholders (the first groups); load the pruned state dict afterwards.
    ``None`` does nothing. Returns ``model``.

    Raises:
        ValueError: a block named in ``spec`` does not exist or is already smaller than asked.
    """
    if not spec:
        return model
    for bname, counts in spec.get("layers", {}).items():
        try:
            block = model.get_submodule(bname)
        except AttributeError:
            raise ValueError(
                f"the structured shapes name block {bname!r}, which {type(model).__name__} does not have; build the "
                "same architecture (and wrapper) that was pruned."
            ) from None
        for unit in block_units(block, bname):
            want = counts.get(_unit_key(unit, bname))
            if want is None or want == unit.n_groups:
                continue
            if want > unit.n_groups:
                raise ValueError(f"{unit.name}: the checkpoint has {want} groups but the model only {unit.n_groups}.")
            unit.apply(torch.arange(want))
            _mark(block)
    return model


def _hf_root(model: nn.Module) -> nn.Module | None:
    for m in model.modules():
        if callable(getattr(m, "save_pretrained", None)) and hasattr(getattr(m, "config", None), "to_dict"):
            return m
    return None


def _record_config(model: nn.Module) -> None:
    """Write the per-layer sizes into a Hugging Face model's config (``config.robop_structured``)."""
    root = _hf_root(model)
    if root is not None:
        spec = structured_shapes(root)
        if spec is not None:
            root.config.robop_structured = spec


def save_structured(model: nn.Module, path: str | Path) -> Path:
    """Save a (structurally pruned) model to the directory ``path``; load it with :func:`load_structured`.

    A Hugging Face model is written with ``save_pretrained`` (``config.json`` then carries the per-layer
    sizes as ``robop_structured``); any other model as ``model.safetensors`` plus ``structured.json``.

    Example:
        >>> import tempfile, timm, torch
        >>> make = lambda: timm.create_model("deit_tiny_patch16_224", img_size=32, patch_size=8,
        ...                                  embed_dim=48, depth=2, num_heads=4, num_classes=3)
        >>> vit = make().eval()
        >>> _ = prune_model_structured(vit, [torch.randn(4, 3, 32, 32)], sparsity=0.5, uncertainty="baseline")
        >>> d = tempfile.mkdtemp()
        >>> _ = save_structured(vit, d)
        >>> again = load_structured(d, make).eval()   # the one-line loader
        >>> x = torch.randn(2, 3, 32, 32)
        >>> torch.equal(again(x), vit(x))
        True
    """
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    spec = structured_shapes(model)
    if callable(getattr(model, "save_pretrained", None)) and hasattr(getattr(model, "config", None), "to_dict"):
        if spec is not None:
            model.config.robop_structured = spec
        model.save_pretrained(path)
        return path
    from safetensors.torch import save_model

    save_model(model, str(path / "model.safetensors"))
    (path / "structured.json").write_text(json.dumps(spec or {"version": 1, "layers": {}}, indent=2) + "\n")
    return path


def load_structured(path: str | Path, model: nn.Module | Callable[[], nn.Module] | None = None) -> nn.Module:
    """Load what :func:`save_structured` wrote: ``load_structured(directory, model_factory)``.

    Args:
        path: the directory.
        model: a freshly built full-size model of the same architecture, or a function building one
            (such as ``lambda: timm.create_model("deit_small_patch16_224")``). ``None`` for a Hugging
            Face directory: the model is rebuilt from its ``config.json`` (``AutoModelForCausalLM``).

    Returns:
        The model, shrunk to the saved sizes, with the saved weights (strictly loaded).

    Raises:
        ValueError: no model given for a non-HF directory, or the weights do not match.
    """
    from safetensors.torch import load_file

    path = Path(path)
    spec = None
    if (path / "structured.json").exists():
        spec = json.loads((path / "structured.json").read_text())
    if model is None:
        if not (path / "config.json").exists():
            raise ValueError(
                f"{path} is not a Hugging Face directory; pass the model (or a function that builds the full-size model): "
                "load_structured(path, lambda: timm.create_model(...))."
            )
        from transformers import AutoConfig, AutoModelForCausalLM

        config = AutoConfig.from_pretrained(path)
        model = AutoModelForCausalLM.from_config(config)
    elif not isinstance(model, nn.Module):
        model = model()
    if spec is None and (path / "config.json").exists():
        spec = json.loads((path / "config.json").read_text()).get("robop_structured")
    apply_structured_shapes(model, spec)
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise ValueError(f"{path} holds no .safetensors weights; save with save_structured(model, path).")
    state: dict[str, torch.Tensor] = {}
    for f in files:
        state.update(load_file(str(f)))
    missing, unexpected = model.load_state_dict(state, strict=False)
    if callable(getattr(model, "tie_weights", None)):
        model.tie_weights()
    params = dict(model.state_dict(keep_vars=True))
    loaded_ptrs = {params[k].data_ptr() for k in state if k in params}
    missing = [k for k in missing if params[k].data_ptr() not in loaded_ptrs]
    if missing or unexpected:
        raise ValueError(
            f"the weights in {path} do not match the model: missing {missing[:5]}, unexpected {list(unexpected)[:5]}; "
            "build the same architecture that was pruned."
        )
    return model


# =============================================================================== engine entry points
def prune_layer_structured(
    weight, inputs, sparsity, uncertainty, radius, coupled, rounds, heldout, damping, solver_options, prior_mask, name
):
    """``prune_layer(pattern="structured")``: zero whole input columns (or groups) and compensate the rest.

    The layer keeps its shape (the removed columns are exact zeros, the same in every row); use
    :func:`prune_model_structured` to shrink modules physically. ``solver_options`` may hold
    ``groups`` (index lists, e.g. one per head; default: single columns) and ``per_step``.
    The fraction of groups removed is ``round(sparsity * groups)``.

    Example:
        >>> from robop_lightning import prune_layer
        >>> r = prune_layer(torch.randn(8, 16), torch.randn(64, 16), sparsity=0.25, pattern="structured")
        >>> int((r.mask.sum(0) == 0).sum()), r.pattern
        (4, 'structured')
    """
    from robop_lightning.gram import as_layer_inputs
    from robop_lightning.patterns import parse_pattern

    start = time.perf_counter()
    pat = parse_pattern("structured", sparsity)
    rows, cols = weight.shape
    options = dict(solver_options or {})
    groups = options.pop("groups", None) or [[j] for j in range(cols)]
    per_step = options.pop("per_step", None)
    if options:
        raise ValueError(f"{name}: pattern='structured' takes solver_options groups and per_step, got {sorted(options)}.")
    if prior_mask is not None:
        raise ValueError(f"{name}: prior_mask (gradual schedules) is not supported with pattern='structured'.")
    remove = min(int(round(pat.sparsity * len(groups))), len(groups) - 1)
    li = as_layer_inputs(inputs, cols, name=f"{name}: inputs")
    r = select_groups(
        weight, li, groups, remove, uncertainty=uncertainty, radius=radius, coupled=coupled, damping=damping,
        rounds=rounds, per_step=per_step, name=name,
    )
    out = torch.zeros_like(weight)
    out[:, r.kept_columns.to(weight.device)] = r.weight.to(weight.device, weight.dtype)
    mask = torch.zeros(rows, cols, dtype=torch.bool, device=weight.device)
    mask[:, r.kept_columns.to(weight.device)] = True
    heldout_error = None
    if heldout is not None:
        hh = as_layer_inputs(heldout, cols, name=f"{name}: heldout").gram(device="cpu")
        e = (weight.detach().double().cpu() - out.double().cpu())
        w64 = weight.detach().double().cpu()
        den = float(((w64 @ hh) * w64).sum())
        heldout_error = float(((e @ hh) * e).sum()) / den if den > 0 else 0.0
    return LayerResult(
        weight=out,
        mask=mask,
        nominal_error=r.nominal_error,
        robust_error=r.robust_error,
        heldout_error=heldout_error,
        sparsity=1.0 - float(mask.float().mean()),
        seconds=time.perf_counter() - start,
        solver="structured-obs",
        uncertainty=r.uncertainty,
        pattern="structured",
        damping=float(damping),
        history=r.history,
    )


_STRUCTURED_OPTIONS = ("budget", "cost", "min_keep", "max_sparsity", "per_step")


def prune_model_structured_from_engine(
    model, calibration, sparsity, uncertainty, radius, targets, ignore, blocks, heldout_fraction, forward, progress,
    prior_masks, engine_kwargs,
):
    """``prune_model(pattern="structured", ...)``: map its arguments onto :func:`prune_model_structured`."""
    engine = dict(engine_kwargs)
    options = dict(engine.pop("solver_options", None) or {})
    unknown = sorted(set(engine) - {"coupled", "rounds", "damping"}) + sorted(set(options) - set(_STRUCTURED_OPTIONS))
    if unknown:
        raise TypeError(
            f"prune_model(pattern='structured') got unexpected option(s) {', '.join(unknown)}; it takes coupled, rounds, "
            f"damping, and solver_options with {', '.join(_STRUCTURED_OPTIONS)}."
        )
    if heldout_fraction:
        raise ValueError("pattern='structured' does not report held-out errors yet; pass heldout_fraction=0.")
    if prior_masks:
        raise ValueError("pattern='structured' removes modules physically; prior_masks (gradual schedules) do not apply.")
    return prune_model_structured(
        model, calibration, sparsity=0.5 if sparsity is None else sparsity, uncertainty=uncertainty, radius=radius,
        targets=targets, ignore=ignore, blocks=blocks, forward=forward, progress=progress, **engine, **options,
    )


# =============================================================================== Lightning
def check_callback_options(pattern, prune_at, schedule, options) -> dict[str, Any] | None:
    """``RobOPCallback`` arguments for ``pattern="structured"``: the options dict, or ``None`` for other patterns."""
    structured = isinstance(pattern, str) and pattern.strip().lower() == "structured"
    if not structured:
        if options is not None:
            raise ValueError("structured_options only apply to pattern='structured'.")
        return None
    options = dict(options or {})
    unknown = sorted(set(options) - set(_STRUCTURED_OPTIONS))
    if unknown:
        raise ValueError(f"unknown structured_options {unknown}: use {', '.join(_STRUCTURED_OPTIONS)}.")
    if prune_at != "start" or schedule is not None:
        raise ValueError(
            "pattern='structured' shrinks the modules, so it prunes once before training: use prune_at='start' "
            "without a schedule (then the whole fit is recovery fine-tuning), or trainer.validate / trainer.test."
        )
    _check_budget(
        0.5, options.get("budget", "layer"), options.get("cost", "params"), options.get("min_keep", 1),
        options.get("max_sparsity", 0.9),
    )
    return options


def callback_prune(callback, trainer, pl_module, sparsity):
    """The structured branch of ``RobOPCallback._prune``: shrink, then rebuild the optimizers when fitting.

    Lightning creates the optimizers in ``strategy.setup`` (before ``on_fit_start``), so after the
    parameters change shape ``configure_optimizers`` runs again (``strategy.setup_optimizers``) and the
    new optimizers move to the device; the LR schedule starts from step 0 of the recovery fine-tune.
    """
    from lightning.fabric.utilities.optimizer import _optimizers_to_device
    from lightning.pytorch.utilities.exceptions import MisconfigurationException

    if trainer.world_size > 1:
        raise MisconfigurationException(
            "RobOPCallback(pattern='structured') runs on one process: under DDP the wrapper's buckets are built for the "
            "old shapes. Shrink first with prune_model(model, batches, pattern='structured'), save, and fine-tune the "
            "shrunk model under DDP."
        )
    from robop_lightning.model import prune_model

    report = prune_model(
        pl_module,
        callback._calibration_batches(trainer, pl_module),
        sparsity=sparsity,
        pattern="structured",
        uncertainty=callback.uncertainty,
        radius=callback.radius,
        targets=callback.targets,
        ignore=callback.ignore,
        progress=callback.progress and trainer.is_global_zero,
        solver_options=dict(callback.structured_options),
    )
    if trainer.state.fn == "fit":
        trainer.strategy.setup_optimizers(trainer)
        _optimizers_to_device(trainer.strategy.optimizers, trainer.strategy.root_device)
    return report
