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

Cheap by construction. One pass over the activations gives the K fold Grams. Every one of the
authors' sets is a spectral function of ``H`` (``D = ridge I + c H^(1/2)``), so one eigendecomposition
of ``H_train`` per fold serves every set and every gamma: the ``"admm"`` scorer, the default for
RobOP-ALPS, runs ALPS's ADMM for a few steps in that shared eigenbasis on all candidates at once,
on a sample of the output rows, then a short masked CG fit. Other solvers score with themselves
(on the row sample): the best set depends on the solver (on the DeiT, CAP wants less damping than
ALPS does), so a scorer must prune the way the solver does. ``benchmarks/sets_auto.py`` measures
how close the fast choices are to the full solver's, and what each costs.

Folds are global sample indices modulo K (interleaved, so every fold spans the whole calibration
set), the same on every DDP rank: the choice is deterministic and rank-identical.
"""

from __future__ import annotations

import functools
import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from robop_lightning.engine.damping import damp_until, damp_until_definite, factored, unit_scale
from robop_lightning.engine.gram import GramInputs, LayerInputs
from robop_lightning.utils.typed import coerce_options
from robop_lightning.engine.patterns import Pattern
from robop_lightning.engine.solvers import DATA_FREE, PREPARE, SOLVERS, USES_FULL_GRAM
from robop_lightning.engine.solvers.alps import support
from robop_lightning.engine.solvers.cap import cap_grouped
from robop_lightning.engine.sets import CLOSED_FORM_SETS, canonical_set_name, parse_set_spec
from robop_lightning.engine.sets.closed_form import closed_form_spectrum, sqrt_psd

__all__ = [
    "AutoOptions", "Candidate", "SetSelection", "select_uncertainty", "default_candidates", "check_auto_request",
    "DEFAULT_GAMMAS", "SELECT_MODES",
]

SELECT_MODES = ("mean", "worst")
# "admm": the fast scorer sharing one eigendecomposition per fold; or any solver, run in full
SCORERS = ("admm", *SOLVERS)
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
        errors: candidate label -> relative error on each held-out fold (the candidates that
            reached the decision).
        screened: with screening, every candidate's fold errors on the screening rows.
    """

    chosen: Candidate
    select: str
    scorer: str
    folds: int
    errors: dict[str, list[float]] = field(default_factory=dict)
    screened: dict[str, list[float]] = field(default_factory=dict)

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
            "screen_errors": {k: list(v) for k, v in self.screened.items()},
        }


@dataclass(frozen=True)
class AutoOptions:
    """How ``uncertainty="auto"`` / ``radius="auto"`` choose (a dict with these keys works too).

    Attributes:
        candidates: ``"trace=0.01"``-style specs (``None``: the set(s) x :data:`DEFAULT_GAMMAS`).
        folds: K of the K-fold split over calibration samples.
        select: ``"mean"`` fold error, or ``"worst"`` fold (distributionally robust).
        scorer: what prunes each candidate on each fold. ``None`` (default): ``"admm"`` when the
            pruning solver is ALPS, the pruning solver itself otherwise. ``"admm"``: a short ADMM
            sharing one eigendecomposition per fold across all candidates (ALPS's choices to within
            1 % of fold error on real Gemma layers, at about 2x a Baseline solve; CAP prefers less
            damping than ALPS, so it is not CAP's proxy). ``"solver"``: the pruning solver itself
            (faithful; about 15x dearer than ``"admm"`` for ALPS; for CAP, with ``screen``, 2.4x a
            Baseline prune on DeiT-Small's layers). Or any solver name.
        rows: score on this many output rows, evenly spaced (``None``: all). The error is a sum over
            rows, so a row sample estimates it; scoring cost falls in proportion.
        screen: with a solver as scorer (not ``"admm"``, which scores every candidate at once)
            and ``rows`` given, first score every candidate on ``rows // 4`` rows and keep the best
            ``screen`` (and Baseline) for the decision on ``rows`` rows. ``None``: every candidate
            on ``rows`` rows (so does ``rows=None``, which scores every row).
    """

    candidates: tuple[str, ...] | None = None
    folds: int = 4
    select: str = "mean"
    scorer: str | None = None
    rows: int | None = 32
    screen: int | None = 3

    def scorer_for(self, solver: str) -> str:
        """The scorer that prunes the candidates when the layer is pruned by ``solver``."""
        if self.scorer is None:
            return "admm" if solver == "alps" else solver
        return solver if self.scorer == "solver" else self.scorer

    @classmethod
    def coerce(cls, value: AutoOptions | dict[str, Any] | None) -> AutoOptions:
        """``None`` -> defaults; a dict -> checked fields (unknown keys are refused with the valid ones)."""
        if value is None or isinstance(value, cls):
            return coerce_options(cls, value, "auto option(s)")
        coerce_options(cls, value, "auto option(s)")  # the keys
        out = dict(value)
        scorer = out.get("scorer")
        if scorer is not None and (not isinstance(scorer, str) or scorer not in ("solver", *SCORERS)):
            raise ValueError(f"auto scorer must be 'admm', 'solver' (the pruning solver itself) or one of "
                             f"{', '.join(SOLVERS)}, got {scorer!r}.")
        for key in ("rows", "screen"):
            v = out.get(key)
            if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
                raise ValueError(f"auto {key} must be a positive integer or None, got {v!r}.")
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


