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
"""

from __future__ import annotations

import math

import torch

from robop_lightning.patterns import Pattern


def _eliminate(w, hinv, removed, steps, pattern, trajectory=None, forced=None, counts=None, first=None):
    """Run ``steps`` OBS eliminations on a batch of independent problems (in place).

    Returns the removal order and the loss of each step; with ``trajectory`` (a ``(c, steps + 1,
    size)`` buffer) the weights after every step are stored as well, so that any prefix of the
    elimination can be read back without replaying it. With ``forced`` (an order) and ``counts``
    it replays the first ``counts[i]`` removals of problem ``i`` instead of choosing them. ``first``
    marks weights pruned earlier (gradual schedules): they are eliminated before any other, with
    their OBS compensation, and their steps report a loss of ``-inf``.
    """
    c, size = w.shape
    idx = torch.arange(c, device=w.device)
    order = torch.zeros(c, steps, dtype=torch.long, device=w.device)
    losses = torch.full((c, steps), math.inf, dtype=w.dtype, device=w.device)
    tiny = torch.finfo(w.dtype).tiny
    zero = torch.zeros(c, dtype=w.dtype, device=w.device)
    if trajectory is not None:
        trajectory[:, 0] = w
    for t in range(steps):
        diag = hinv.diagonal(dim1=1, dim2=2)
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
        losses[:, t] = loss
        order[:, t] = q
        col = hinv[idx, :, q]
        dq = diag[idx, q].clamp_min(tiny)
        coef = torch.where(valid, w[idx, q] / dq, zero)
        w.sub_(coef[:, None] * col)
        w[idx, q] = torch.where(valid, zero, w[idx, q])
        scale = torch.where(valid, -1.0 / dq, zero)
        hinv.baddbmm_(col[:, :, None], (col * scale[:, None])[:, None, :])  # rank-one down-date
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
    chunk_bytes: int = 1 << 24,
    trajectory_bytes: int = 1 << 31,
    dtype: torch.dtype = torch.float32,
    prior: torch.Tensor | None = None,
    **_,
) -> tuple[torch.Tensor, torch.Tensor]:
    rows, cols = w.shape
    dev = w.device
    size = cols if block_size is None or block_size >= cols else int(block_size)
    if pattern.kind == "nm" and size % pattern.m:
        raise ValueError(f"CAP block_size={size} must be a multiple of M={pattern.m} for pattern {pattern}.")
    nb = math.ceil(cols / size)
    padded = nb * size
    hp = torch.eye(padded, dtype=torch.float64, device=dev)
    hp[:cols, :cols] = h.to(device=dev, dtype=torch.float64)
    blocks = torch.stack([hp[b * size : (b + 1) * size, b * size : (b + 1) * size] for b in range(nb)])
    hinv_blocks = torch.cholesky_inverse(torch.linalg.cholesky(blocks)).to(dtype)
    pad = torch.zeros(padded, dtype=torch.bool, device=dev)
    pad[cols:] = True

    wp = torch.zeros(rows, padded, dtype=dtype, device=dev)
    wp[:, :cols] = w.to(dtype)
    problems = wp.view(rows * nb, size)
    num = problems.shape[0]
    block_of = torch.arange(num, device=dev) % nb
    pad_of = pad.view(nb, size)
    itemsize = torch.finfo(dtype).bits // 8
    chunk = max(1, chunk_bytes // (size * size * itemsize))
    store = rows * nb * (size + 1) * size * itemsize <= trajectory_bytes

    first_all = None
    if prior is not None:
        if pattern.kind == "nm":
            raise ValueError("CAP cannot keep an earlier mask with an N:M pattern; use 'unstructured' or 'row'.")
        first_all = torch.zeros(rows, padded, dtype=torch.bool, device=dev)
        first_all[:, :cols] = ~prior.to(dev)
        first_all = first_all.view(rows * nb, size)

    def batch(a, b):
        return (
            problems[a:b].clone(),
            hinv_blocks[block_of[a:b]].clone(),
            pad_of[block_of[a:b]].clone(),
        )

    def first(a, b):
        return None if first_all is None else first_all[a:b]

    out = torch.empty_like(problems)
    kept = torch.empty(num, size, dtype=torch.bool, device=dev)
    if pattern.kind == "nm":
        steps = size // pattern.m * (pattern.m - pattern.n)
        for a in range(0, num, chunk):
            b = min(a + chunk, num)
            wc, hc, rc = batch(a, b)
            _eliminate(wc, hc, rc, steps, pattern)
            out[a:b], kept[a:b] = wc, ~rc
    else:
        # Pass over all rows recording every step's loss, the order and the weights after each
        # step (the trajectory costs as much memory as the inverse it rides along with).
        orders = torch.empty(num, size, dtype=torch.long, device=dev)
        losses = torch.empty(num, size, dtype=dtype, device=dev)
        trajectory = torch.empty(num, size + 1, size, dtype=dtype, device=dev) if store else None
        for a in range(0, num, chunk):
            b = min(a + chunk, num)
            wc, hc, rc = batch(a, b)
            traj = None if trajectory is None else trajectory[a:b]
            orders[a:b], losses[a:b] = _eliminate(wc, hc, rc, size, pattern, trajectory=traj, first=first(a, b))
        losses = torch.cummax(losses, dim=1).values
        if pattern.kind == "unstructured":
            prune = rows * cols - pattern.keep_count(rows, cols)
            chosen = torch.sort(losses.reshape(-1), stable=True).indices[:prune]
            counts = torch.bincount(chosen // size, minlength=num)
        else:
            prune = cols - pattern.keep_per_row(cols)
            per_row = losses.view(rows, nb * size)
            chosen = torch.sort(per_row, dim=1, stable=True).indices[:, :prune]
            counts = torch.zeros(rows, nb, dtype=torch.long, device=dev)
            counts.scatter_add_(1, chosen // size, torch.ones_like(chosen))
            counts = counts.view(-1)
        steps = torch.arange(size, device=dev)[None, :]
        # (steps past a problem's last finite loss repeat an index: count, don't overwrite)
        hits = torch.zeros(num, size, dtype=torch.long, device=dev)
        hits.scatter_add_(1, orders, (steps < counts[:, None]).long())
        removed = hits > 0
        kept = ~(removed | pad_of[block_of])
        if trajectory is not None:
            out = trajectory[torch.arange(num, device=dev), counts]
        else:  # no room for the trajectory: replay each problem's first counts[i] removals
            for a in range(0, num, chunk):
                b = min(a + chunk, num)
                wc, hc, rc = batch(a, b)
                _eliminate(wc, hc, rc, size, pattern, forced=orders[a:b], counts=counts[a:b])
                out[a:b] = wc
    mask = kept.view(rows, padded)[:, :cols].contiguous()
    w_hat = out.view(rows, padded)[:, :cols].to(torch.float32)
    return w_hat * mask, mask
