"""Choose the uncertainty set and its radius from the data: K-fold cross-validation over samples.

RobOP's authors name the choice of set its main limitation. Here every layer chooses for itself::

    split the calibration samples (images, sequences; never single tokens) into K folds
    for each fold k:   H_train = H - H_k      (one Gram per fold, the rest by subtraction)
        for each candidate (set, gamma):
            W_k = SCORER(W, H_train + D(set, gamma; H_train, N_train))
            err[candidate, k] = tr(E_k H_k E_k^T) / tr(W H_k W^T),   E_k = W - W_k
    choose the candidate with the smallest mean over folds (select="mean")
        or the smallest worst fold (select="worst", the distributionally robust reading)

and the layer is then pruned once, on all samples, with the winner and the requested solver.
Baseline is always a candidate, so the chosen candidate's fold error is never above Baseline's.

Cheap by construction: one pass over the activations gives the K fold Grams; ``D`` is a closed
form; the E set's ``H_train^(1/2)`` is computed once per fold and reused for every gamma. The
candidates are scored by the pruning solver itself by default; ``scorer="sparsegpt"`` is cheaper
but less faithful (``benchmarks/sets_auto.py`` measures how often the two agree).

Folds are global sample indices modulo K (interleaved, so every fold spans the whole calibration
set), the same on every DDP rank: the choice is deterministic and rank-identical.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from robop_lightning.damping import damp_until_definite, unit_scale
from robop_lightning.gram import LayerInputs
from robop_lightning.patterns import Pattern
from robop_lightning.solvers import DATA_FREE, SOLVERS, USES_FULL_GRAM
from robop_lightning.uncertainty import CLOSED_FORM_SETS, canonical_set_name, parse_set_spec
from robop_lightning.uncertainty.closed_form import closed_form_damping, sqrt_psd

__all__ = [
    "AutoOptions", "Candidate", "SetSelection", "select_uncertainty", "default_candidates", "check_auto_request",
    "DEFAULT_GAMMAS", "SELECT_MODES",
]

SELECT_MODES = ("mean", "worst")
# log grids per set: Trace's useful gamma spans 0.003-0.1 on real layers, E's is about 100x larger;
# CTE is an absolute ridge (the same family as Baseline and Trace), so its grid is a few decades.
DEFAULT_GAMMAS: dict[str, tuple[float, ...]] = {
    "trace": (0.003, 0.01, 0.03, 0.1),
    "e": (0.3, 1.0, 3.0),
    "cte": (1.0, 100.0),
    "baseline": (0.001, 0.1),
}


@dataclass(frozen=True)
class Candidate:
    """One uncertainty set of the authors with one radius (``gamma=None``: Baseline at ``damping``)."""

    set: str
    gamma: float | None = None

    @property
    def label(self) -> str:
        return self.set if self.gamma is None else f"{self.set}={self.gamma:g}"

    @classmethod
    def parse(cls, spec: str | Candidate) -> Candidate:
        if isinstance(spec, Candidate):
            return spec
        name, gamma = parse_set_spec(spec)
        if name not in CLOSED_FORM_SETS:
            raise ValueError(
                f"auto-selection chooses among the authors' closed-form sets ({', '.join(CLOSED_FORM_SETS)}), "
                f"not the min-max extension: got {spec!r}."
            )
        return cls(name, gamma)


def default_candidates(uncertainty: str = "auto") -> list[Candidate]:
    """Baseline first, then the set(s) x their gamma grid (``uncertainty="auto"``: all four sets)."""
    names = ("baseline", "trace", "e", "cte") if uncertainty == "auto" else (uncertainty,)
    out = [Candidate("baseline")]
    for name in names:
        out += [Candidate(name, g) for g in DEFAULT_GAMMAS[name]]
    return out


@dataclass
class SetSelection:
    """What a layer chose and why: every candidate's held-out error on every fold.

    Attributes:
        chosen: the winning candidate.
        select: ``"mean"`` or ``"worst"`` over folds.
        scorer: the solver that scored the candidates.
        folds: the number of folds actually used.
        errors: candidate label -> relative error on each held-out fold.
    """

    chosen: Candidate
    select: str
    scorer: str
    folds: int
    errors: dict[str, list[float]] = field(default_factory=dict)

    def score(self, label: str) -> float:
        errs = self.errors[label]
        return max(errs) if self.select == "worst" else sum(errs) / len(errs)

    def to_dict(self) -> dict[str, Any]:
        return {
            "chosen": self.chosen.label,
            "set": self.chosen.set,
            "gamma": self.chosen.gamma,
            "select": self.select,
            "scorer": self.scorer,
            "folds": self.folds,
            "fold_errors": {k: list(v) for k, v in self.errors.items()},
        }


@dataclass(frozen=True)
class AutoOptions:
    """How ``uncertainty="auto"`` / ``radius="auto"`` choose (a dict with these keys works too).

    Attributes:
        candidates: ``"trace=0.01"``-style specs (``None``: the set(s) x :data:`DEFAULT_GAMMAS`).
        folds: K of the K-fold split over calibration samples.
        select: ``"mean"`` fold error, or ``"worst"`` fold (distributionally robust).
        scorer: the solver that scores candidates (``None``: the pruning solver itself, faithful;
            ``"sparsegpt"``: about 3x cheaper on an LLM layer, but it prefers larger ridges than ALPS /
            CAP need and chose wrong on the DeiT, see ``benchmarks/results/sets_auto.md``).
        rows: score on this many output rows, evenly spaced (``None``: all). The error is a sum over
            rows, so a row sample estimates it; scoring cost falls in proportion.
    """

    candidates: tuple[str, ...] | None = None
    folds: int = 4
    select: str = "mean"
    scorer: str | None = None
    rows: int | None = None

    @classmethod
    def coerce(cls, value: AutoOptions | dict[str, Any] | None) -> AutoOptions:
        """``None`` -> defaults; a dict -> checked fields (unknown keys are refused with the valid ones)."""
        if value is None:
            return cls()
        if isinstance(value, cls):
            return value
        if not isinstance(value, dict):
            raise ValueError(f"auto options must be an AutoOptions or a dict, got {type(value).__name__}.")
        valid = ("candidates", "folds", "select", "scorer", "rows")
        unknown = sorted(set(value) - set(valid))
        if unknown:
            raise ValueError(f"unknown auto option(s) {', '.join(map(repr, unknown))}: valid keys are {', '.join(valid)}.")
        out = dict(value)
        if out.get("candidates") is not None:
            cands = out["candidates"]
            if isinstance(cands, str) or not all(isinstance(c, str) for c in cands):
                raise ValueError(f"auto candidates must be a list of 'NAME' / 'NAME=GAMMA' strings, got {cands!r}.")
            out["candidates"] = tuple(cands)
            for c in out["candidates"]:
                Candidate.parse(c)
        return cls(**out)


def check_auto_request(uncertainty, radius, solver: str, name: str) -> bool:
    """Whether the set or its radius is to be chosen from the data, with the argument checks."""
    set_auto = isinstance(uncertainty, str) and uncertainty.strip().lower() == "auto"
    radius_auto = isinstance(radius, str) and radius.strip().lower() == "auto"
    if isinstance(radius, str) and not radius_auto:
        raise ValueError(f"{name}: radius must be a number, None or 'auto', got {radius!r}.")
    if not (set_auto or radius_auto):
        return False
    if set_auto and radius is not None and not radius_auto:
        raise ValueError(f"{name}: uncertainty='auto' chooses the radius too; pass radius=None or 'auto'.")
    if not set_auto and canonical_set_name(uncertainty) not in CLOSED_FORM_SETS:
        raise ValueError(
            f"{name}: radius='auto' chooses the gamma of the authors' sets ({', '.join(CLOSED_FORM_SETS)}), "
            f"not of the extension's {uncertainty!r}."
        )
    if solver in DATA_FREE:
        raise ValueError(f"{name}: solver={solver!r} ignores the calibration data, so there is nothing to choose; "
                         "use a set, or a solver such as alps, cap or sparsegpt.")
    return True


def _fold_index(num_samples: int, folds: int) -> torch.Tensor:
    return torch.arange(num_samples) % folds


def select_uncertainty(
    weight: torch.Tensor,
    inputs: LayerInputs,
    pattern: Pattern,
    candidates: Sequence[str | Candidate] | None = None,
    folds: int = 4,
    select: str = "mean",
    scorer: str = "sparsegpt",
    damping: float = 0.01,
    prior_mask: torch.Tensor | None = None,
    name: str = "layer",
    rows: int | None = None,
) -> SetSelection:
    """Choose a layer's set and gamma by K-fold cross-validation over its calibration samples.

    Args:
        weight: ``(out, in)`` float weight (not modified).
        inputs: the layer's calibration inputs (samples are the folds' unit).
        pattern: the sparsity pattern the layer will be pruned with.
        candidates: ``"trace=0.01"``-style specs or :class:`Candidate` s of the authors' sets
            (``None``: :func:`default_candidates`). Baseline is added when missing.
        folds: K (at least 2; reduced to the number of samples when there are fewer).
        select: ``"mean"`` or ``"worst"`` fold error.
        scorer: the solver that scores the candidates (``"sparsegpt"``, ``"alps"``, ``"cap"``...).
        damping: the Baseline candidate's gamma.
        prior_mask: an earlier keep-mask (gradual schedules), honoured by the scorer.
        rows: score on this many evenly spaced output rows (``None``: all rows).

    Returns:
        A :class:`SetSelection`.

    Example:
        >>> import torch
        >>> from robop_lightning import LayerInputs
        >>> from robop_lightning.patterns import parse_pattern
        >>> w, x = torch.randn(8, 16), torch.randn(12, 4, 16)
        >>> s = select_uncertainty(w, LayerInputs(x), parse_pattern("unstructured", 0.5), ["trace=0.01", "e=1"])
        >>> sorted(s.errors), s.folds
        (['baseline', 'e=1', 'trace=0.01'], 4)
    """
    if select not in SELECT_MODES:
        raise ValueError(f"select must be one of {', '.join(SELECT_MODES)}, got {select!r}.")
    if isinstance(folds, bool) or not isinstance(folds, int) or folds < 2:
        raise ValueError(f"folds must be an integer >= 2 (K of K-fold cross-validation), got {folds!r}.")
    if scorer not in SOLVERS:
        raise ValueError(f"unknown scorer {scorer!r}: use one of {', '.join(SOLVERS)}.")
    cands = [Candidate.parse(c) for c in (candidates if candidates is not None else default_candidates())]
    if Candidate("baseline") not in cands:
        cands.insert(0, Candidate("baseline"))
    cands = list(dict.fromkeys(cands))  # no duplicates, order kept
    samples = inputs.num_samples
    if samples < 2:
        warnings.warn(
            f"{name}: one calibration sample cannot be split into folds; the Baseline set is used. "
            "Pass more calibration samples for uncertainty='auto'.",
            RuntimeWarning,
            stacklevel=2,
        )
        return SetSelection(Candidate("baseline"), select, scorer, 0, {})
    k_folds = min(folds, samples)
    device = weight.device
    h = inputs.gram(device=device)
    fold_of = _fold_index(samples, k_folds)
    if rows is not None and (isinstance(rows, bool) or not isinstance(rows, int) or rows < 1):
        raise ValueError(f"rows must be a positive integer or None, got {rows!r}.")
    w = weight.detach().to(torch.float32)
    if rows is not None and rows < w.shape[0]:
        keep = torch.linspace(0, w.shape[0] - 1, rows).round().long().unique()
        w = w[keep]
        prior_mask = None if prior_mask is None else prior_mask[keep]
    fn = SOLVERS[scorer]
    errors: dict[str, list[float]] = {c.label: [] for c in cands}
    for k in range(k_folds):
        indicator = (fold_of == k).to(torch.float64)
        h_fold = inputs.gram(sample_weights=indicator, device=device)
        h_train = h - h_fold
        n_train = int((fold_of != k).sum()) * inputs.tokens_per_sample
        root = None
        denom = float(((w.double() @ h_fold) * w.double()).sum())
        mean_diag = float(h_train.diagonal().mean())
        for cand in cands:
            if cand.set == "baseline" and cand.gamma is None:
                ridge, matrix = damping * mean_diag, None
            elif cand.set == "e":
                if root is None:  # one eigendecomposition per fold, every gamma
                    root = sqrt_psd(h_train)
                scale = cand.gamma * math.sqrt(max(float(h_train.diagonal().sum()), 0.0) / n_train)
                ridge, matrix = 0.0, scale * root
            else:
                ridge, matrix = closed_form_damping(cand.set, h_train, n_train, cand.gamma)
            h_eff = h_train if matrix is None else h_train + matrix
            if scorer in USES_FULL_GRAM:
                h_solve, _ = damp_until_definite(h_eff, ridge, name, warn=False)
            else:
                h_solve = h_eff + ridge * torch.eye(h_eff.shape[0], dtype=h_eff.dtype, device=device)
            unit = unit_scale(float(h_solve.diagonal().mean()))
            w_hat, _ = fn(w, h_solve / unit, pattern, h_diag=h_solve.diagonal() / unit, prior=prior_mask)
            err = (w - w_hat).double()
            errors[cand.label].append(float(((err @ h_fold) * err).sum()) / denom if denom > 0 else 0.0)
    selection = SetSelection(cands[0], select, scorer, k_folds, errors)
    best = min(cands, key=lambda c: (selection.score(c.label), cands.index(c)))  # ties: the earlier candidate
    selection.chosen = best
    return selection