# The "admm" scorer: ALPS's ADMM (penalty rho I, rho growing 1.3x per step from 0.1 mean(lam)),
# a few steps, then a masked PCG fit. 8 + 8 steps: on 12 real Gemma layers at 70 % its choices
# cost 0.5 % (median) of fold error against the choices of the full ALPS, Baseline's cost 7 %.
_ADMM_STEPS = 8
_ADMM_PCG = 8
_ADMM_RHO0 = 0.1
_ADMM_GROWTH = 1.3


def _admm_scores(w: torch.Tensor, lam: torch.Tensor, q: torch.Tensor, h: torch.Tensor, root: torch.Tensor | None,
                 shifts: Sequence[tuple[float, float]], pattern: Pattern, prior: torch.Tensor | None) -> torch.Tensor:
    """Prune ``w`` (``(m, n)`` float32) under ``H_c = H + ridge_c I + c_c H^(1/2)`` for every candidate at once.

    ``H = Q diag(lam) Q^T`` is shared by all candidates (``shifts``: their ``(ridge, c)``), so the
    ADMM step ``B = (H_c + rho I)^-1 (H_c B0 + rho D - V)`` of all of them is two products with
    ``Q`` on the stacked ``(n, C m)`` iterates. The support is ALPS's: the pattern's top entries of
    ``|B| sqrt(diag H_c)``. A Jacobi-preconditioned CG then fits the kept weights under ``H_c``.

    Returns:
        ``(C, m, n)`` pruned weights, one per candidate.
    """
    n, m = w.shape[1], w.shape[0]
    cands = len(shifts)
    ridge = torch.tensor([r for r, _ in shifts], dtype=lam.dtype, device=lam.device)
    coef = torch.tensor([c for _, c in shifts], dtype=lam.dtype, device=lam.device)
    lam_c = lam[:, None] + ridge[None, :] + coef[None, :] * lam.sqrt()[:, None]  # (n, C)
    lam_c = torch.maximum(lam_c, 1e-6 * lam_c.mean(0, keepdim=True))  # "raise until definite", in the eigenbasis
    root_diag = root.diagonal() if root is not None else torch.zeros_like(lam)
    diag_c = (h.diagonal()[:, None] + ridge[None, :] + coef[None, :] * root_diag[:, None]).clamp_min(
        torch.finfo(h.dtype).tiny)  # diag(H_c), (n, C)
    scale = diag_c.sqrt()[:, :, None]
    kept = pattern.keep_count(m, n)

    def project(z: torch.Tensor) -> torch.Tensor:  # (n, C, m) -> keep-mask, each candidate on its own
        a = z.abs() * scale
        return torch.stack([support(a[:, c], pattern, kept, prior) for c in range(cands)], 1)

    def matvec(x: torch.Tensor) -> torch.Tensor:  # H_c x for every candidate, x: (n, C, m)
        out = (h @ x.reshape(n, -1)).view(n, cands, m) + ridge[None, :, None] * x
        with_root = coef != 0
        if bool(with_root.any()):
            out[:, with_root] += coef[with_root][None, :, None] * (root @ x[:, with_root].reshape(n, -1)).view(n, -1, m)
        return out

    b0 = w.T.contiguous()  # (n, m), the solver layout
    p0 = lam_c[:, :, None] * (q.T @ b0)[:, None, :]  # Q^T H_c B0, (n, C, m)
    keep = project(b0[:, None, :].expand(n, cands, m))
    d = b0[:, None, :] * keep.to(b0.dtype)
    v = torch.zeros_like(d)
    rho = (_ADMM_RHO0 * lam_c.mean(0))[None, :, None]
    for _ in range(_ADMM_STEPS):
        rhs = (q.T @ (rho * d - v).reshape(n, -1)).view(n, cands, m)
        b = (q @ ((p0 + rhs) / (lam_c[:, :, None] + rho)).reshape(n, -1)).view(n, cands, m)
        z = b + v / rho
        keep = project(z)
        d = z * keep.to(z.dtype)
        v += rho * (b - d)
        rho = rho * _ADMM_GROWTH
    # masked PCG on every candidate's support, warm-started at d: min over X on the mask of (X - W) H_c (X - W)^T
    p = keep.to(w.dtype)
    x = d
    r = (matvec(b0[:, None, :].expand(n, cands, m)) - matvec(x)) * p
    zr = r / diag_c[:, :, None]
    dirn = zr.clone()
    rz = (r * zr).sum(0)
    tiny = torch.finfo(w.dtype).tiny
    for _ in range(_ADMM_PCG):
        ad = matvec(dirn) * p
        dad = (dirn * ad).sum(0)
        alpha = torch.where(dad > 0, rz / dad.clamp_min(tiny), torch.zeros_like(rz))
        x = x + alpha * dirn
        r = r - alpha * ad
        zr = r / diag_c[:, :, None]
        rz_new = (r * zr).sum(0)
        beta = torch.where(rz > 0, rz_new / rz.clamp_min(tiny), torch.zeros_like(rz))
        dirn = zr + beta * dirn
        rz = rz_new
    return (x * p).permute(1, 2, 0)


