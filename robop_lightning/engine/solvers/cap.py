"""CAP (Kuznedelev et al., NeurIPS 2023): correlation-aware OBS elimination (the OBC recurrence).

Per output row, weights are removed one at a time. Each step removes
``q* = argmin_q w_q^2 / [H^-1]_qq`` (its exact loss increase), updates the survivors with the OBS
correction ``w -= (w_q / [H^-1]_qq) H^-1[:, q]`` and down-dates the inverse by the rank-one
elimination of ``q``, so later saliencies see earlier removals.

The loss of every step is recorded (made non-decreasing by a running max); one threshold across
all rows (``"unstructured"``) or within each row (``"row"``) then decides how many weights each
row loses, and the elimination is replayed up to that count to produce the weights. For ``N:M``
the step only considers groups that still have fewer than ``M - N`` removals.

The curvature is the (effective, damped) layer Gram. ``block_size`` restricts it to diagonal
blocks of that many inputs, CAP's block approximation, which turns ``O(n^3)`` per row into
``O(n B^2)``. Rows are processed in chunks bounded by ``chunk_bytes``.

Speed: the running inverse is kept as ``H^-1_0 - C C^T`` (a step reads ``O(n t)`` numbers, no
``n^2`` down-date), and the first pass stops each row after the number of steps the budget
plausibly needs; rows that might need more are re-run in full, so the result is exactly that of
eliminating every weight of every row (``truncate=False`` does that directly).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from robop_lightning.engine.patterns import Pattern
from robop_lightning.engine.solvers._linalg import cholesky_inverse


def _eliminate(w, hinv0, removed, steps, pattern, trajectory=None, forced=None, counts=None, first=None, which=None):
    """Run ``steps`` OBS eliminations on a batch of independent problems (``w`` in place).

    ``hinv0`` holds the initial inverse Grams: problem ``i`` starts from ``hinv0[which[i]]``
    (``which=None``: one inverse per problem, ``hinv0[i]``), so problems that share an inverse
    (the rows of a layer) read it without a copy each. The inverse after ``t`` removals is kept in
    factored form, ``H^-1_t = H^-1_0 - C_t C_t^T`` with ``C_t`` the scaled eliminated columns, so a
    step reads ``O(size * t)`` numbers instead of down-dating ``size^2`` (the OBC recurrence,
    ``H^-1 -= H^-1[:, q] H^-1[q, :] / H^-1_qq``, written as a growing Cholesky-like factor).

    Returns the removal order and the loss of each step; with ``trajectory`` (a ``(c, steps + 1,
    size)`` buffer) the weights after every step are stored as well, so that any prefix of the
    elimination can be read back without replaying it. With ``forced`` (an order) and ``counts``
    it replays the first ``counts[i]`` removals of problem ``i`` instead of choosing them. ``first``
    marks weights pruned earlier (gradual schedules): they are eliminated before any other, with
    their OBS compensation, and their steps report a loss of ``-inf``.
    """
    c, size = w.shape
    dev, dt = w.device, w.dtype
    idx = torch.arange(c, device=dev)
    which = idx if which is None else which
    order = torch.zeros(c, steps, dtype=torch.long, device=dev)
    losses = torch.full((c, steps), math.inf, dtype=dt, device=dev)
    tiny = torch.finfo(dt).tiny
    zero = torch.zeros(c, dtype=dt, device=dev)
    factor = torch.zeros(c, steps, size, dtype=dt, device=dev)
    diag = hinv0.diagonal(dim1=1, dim2=2)[which].clone()
    if trajectory is not None:
        trajectory[:, 0] = w
    for t in range(steps):
        score = (w * w / diag.clamp_min(tiny)).masked_fill(removed, math.inf)
        if pattern.kind == "nm":
            full = removed.view(c, -1, pattern.m).sum(-1) >= pattern.m - pattern.n
            score = score.masked_fill(full.repeat_interleave(pattern.m, dim=1), math.inf)
        if forced is None:
            if first is not None:
                score = score.masked_fill(first & ~removed, -math.inf)
            loss, q = score.min(dim=1)
            valid = loss < math.inf
        else:
            q, valid = forced[:, t], counts > t
            loss = torch.where(valid, score[idx, q], math.inf)
            if not bool(valid.any()):
                break
        losses[:, t] = loss
        order[:, t] = q
        col = hinv0[which, :, q]
        if t:
            col = col - torch.bmm(factor[idx, :t, q].unsqueeze(1), factor[:, :t]).squeeze(1)
        dq = diag[idx, q].clamp_min(tiny)
        coef = torch.where(valid, w[idx, q] / dq, zero)
        w.sub_(coef[:, None] * col)
        w[idx, q] = torch.where(valid, zero, w[idx, q])
        u = col * torch.where(valid, dq.rsqrt(), zero)[:, None]
        factor[:, t] = u
        diag.sub_(u * u)
        removed[idx, q] |= valid
        if trajectory is not None:
            trajectory[:, t + 1] = w
    return order, losses


def cap(
    w: torch.Tensor,
    h: torch.Tensor,
    pattern: Pattern,
    *,
    block_size: int | None = None,
    chunk_bytes: int = 1 << 26,
    trajectory_bytes: int = 1 << 31,
    dtype: torch.dtype = torch.float32,
    prior: torch.Tensor | None = None,
    truncate: bool = True,
    **_,
) -> tuple[torch.Tensor, torch.Tensor]:
    """CAP on one layer: ``w`` ``(rows, cols)``, ``h`` its (damped) Gram; returns ``(weights, mask)``.

    ``chunk_bytes`` bounds the elimination state of the problems run together (its running
    factor, ``steps x cols`` numbers per row); ``trajectory_bytes`` the stored weights after every
    step (beyond it the chosen prefixes are replayed instead).
    """
    out, mask = cap_grouped(w[None], h[None], pattern, block_size=block_size, chunk_bytes=chunk_bytes,
                            trajectory_bytes=trajectory_bytes, dtype=dtype, prior=prior, truncate=truncate)
    return out[0], mask[0]


@dataclass
class _Problems:
    """``G`` layers' rows cut into diagonal blocks of ``size`` inputs: one elimination problem per (layer, row, block).

    ``weights`` ``(num, size)`` are the padded weights, problem by problem; ``hinv`` the inverse
    diagonal blocks of every layer (``inverse_of[i]`` is problem ``i``'s); ``pad_of[block_of[i]]``
    marks the padding of problem ``i``; ``first`` the weights an earlier mask pruned (``None``
    without one); ``chunk`` how many problems run together.
    """

    weights: torch.Tensor
    hinv: torch.Tensor
    pad_of: torch.Tensor
    block_of: torch.Tensor
    inverse_of: torch.Tensor
    first: torch.Tensor | None
    pattern: Pattern
    size: int
    chunk: int

    @property
    def count(self) -> int:
        return self.weights.shape[0]

    @property
    def padding(self) -> torch.Tensor:
        """``(num, size)``: True at each problem's padding."""
        return self.pad_of[self.block_of]


def _inverse_blocks(h: torch.Tensor, cols: int, size: int, nb: int, dtype: torch.dtype) -> torch.Tensor:
    """``(G * nb, size, size)``: the inverses of every layer's diagonal blocks (the last padded with identity)."""
    groups, dev = h.shape[0], h.device
    hinv_blocks = torch.empty(groups * nb, size, size, dtype=dtype, device=dev)
    for g in range(groups):  # one layer's diagonal blocks at a time
        blocks = torch.eye(size, dtype=torch.float64, device=dev).repeat(nb, 1, 1)
        for b in range(nb):
            end = min(cols, (b + 1) * size)
            blocks[b, : end - b * size, : end - b * size] = h[g, b * size : end, b * size : end]
        hinv_blocks[g * nb : (g + 1) * nb] = cholesky_inverse(torch.linalg.cholesky(blocks)).to(dtype)
    return hinv_blocks


def _problems(w: torch.Tensor, h: torch.Tensor, pattern: Pattern, block_size: int | None, chunk_bytes: int,
              dtype: torch.dtype, prior: torch.Tensor | None) -> _Problems:
    """Cut ``w`` ``(G, rows, cols)`` into the block problems, with the inverse blocks of ``h``."""
    groups, rows, cols = w.shape
    dev = w.device
    size = cols if block_size is None or block_size >= cols else int(block_size)
    if pattern.kind == "nm" and size % pattern.m:
        raise ValueError(f"CAP block_size={size} must be a multiple of M={pattern.m} for pattern {pattern}.")
    nb = math.ceil(cols / size)
    padded = nb * size
    hinv_blocks = _inverse_blocks(h, cols, size, nb, dtype)
    pad = torch.zeros(padded, dtype=torch.bool, device=dev)
    pad[cols:] = True
    wp = torch.zeros(groups, rows, padded, dtype=dtype, device=dev)
    wp[:, :, :cols] = w.to(dtype)
    problems = wp.view(groups * rows * nb, size)
    num = problems.shape[0]
    per_group = rows * nb
    block_of = torch.arange(num, device=dev) % nb
    inverse_of = torch.arange(num, device=dev) // per_group * nb + block_of
    itemsize = torch.finfo(dtype).bits // 8
    chunk = max(1, chunk_bytes // ((size + 4) * size * itemsize))
    first_all = None
    if prior is not None:
        if pattern.kind == "nm":
            raise ValueError("CAP cannot keep an earlier mask with an N:M pattern; use 'unstructured' or 'row'.")
        first_all = torch.zeros(rows, padded, dtype=torch.bool, device=dev)
        first_all[:, :cols] = ~prior.to(dev)
        first_all = first_all.view(per_group, size).repeat(groups, 1)
    return _Problems(problems, hinv_blocks, pad.view(nb, size), block_of, inverse_of, first_all, pattern, size, chunk)


def _run(p: _Problems, ids: torch.Tensor, steps: int, trajectory=None, forced=None, counts=None):
    """Eliminate ``steps`` weights of the problems ``ids``, chunk by chunk (:func:`_eliminate`'s arguments).

    Returns ``(orders, losses, weights, removed)`` of those problems.
    """
    size, chunk = p.size, p.chunk
    dev, dtype = p.weights.device, p.weights.dtype
    orders = torch.zeros(len(ids), steps, dtype=torch.long, device=dev)
    losses = torch.full((len(ids), steps), math.inf, dtype=dtype, device=dev)
    weights = torch.empty(len(ids), size, dtype=dtype, device=dev)
    removed = torch.empty(len(ids), size, dtype=torch.bool, device=dev)
    for a in range(0, len(ids), chunk):
        sel = ids[a : a + chunk]
        wc, rc = p.weights[sel].clone(), p.pad_of[p.block_of[sel]].clone()
        orders[a : a + len(sel)], losses[a : a + len(sel)] = _eliminate(
            wc,
            p.hinv,
            rc,
            steps,
            p.pattern,
            trajectory=None if trajectory is None else trajectory[a : a + len(sel)],
            forced=None if forced is None else forced[a : a + len(sel)],
            counts=None if counts is None else counts[a : a + len(sel)],
            first=None if p.first is None else p.first[sel],
            which=p.inverse_of[sel],
        )
        weights[a : a + len(sel)], removed[a : a + len(sel)] = wc, rc
    return orders, losses, weights, removed


def _selected_counts(losses: torch.Tensor, pattern: Pattern, groups: int, rows: int, cols: int, nb: int,
                     size: int) -> torch.Tensor:
    """How many steps of each problem the budget selects: the cheapest (running-max) step losses,
    over each layer (``"unstructured"``, one threshold per layer) or each row (``"row"``)."""
    num, dev = losses.shape[0], losses.device
    per_group = rows * nb
    cum = torch.cummax(losses, dim=1).values
    if pattern.kind == "unstructured":  # one threshold per layer
        prune_total = rows * cols - pattern.keep_count(rows, cols)
        offsets = (torch.arange(groups, device=dev) * (per_group * size))[:, None]
        chosen = torch.sort(cum.view(groups, per_group * size), dim=1, stable=True).indices[:, :prune_total]
        return torch.bincount((chosen + offsets).reshape(-1) // size, minlength=num)
    row_prune = cols - pattern.keep_per_row(cols)
    per_row = cum.view(groups * rows, nb * size)
    chosen = torch.sort(per_row, dim=1, stable=True).indices[:, :row_prune]
    counts = torch.zeros(groups * rows, nb, dtype=torch.long, device=dev)
    counts.scatter_add_(1, chosen // size, torch.ones_like(chosen))
    return counts.view(-1)


def _eliminate_to_budget(p: _Problems, groups: int, rows: int, cols: int, prior: torch.Tensor | None,
                         truncate: bool, trajectory_bytes: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``"unstructured"`` / ``"row"``: ``(weights, kept)`` of every problem after its share of the budget.

    First pass: record each problem's step losses (made non-decreasing), removal order and
    weights after every step, but only for as many steps as the budget plausibly needs.
    A problem whose recorded steps were all selected may need more: it is re-run in full
    and the shared threshold recomputed. The others are exact, since their unrecorded steps
    cost at least their first unselected one.
    """
    pattern, size, num = p.pattern, p.size, p.count
    dev, dtype = p.weights.device, p.weights.dtype
    nb = p.pad_of.shape[0]
    itemsize = torch.finfo(dtype).bits // 8
    prune_total = rows * cols - pattern.keep_count(rows, cols)
    row_prune = cols - pattern.keep_per_row(cols)
    share = (prune_total / (rows * cols)) if pattern.kind == "unstructured" else row_prune / cols
    if prior is not None:
        share = max(share, float(p.first.float().sum(1).max()) / size)
    steps = min(size, int(math.ceil(size * min(1.0, share * 1.25))) + 8) if truncate else size
    real = size - p.padding.sum(1)
    store = num * (size + 1) * size * itemsize <= trajectory_bytes
    orders = torch.zeros(num, size, dtype=torch.long, device=dev)
    losses = torch.full((num, size), math.inf, dtype=dtype, device=dev)
    trajectory = torch.empty(num, size + 1, size, dtype=dtype, device=dev) if store else None
    everything = torch.arange(num, device=dev)
    todo, depth = everything, steps
    while len(todo):
        traj = None if trajectory is None else torch.empty(len(todo), depth + 1, size, dtype=dtype, device=dev)
        o, l_, _, _ = _run(p, todo, depth, trajectory=traj)
        orders[todo, :depth], losses[todo, :depth] = o, l_
        if traj is not None:
            trajectory[todo, : depth + 1] = traj
        counts = _selected_counts(losses, pattern, groups, rows, cols, nb, size)
        if depth == size:
            break
        # problems run to `steps` whose every recorded step was chosen, with steps left
        saturated = (counts >= steps) & (real > steps)
        todo, depth = torch.nonzero(saturated).flatten(), size
    step_ids = torch.arange(size, device=dev)[None, :]
    # (steps past a problem's last finite loss repeat an index: count, don't overwrite)
    hits = torch.zeros(num, size, dtype=torch.long, device=dev)
    hits.scatter_add_(1, orders, (step_ids < counts[:, None]).long())
    kept = ~((hits > 0) | p.padding)
    if trajectory is not None:
        return trajectory[everything, counts], kept
    # no room for the trajectory: replay each problem's first counts[i] removals
    _, _, out, _ = _run(p, everything, int(counts.max()), forced=orders, counts=counts)
    return out, kept


def cap_grouped(
    w: torch.Tensor,
    h: torch.Tensor,
    pattern: Pattern,
    *,
    block_size: int | None = None,
    chunk_bytes: int = 1 << 26,
    trajectory_bytes: int = 1 << 31,
    dtype: torch.dtype = torch.float32,
    prior: torch.Tensor | None = None,
    truncate: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """CAP on ``G`` independent layers at once: ``w`` ``(G, rows, cols)``, ``h`` ``(G, cols, cols)``.

    Layer ``g`` is pruned exactly as ``cap(w[g], h[g], ...)`` would (its own threshold; ``prior``, a
    ``(rows, cols)`` keep-mask, applies to every layer), but the eliminations of all layers run in
    the same batched steps: ``uncertainty="auto"`` scores its candidates and folds this way, one
    elimination instead of one per candidate (the steps are sequential, so for small layers their
    count, not their size, sets the time).
    """
    if w.dim() != 3 or h.dim() != 3 or h.shape != (w.shape[0], w.shape[2], w.shape[2]):
        raise ValueError(f"cap_grouped takes w (G, rows, cols) and h (G, cols, cols), got {tuple(w.shape)} and "
                         f"{tuple(h.shape)}.")
    if prior is not None and prior.shape != w.shape[1:]:
        raise ValueError(f"prior must be a (rows, cols) keep-mask {tuple(w.shape[1:])}, got {tuple(prior.shape)}.")
    groups, rows, cols = w.shape
    p = _problems(w, h, pattern, block_size, chunk_bytes, dtype, prior)
    if pattern.kind == "nm":
        steps = p.size // pattern.m * (pattern.m - pattern.n)
        _, _, out, removed = _run(p, torch.arange(p.count, device=w.device), steps)
        kept = ~removed
    else:
        out, kept = _eliminate_to_budget(p, groups, rows, cols, prior, truncate, trajectory_bytes)
    padded = p.pad_of.numel()
    mask = kept.view(groups, rows, padded)[:, :, :cols].contiguous()
    w_hat = out.view(groups, rows, padded)[:, :, :cols].to(torch.float32)
    return w_hat * mask.to(w_hat.dtype), mask
