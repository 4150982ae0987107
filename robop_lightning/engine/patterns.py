"""Sparsity patterns: which weights may be kept, and projecting scores onto a pattern.

The patterns:

* ``"unstructured"``: keep ``k = round((1 - sparsity) * m * n)`` weights anywhere in the layer;
* ``"row"``: keep ``round((1 - sparsity) * n)`` weights in every output row;
* ``"N:M"`` (e.g. ``"2:4"``): in every group of ``M`` consecutive inputs of a row keep ``N``;
* ``"structured"``: keep ``round((1 - sparsity) * n)`` whole input columns (the same in every row);
  ``prune_layer`` and ``prune_model`` route it to :mod:`robop_lightning.pipeline.shrink_step`.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import torch

__all__ = ["Pattern", "parse_pattern"]

_NM = re.compile(r"^\s*(\d+)\s*:\s*(\d+)\s*$")


@dataclass(frozen=True)
class Pattern:
    """A parsed sparsity pattern with its target sparsity.

    Attributes:
        kind: ``"unstructured"``, ``"row"``, ``"structured"`` or ``"nm"``.
        sparsity: fraction of weights set to zero (implied by ``N:M`` for ``"nm"``).
        n, m: keep ``n`` of every ``m`` (only for ``"nm"``).
    """

    kind: str
    sparsity: float
    n: int = 0
    m: int = 0

    def __str__(self) -> str:
        return f"{self.n}:{self.m}" if self.kind == "nm" else self.kind

    # ----------------------------------------------------------- budgets
    def keep_count(self, rows: int, cols: int) -> int:
        """Total number of weights kept in a ``rows x cols`` layer."""
        if self.kind == "unstructured":
            return int(round((1.0 - self.sparsity) * rows * cols))
        if self.kind in ("row", "structured"):
            return rows * self.keep_per_row(cols)
        return rows * (cols // self.m) * self.n

    def keep_per_row(self, cols: int) -> int:
        return int(round((1.0 - self.sparsity) * cols))

    def check_shape(self, rows: int, cols: int, name: str = "weight") -> None:
        if self.kind == "nm" and cols % self.m != 0:
            raise ValueError(
                f"pattern {self} needs in_features divisible by {self.m}, but {name} has "
                f"in_features={cols}. Use pattern='unstructured' or 'row' for this layer, or "
                f"leave it out of the targets."
            )

    # ----------------------------------------------------------- projection
    def select(self, scores: torch.Tensor, prior: torch.Tensor | None = None) -> torch.Tensor:
        """Boolean keep-mask of the pattern's budget with the largest ``scores`` (rows x cols).

        ``prior`` (a keep-mask of an earlier pruning) excludes weights that must stay pruned;
        they count towards the budget. Ties are broken deterministically, so counts are exact.
        """
        rows, cols = scores.shape
        self.check_shape(rows, cols)
        scores = scores.float()
        if prior is not None:
            scores = scores.masked_fill(~prior, -math.inf)
            return self._select(scores) & prior
        return self._select(scores)

    def _select(self, scores: torch.Tensor) -> torch.Tensor:
        rows, cols = scores.shape
        if self.kind == "unstructured":
            k = self.keep_count(rows, cols)
            mask = torch.zeros(rows * cols, dtype=torch.bool, device=scores.device)
            if k > 0:
                idx = torch.topk(scores.reshape(-1), k, sorted=False).indices
                mask[idx] = True
            return mask.view(rows, cols)
        if self.kind == "row":
            k = self.keep_per_row(cols)
            mask = torch.zeros(rows, cols, dtype=torch.bool, device=scores.device)
            if k > 0:
                mask.scatter_(1, torch.topk(scores, k, dim=1, sorted=False).indices, True)
            return mask
        if self.kind == "structured":  # whole input columns, by their summed score
            k = self.keep_per_row(cols)
            keep = torch.zeros(cols, dtype=torch.bool, device=scores.device)
            if k > 0:
                keep[torch.topk(scores.sum(0), k, sorted=False).indices] = True
            return keep[None, :].expand(rows, cols).clone()
        groups = scores.reshape(rows, cols // self.m, self.m)
        mask = torch.zeros_like(groups, dtype=torch.bool)
        mask.scatter_(2, torch.topk(groups, self.n, dim=2, sorted=False).indices, True)
        return mask.view(rows, cols)

    def validate_mask(self, mask: torch.Tensor) -> bool:
        """True when ``mask`` keeps exactly this pattern's budget (used by tests and checks)."""
        rows, cols = mask.shape
        if self.kind == "unstructured":
            return int(mask.sum()) == self.keep_count(rows, cols)
        if self.kind == "row":
            return bool((mask.sum(1) == self.keep_per_row(cols)).all())
        if self.kind == "structured":
            return bool((mask == mask[:1]).all()) and int(mask[0].sum()) == self.keep_per_row(cols)
        return bool((mask.view(rows, cols // self.m, self.m).sum(-1) == self.n).all())


def parse_pattern(pattern: str, sparsity: float | None) -> Pattern:
    """Validate ``pattern`` and ``sparsity`` together and return a :class:`Pattern`.

    ``sparsity=None`` means 0.5 for ``"unstructured"`` / ``"row"`` and ``1 - N/M`` for ``N:M``.
    """
    if not isinstance(pattern, str):
        raise ValueError(f"pattern must be a string, got {pattern!r}.")
    if sparsity is not None:
        if isinstance(sparsity, bool) or not isinstance(sparsity, (int, float)):
            raise ValueError(f"sparsity must be a number in [0, 1), got {sparsity!r}.")
        sparsity = float(sparsity)
        if not (0.0 <= sparsity < 1.0) or sparsity != sparsity:
            raise ValueError(
                f"sparsity must be in [0, 1) (the fraction of weights set to zero), got {sparsity}. "
                "For 70 % sparsity pass 0.7."
            )
    p = pattern.strip().lower()
    if p in ("unstructured", "row", "structured"):
        return Pattern(kind=p, sparsity=0.5 if sparsity is None else sparsity)
    match = _NM.match(p)
    if match:
        n, m = int(match.group(1)), int(match.group(2))
        if not (0 < n < m):
            raise ValueError(f"pattern {pattern!r}: N:M needs 0 < N < M (keep N of every M), e.g. '2:4'.")
        implied = 1.0 - n / m
        if sparsity is not None and abs(sparsity - implied) > 1e-9:
            raise ValueError(
                f"pattern {pattern!r} keeps {n} of every {m} weights, i.e. sparsity {implied:g}, but "
                f"sparsity={sparsity:g} was given. Pass sparsity={implied:g} or sparsity=None."
            )
        return Pattern(kind="nm", sparsity=implied, n=n, m=m)
    raise ValueError(
        f"unknown pattern {pattern!r}: use 'unstructured', 'row', 'structured' or 'N:M' such as '2:4' (keep 2 of every 4)."
    )