def _check_selection(folds: int, select: str, scorer: str, rows: int | None) -> None:
    if select not in SELECT_MODES:
        raise ValueError(f"select must be one of {', '.join(SELECT_MODES)}, got {select!r}.")
    if isinstance(folds, bool) or not isinstance(folds, int) or folds < 2:
        raise ValueError(f"folds must be an integer >= 2 (K of K-fold cross-validation), got {folds!r}.")
    if scorer not in SCORERS:
        raise ValueError(f"unknown scorer {scorer!r}: use one of {', '.join(SCORERS)}.")
    if rows is not None and (isinstance(rows, bool) or not isinstance(rows, int) or rows < 1):
        raise ValueError(f"rows must be a positive integer or None, got {rows!r}.")


def _fold_data(inputs: LayerInputs | GramInputs, h: torch.Tensor, k_folds: int,
               device: torch.device) -> list[dict[str, Any]]:
    """Per fold: its Gram, the rest's, and the rest's statistics (a cache for the scorers' square roots)."""
    fold_of = _fold_index(inputs.num_samples, k_folds)
    out: list[dict[str, Any]] = []
    for k in range(k_folds):
        h_fold = inputs.fold_gram(k, k_folds, device=device)
        h_train = h - h_fold
        out.append({"h_fold": h_fold, "h_train": h_train,
                    "n_train": int((fold_of != k).sum()) * inputs.tokens_per_sample,
                    "mean_diag": float(h_train.diagonal().mean()), "trace": float(h_train.diagonal().sum())})
    return out


