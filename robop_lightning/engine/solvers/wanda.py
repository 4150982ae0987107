"""Wanda (Sun et al., ICLR 2024): score ``|W_ij| * ||X_j||_2``; no weight update.

``||X_j||_2 = sqrt(H_jj)`` of the *undamped* effective Gram, so under a robust set the diagonal of
the set's effective matrix is used (per-row E, for instance, scales it by ``1 + r``).

**Comparison group.** As published (the paper, its code ``lib/prune.py`` in locuslab/wanda, and
llm-compressor's ``WandaPruningModifier``), the scores are ranked **within each output row**: every
row keeps the same share of its inputs. That is the default (``group="row"``) for
``pattern="unstructured"``: the layer's budget ``round((1 - sparsity) * rows * cols)`` is spread
over the rows, ``floor`` or ``ceil`` of ``budget / rows`` each (at 50 % of an even number of inputs,
exactly half of every row), the rows that keep one more being those whose next weight scores
highest. ``group="layer"`` ranks the whole layer at once (the variant the Wanda paper compares
against, and what this solver did before). ``"row"``, ``N:M`` and ``"structured"`` patterns fix the
group themselves; ``group`` only matters for ``"unstructured"``.

With a ``prior`` keep-mask (gradual schedules) a row whose earlier zeros leave it fewer weights
than its share keeps what it has, and the rest of the budget goes to the best remaining weights of
the layer, so the budget stays exact.
"""

from __future__ import annotations

import math

import torch

from robop_lightning.engine.patterns import Pattern

GROUPS = ("row", "layer")


def wanda(w: torch.Tensor, h: torch.Tensor, pattern: Pattern, *, group: str = "row",
          h_diag: torch.Tensor | None = None, prior: torch.Tensor | None = None, **_):
    if group not in GROUPS:
        raise ValueError(f"wanda's group must be 'row' (as published) or 'layer', got {group!r}.")
    d = h.diagonal() if h_diag is None else h_diag
    scores = w.abs() * d.to(device=w.device, dtype=torch.float32).clamp_min(0).sqrt()[None, :]
    if pattern.kind == "unstructured" and group == "row":
        mask = per_row_select(scores, pattern.keep_count(*w.shape), prior)
    else:
        mask = pattern.select(scores, prior=prior)
    return w * mask.to(w.dtype), mask


def per_row_select(scores: torch.Tensor, total: int, prior: torch.Tensor | None = None) -> torch.Tensor:
    """Keep-mask of ``total`` weights, the same count in every row (within one), best ``scores`` first.

    Each row keeps ``total // rows``; the ``total % rows`` rows whose next score is highest keep one
    more. With ``prior`` (True = may be kept) a row keeps at most its allowed weights and what it
    cannot take goes to the best remaining allowed weights of the layer.

    Example:
        >>> s = torch.tensor([[4.0, 3.0, 2.0, 1.0], [40.0, 30.0, 20.0, 10.0]])
        >>> per_row_select(s, 5).int().tolist()  # row 1's third weight beats row 0's
        [[1, 1, 0, 0], [1, 1, 1, 0]]
    """
    rows, cols = scores.shape
    scores = scores.float()
    if prior is not None:
        scores = scores.masked_fill(~prior, -math.inf)
    values, order = torch.sort(scores, dim=1, descending=True, stable=True)
    base, extra = divmod(int(total), rows)
    allowed = torch.isfinite(values).sum(1)
    count = allowed.clamp(max=base)
    if extra and base < cols:
        nxt = values[:, base].masked_fill(count < base, -math.inf)
        pick = torch.topk(nxt, extra).indices
        count[pick] += torch.isfinite(nxt[pick]).long()
    rank = torch.empty_like(order)
    rank.scatter_(1, order, torch.arange(cols, device=scores.device).expand(rows, cols).contiguous())
    mask = rank < count[:, None]
    short = int(total) - int(count.sum())
    if short > 0:  # rows the prior left short: the rest of the budget layer-wide
        rest = scores.masked_fill(mask, -math.inf).reshape(-1)
        mask.view(-1)[torch.topk(rest, short).indices] = True
    return mask