def _fold_errors(w: torch.Tensor, prior_mask: torch.Tensor | None, folds_data: list[dict[str, Any]],
                 picked: Sequence[Candidate], count: int | None, pattern: Pattern, scorer: str, damping: float,
                 name: str) -> dict[str, list[float]]:
    """Each candidate's relative error on every held-out fold, on ``count`` evenly spaced rows."""
    w_rows, prior_rows = w, prior_mask
    if count is not None and count < w.shape[0]:
        keep = torch.linspace(0, w.shape[0] - 1, count).round().long().unique()
        w_rows, prior_rows = w[keep], None if prior_mask is None else prior_mask[keep]
    errors: dict[str, list[float]] = {c.label: [] for c in picked}
    for fold in folds_data:
        h_fold = fold["h_fold"]
        denom = float(((w_rows.double() @ h_fold) * w_rows.double()).sum())
        for cand, w_hat in zip(picked, _candidate_weights(w_rows, prior_rows, fold, picked, pattern, scorer,
                                                          damping, name)):
            err = (w_rows - w_hat).double()
            errors[cand.label].append(float(((err @ h_fold) * err).sum()) / denom if denom > 0 else 0.0)
    return errors


def select_uncertainty(
    weight: torch.Tensor,
    inputs: LayerInputs | GramInputs,
    pattern: Pattern,
    candidates: Sequence[str | Candidate] | None = None,
    folds: int = 4,
    select: str = "mean",
    scorer: str = "admm",
    damping: float = 0.01,
    prior_mask: torch.Tensor | None = None,
    name: str = "layer",
    rows: int | None = 32,
    screen: int | None = None,
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
        scorer: what prunes each candidate on each fold: ``"admm"`` (default) runs a short ADMM in
            the fold's eigenbasis, shared by every candidate (one eigendecomposition per fold);
            a solver name (``"alps"``, ``"cap"``, ``"sparsegpt"``...) runs that solver in full.
        damping: the Baseline candidate's gamma.
        prior_mask: an earlier keep-mask (gradual schedules), honoured by the scorer.
        rows: score on this many evenly spaced output rows (``None``: all rows). The error is a
            sum over rows, so a row sample estimates it; the scoring cost falls in proportion.
        screen: with a solver as scorer and ``rows`` given, score every candidate on ``rows // 4``
            rows first and keep the best ``screen`` (and Baseline) for the decision on ``rows``
            rows (see :class:`AutoOptions`). ``None``: no screening.

    Returns:
        A :class:`SetSelection`.

    Example:
        >>> import torch
        >>> from robop_lightning import LayerInputs
        >>> from robop_lightning.engine.patterns import parse_pattern
        >>> w, x = torch.randn(8, 16), torch.randn(12, 4, 16)
        >>> s = select_uncertainty(w, LayerInputs(x), parse_pattern("unstructured", 0.5), ["trace=0.01", "e=1"])
        >>> sorted(s.errors), s.folds
        (['baseline', 'e=1', 'trace=0.01'], 4)
    """
    _check_selection(folds, select, scorer, rows)
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
    if screen is not None and (isinstance(screen, bool) or not isinstance(screen, int) or screen < 1):
        raise ValueError(f"screen must be a positive integer or None, got {screen!r}.")
    k_folds = min(folds, samples)
    device = weight.device
    h = inputs.gram(device=device)
    folds_data = _fold_data(inputs, h, k_folds, device)
    w = weight.detach().to(torch.float32)
    score = functools.partial(_fold_errors, w, prior_mask, folds_data, pattern=pattern, scorer=scorer,
                              damping=damping, name=name)
    base = Candidate("baseline")
    screened: dict[str, list[float]] = {}
    finalists = cands
    first_rows = None if rows is None else max(1, rows // 4)
    if (screen is not None and scorer != "admm" and rows is not None and len(cands) > screen + 1
            and first_rows < min(rows, w.shape[0])):
        screened = score(cands, first_rows)
        probe = SetSelection(base, select, scorer, k_folds, screened)
        others = [c for c in cands if c != base]
        best = sorted(others, key=lambda c: (probe.score(c.label), cands.index(c)))[:screen]
        finalists = [c for c in cands if c == base or c in best]  # Baseline always; the grid's order
    errors = score(finalists, rows)
    selection = SetSelection(base, select, scorer, k_folds, errors, screened)
    best = min(finalists, key=lambda c: (selection.score(c.label), cands.index(c)))  # ties: the earlier candidate
    selection.chosen = best
    return selection


_GROUP_BYTES = 1 << 28  # float64 Grams of the candidates CAP scores together (256 MiB)


def _solve_gram(fold: dict[str, Any], ridge: float, c: float, scorer: str, name: str) -> tuple[torch.Tensor, Any]:
    """``H_train + c H_train^(1/2) + ridge I`` of one candidate divided by its power-of-4 unit, and the
    solver's factorisation of it (damped until that succeeds, as in the layer's own solve; ``None``
    for the solvers that factor nothing); the fold caches its square root."""
    h_train = fold["h_train"]
    if c and "root" not in fold:  # one H_train^(1/2) per fold, every gamma of E
        fold["root"] = sqrt_psd(h_train).to(h_train.dtype)
    h_eff = h_train + c * fold["root"] if c else h_train
    unit = lambda hd: unit_scale(float(hd.diagonal().mean()))  # noqa: E731
    if scorer in PREPARE:
        return damp_until(h_eff, ridge, name, factored(PREPARE[scorer], unit), warn=False)[0]
    if scorer in USES_FULL_GRAM:
        h_solve, _ = damp_until_definite(h_eff, ridge, name, warn=False)
    else:
        h_solve = h_eff + ridge * torch.eye(h_eff.shape[0], dtype=h_eff.dtype, device=h_eff.device)
    return h_solve / unit(h_solve), None


def _candidate_weights(w: torch.Tensor, prior: torch.Tensor | None, fold: dict[str, Any], cands: Sequence[Candidate],
                       pattern: Pattern, scorer: str, damping: float, name: str) -> list[torch.Tensor]:
    """Every candidate's pruned ``w`` on one fold's training Gram (``fold`` caches its square roots)."""
    h_train, n_train = fold["h_train"], fold["n_train"]
    mean_diag, trace = fold["mean_diag"], fold["trace"]
    shifts = [closed_form_spectrum(c.set, mean_diag, trace, n_train, damping if c.gamma is None else c.gamma)
              for c in cands]  # D = ridge I + c H^(1/2) of every candidate
    unit = unit_scale(mean_diag)
    if scorer == "admm":  # one eigendecomposition of the fold serves every candidate
        if "eigh" not in fold:
            h32 = (h_train / unit).float()
            lam, q = torch.linalg.eigh(h32)
            fold["eigh"] = (h32, lam.clamp_min(0), q)
        h32, lam, q = fold["eigh"]
        if any(c.set == "e" for c in cands) and "eigh_root" not in fold:
            fold["eigh_root"] = (q * lam.sqrt()[None, :]) @ q.T
        # in units of H / unit: the ridge scales with H, the coefficient of H^(1/2) with sqrt(unit)
        scaled = [(ridge / unit, c / math.sqrt(unit)) for ridge, c in shifts]
        return list(_admm_scores(w, lam, q, h32, fold.get("eigh_root"), scaled, pattern, prior))
    if scorer != "cap":  # one candidate's Gram at a time
        out = []
        for ridge, c in shifts:
            hs, factor = _solve_gram(fold, ridge, c, scorer, name)
            out.append(SOLVERS[scorer](w, hs, pattern, h_diag=hs.diagonal(), prior=prior, factor=factor)[0])
        return out
    # CAP: candidates in the same batched elimination steps, as many at a time as _GROUP_BYTES allows
    per = max(1, _GROUP_BYTES // (h_train.shape[0] ** 2 * 8))
    out = []
    for a in range(0, len(shifts), per):
        grams = torch.stack([_solve_gram(fold, ridge, c, scorer, name)[0] for ridge, c in shifts[a : a + per]])
        out += list(cap_grouped(w.expand(len(grams), -1, -1), grams, pattern, prior=prior)[0])
        del grams
    return out
