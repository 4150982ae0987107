"""``prune_layer``: prune one linear layer under an uncertainty set with one of five solvers.

The authors' sets (baseline, trace, e, cte; docs/method.md) are closed forms: the solver runs once
on ``H + D`` (:mod:`robop_lightning.engine.sets.closed_form`). This project's min-max extension
(minmax-trace, minmax-e, cvar) alternates (:func:`robop_lightning.engine.alternation.alternate`)
for its dynamic sets::

    H_0 = H;  W_0 = SOLVE(W, H_0)
    for k in 0 .. rounds-1:
        H'_k  = argmax_{H' in U} <H', E_k^T E_k>          # closed form
        H_k+1 = (1 - g_k) H_k + g_k H'_k,  g_k = 2/(k+2)    # Frank-Wolfe, stays in U
        W_k+1 = SOLVE(W, H_k+1, warm start W_k)
    keep the W_k of smallest robust loss, refit on its mask under its H_k (kept if it helps)

Static sets (the authors' four, the extension's per-row forms) call the solver once with their
effective matrix plus their ridge: ``damping * mean(diag H)`` for Baseline (SparseGPT's 1 %), the
set's own ``D`` for trace / e / cte (it replaces the Baseline damping), the base damping for the
extension. The ridge is increased automatically, with a warning, when the result is not
numerically positive definite.
"""

from __future__ import annotations

import functools
import time
import warnings
from dataclasses import dataclass
from typing import Any

import torch

from robop_lightning.engine.damping import Ridge, check_engine_options, unit_scale
from robop_lightning.engine.gram import LayerInputs, as_layer_inputs
from robop_lightning.engine.patterns import Pattern, parse_pattern
from robop_lightning.report import LayerResult
from robop_lightning.engine.alternation import alternate, blown_up, clamp_robust, quad, relative_error
from robop_lightning.engine.solvers import DATA_FREE, PREPARE, SOLVERS, USES_FULL_GRAM, check_solver_options
from robop_lightning.engine.solvers.refit import refit
from robop_lightning.engine.solvers.structured_obs import select_groups
from robop_lightning.engine.selection import (
    AutoOptions,
    Candidate,
    SetSelection,
    check_auto_request,
    default_candidates,
    select_uncertainty,
)
from robop_lightning.engine.sets import (
    ClosedFormSet,
    UncertaintySet,
    canonical_set_name,
    make_uncertainty,
    spectral_norm_sq,
)

__all__ = ["prune_layer", "LayerResult"]


def _check_weight(weight, name):
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
        shape = tuple(weight.shape) if isinstance(weight, torch.Tensor) else type(weight).__name__
        raise ValueError(f"{name}: weight must be a 2-D tensor (out_features, in_features), got {shape}.")
    if not weight.is_floating_point():
        raise ValueError(f"{name}: weight must be a float tensor, got {weight.dtype}.")
    if weight.numel() == 0:
        raise ValueError(f"{name}: weight is empty.")
    if not torch.isfinite(weight).all():
        raise ValueError(f"{name}: weight contains NaN or Inf; prune a finite model (check the checkpoint).")


# ----------------------------------------------------------------------------- problem setup
@dataclass
class _Request:
    """The checked arguments of one call (``auto``: how to choose the set, ``None`` when it is given)."""

    pat: Pattern
    solver: str
    options: dict[str, Any]
    prior: torch.Tensor | None
    uset: UncertaintySet
    auto: AutoOptions | None


@dataclass
class _Problem:
    """One layer's pruning problem, set up: what the solves and the scoring read.

    ``w`` is the float32 weight (zero outside ``prior``), ``h`` the calibration Gram, ``h_solve``
    the Gram the set was prepared on (the identity for all-zero inputs), ``unit`` the power of 4
    the solver's matrices are divided by, ``scale`` the scale of what the solver is handed.
    """

    name: str
    weight: torch.Tensor
    w: torch.Tensor
    pat: Pattern
    solver: str
    options: dict[str, Any]
    prior: torch.Tensor | None
    uset: UncertaintySet
    stats: LayerInputs
    held: LayerInputs | None
    h: torch.Tensor
    h_solve: torch.Tensor
    mean_diag: float
    scale: float
    unit: float
    ridge: Ridge
    selection: SetSelection | None

    @property
    def keeps_everything(self) -> bool:
        rows, cols = self.w.shape
        return self.pat.kind != "nm" and self.pat.keep_count(rows, cols) == rows * cols and self.prior is None

    @property
    def solved_once(self) -> bool:
        """One solve (closed-form and static sets, data-free solvers, all-zero inputs), else the alternation."""
        return not self.uset.dynamic or self.solver in DATA_FREE or self.mean_diag == 0


def _checked_prior(prior_mask, weight: torch.Tensor, pat: Pattern, name: str) -> torch.Tensor | None:
    if prior_mask is None:
        return None
    if not isinstance(prior_mask, torch.Tensor) or prior_mask.dtype != torch.bool or prior_mask.shape != weight.shape:
        raise ValueError(
            f"{name}: prior_mask must be a bool tensor shaped like the weight {tuple(weight.shape)} (True = kept)."
        )
    prior_mask = prior_mask.to(weight.device)
    rows, cols = weight.shape
    if pat.keep_count(rows, cols) > int(prior_mask.sum()):
        raise ValueError(
            f"{name}: the earlier mask keeps {int(prior_mask.sum())} weights, fewer than the {pat.keep_count(rows, cols)} "
            f"that sparsity {pat.sparsity:g} keeps; a schedule must not lower the sparsity."
        )
    return prior_mask


def _check_request(weight, sparsity, pattern, solver, uncertainty, radius, coupled, rounds, damping, solver_options,
                   prior_mask, name, auto) -> _Request:
    """Every argument check of :func:`prune_layer`, in its order (the first problem found is the one reported)."""
    rows, cols = weight.shape
    pat = parse_pattern(pattern, sparsity)
    pat.check_shape(rows, cols, name)
    if not isinstance(solver, str) or solver.lower() not in SOLVERS:
        raise ValueError(f"{name}: unknown solver {solver!r}: use one of {', '.join(SOLVERS)}.")
    solver = solver.lower()
    choose = check_auto_request(uncertainty, radius, solver, name)
    auto_opts = AutoOptions.coerce(auto) if choose else None
    uset: UncertaintySet = make_uncertainty("baseline" if choose else uncertainty, None if choose else radius, coupled)
    check_engine_options(rounds, damping, f"{name}: ")
    options = check_solver_options(solver, solver_options, name)
    prior = _checked_prior(prior_mask, weight, pat, name)
    return _Request(pat, solver, options, prior, uset, auto_opts)


def _select_set(weight: torch.Tensor, li: LayerInputs, req: _Request, uncertainty: str, damping: float,
                name: str) -> SetSelection:
    """``uncertainty="auto"`` / ``radius="auto"``: the set (or its gamma) chosen by cross-validation."""
    opts = req.auto
    set_auto = uncertainty.strip().lower() == "auto"
    candidates = opts.candidates
    if candidates is None:
        candidates = default_candidates("auto" if set_auto else canonical_set_name(uncertainty))
    elif not set_auto:
        candidates = [c for c in candidates if Candidate.parse(c).set in ("baseline", canonical_set_name(uncertainty))]
    return select_uncertainty(weight, li, req.pat, candidates, folds=opts.folds, select=opts.select,
                              scorer=opts.scorer_for(req.solver), damping=damping, prior_mask=req.prior,
                              name=name, rows=opts.rows, screen=opts.screen)


def _prepare(weight: torch.Tensor, li: LayerInputs, held: LayerInputs | None, req: _Request, damping: float,
             selection: SetSelection | None, name: str) -> _Problem:
    """The Gram, the float32 weight, the set prepared with its ridge, and the solver's scaling.

    Warns (``stacklevel`` for a call from :func:`prune_layer`) when every calibration input is zero.
    """
    cols = weight.shape[1]
    device = weight.device
    h = li.gram(device=device)
    w = weight.detach().to(dtype=torch.float32).clone(memory_format=torch.contiguous_format)
    if req.prior is not None:
        w = w * req.prior
    mean_diag = float(h.diagonal().mean())
    lam0 = damping * mean_diag
    if mean_diag == 0.0:
        warnings.warn(
            f"{name}: all calibration inputs are zero; every mask has zero calibration error, "
            "so the weights are pruned by magnitude.",
            RuntimeWarning,
            stacklevel=3,
        )
        lam0 = 0.0
    # With all-zero inputs every mask is optimal; the identity makes every solver pick by magnitude.
    h_solve = h if mean_diag > 0 else torch.eye(cols, dtype=h.dtype, device=device)
    uset = req.uset
    uset.prepare(h_solve, li, lam0)
    ridge = uset.ridge  # what the set adds to its effective matrix (replaces lam0 for trace/e/cte)
    # Every solver is invariant to scaling H, but some work in float32: a Gram of badly scaled
    # inputs (mean diag far outside float32's range once inverted) is handed over divided by a
    # power of 4, which is exact and leaves well-scaled layers bit-identical.
    # the scale of what the solver is handed: H plus the set's D (an absolute CTE ridge can dwarf H)
    scale = mean_diag
    if isinstance(uset, ClosedFormSet) and uset.name != "baseline" and mean_diag > 0:
        scale = float(uset.effective().diagonal().mean()) + ridge
    return _Problem(name=name, weight=weight, w=w, pat=req.pat, solver=req.solver, options=req.options,
                    prior=req.prior, uset=uset, stats=li, held=held, h=h, h_solve=h_solve, mean_diag=mean_diag, scale=scale,
                    unit=unit_scale(scale), ridge=Ridge(ridge, ridge, ridge), selection=selection)


# ----------------------------------------------------------------------------- solves
def _solve(p: _Problem, h_eff: torch.Tensor, warm: torch.Tensor | None = None, h_diag: torch.Tensor | None = None,
           shared: tuple | None = None):
    """One call of the solver on ``h_eff`` (damped until definite for the solvers that factor it).

    ``shared``: a key naming ``h_eff`` among the layers with these statistics (the static solves):
    the damping, the scaling and the solver's factorisation are then made once for all of them.
    """
    factor = None
    if p.solver in USES_FULL_GRAM:  # damped, scaled and factored once for the layers sharing the key
        memo = None
        if shared is not None and p.mean_diag > 0:
            memo = functools.partial(p.stats.derived, ("damped", *shared, p.ridge.base, p.unit))
        prepare = PREPARE.get(p.solver) if p.mean_diag > 0 else None
        h_damped, factor = p.ridge.damp(h_eff, p.name, unit=p.unit, prepare=prepare, memo=memo)
    else:
        h_damped = h_eff / p.unit
    fn = SOLVERS[p.solver] if p.mean_diag > 0 else SOLVERS["magnitude"]
    h_diag = h_eff.diagonal() if h_diag is None else h_diag
    return fn(p.w, h_damped, p.pat, h_diag=h_diag / p.unit, warm=warm, prior=p.prior, factor=factor, **p.options)


def _solve_static(p: _Problem) -> tuple[torch.Tensor, torch.Tensor]:
    """One solve on the set's effective matrix, the ridge raised tenfold while the compensation explodes."""
    for _ in range(7):
        w_hat, mask = _solve(p, p.uset.effective(), h_diag=p.uset.score_diagonal(),
                             shared=(p.solver, p.uset.describe(), p.scale))
        if p.solver not in USES_FULL_GRAM or p.mean_diag == 0 or not blown_up(p.h, p.w, w_hat, mask):
            return w_hat, mask
        # numerically singular H + D (Cholesky passed on rounding noise): the compensation exploded
        p.ridge.base = max(p.ridge.base * 10, 1e-6 * p.scale)
        p.ridge.raised = max(p.ridge.raised, p.ridge.base)
    raise ValueError(f"{p.name}: the solver's result stays non-finite or far worse than masking alone even "
                     f"with damping {p.ridge.base:.3g}; the calibration inputs are degenerate for this set.")


def _alternation_step(p: _Problem, h_k: torch.Tensor, previous):
    """:func:`alternate`'s solve: the solver on ``H_k``, warm-started at the previous round's weights."""
    w_k, m_k = _solve(p, h_k, warm=None if previous is None else previous[0])
    return (w_k, m_k), p.w - w_k


def _mask_change(previous, current) -> dict[str, float]:
    return {"mask_change": float((current[1] != previous[1]).float().mean())}


def _solve_dynamic(p: _Problem, rounds: int) -> tuple[torch.Tensor, torch.Tensor, list[dict[str, Any]]]:
    """The min-max extension's alternation, then (solvers with a full Gram) the robust refit of its mask."""
    best, history = alternate(functools.partial(_alternation_step, p), p.h_solve, p.uset, rounds,
                              nominal=functools.partial(quad, p.h), describe=_mask_change)
    w_hat, mask = best.solution
    if p.solver in USES_FULL_GRAM:
        w_hat = _robust_refit(p, best.solution, best.h, best.robust_loss, rounds, history)
    return w_hat, mask, history


def _robust_refit(p: _Problem, solution, h_k: torch.Tensor, phi: float, rounds: int,
                  history: list[dict[str, Any]]) -> torch.Tensor:
    """The refit of the best round's mask (history entries appended); returns the weights kept.

    With the mask fixed the problem is convex-concave and the robust optimum is the
    least-squares refit under the saddle-point Gram (plug-in theorem). First the exact
    refit under the best round's Gram, then short Frank-Wolfe steps towards the current
    worst case (long steps overshoot: the worst case of a few samples or one direction
    is far from H*), each kept only if it lowers the robust loss.
    """
    w_hat, mask = solution
    h_fit = h_k
    candidates = [(h_k, "refit")]
    for j in range(rounds + 1):
        improved = False
        for h_try, label in candidates:
            refitted = refit(p.w, p.ridge.damp(h_try, p.name, unit=p.unit)[0], mask, x0=w_hat)
            phi_fit = p.uset.robust_loss(p.w - refitted)
            history.append({"round": label, "robust_loss": phi_fit,
                            "nominal_loss": quad(p.h, p.w - refitted), "mask_change": 0.0})
            if phi_fit < phi:
                phi, w_hat, h_fit, improved = phi_fit, refitted, h_try, True
                break
        if j and not improved:
            break
        worst = p.uset.worst_case(p.w - w_hat)
        candidates = [((1 - g) * h_fit + g * worst, f"refit step {g:g}") for g in (0.2, 0.05)]
    return w_hat


def _warn_if_raised(p: _Problem) -> None:
    """One warning per layer when a solve needed more than the set's ridge (``stacklevel``: from prune_layer)."""
    if p.ridge.raised > p.ridge.start:
        warnings.warn(
            f"{p.name}: the damped Gram was not positive definite; damping raised from {p.ridge.start:.3g} to "
            f"{p.ridge.raised:.3g} (rank-deficient or badly scaled calibration inputs). More calibration data, "
            "or a larger `damping`, avoids this.",
            RuntimeWarning,
            stacklevel=3,
        )


# ----------------------------------------------------------------------------- scoring
def _errors(p: _Problem, w_hat: torch.Tensor) -> tuple[float, float, float | None, float | None]:
    """``(nominal, robust, held-out, srank)`` of the pruned ``w_hat`` against the caller's weight."""
    w_in = p.weight.detach().to(torch.float32)
    err = w_in - w_hat
    denom = quad(p.h, w_in)  # each (out x in x in) float64 product once: they cost as much as a SparseGPT solve
    num = quad(p.h, err)
    nominal = num / denom if denom > 0 else 0.0
    shares_h = isinstance(p.uset, ClosedFormSet) and p.uset.h is p.h
    robust_num = p.uset.robust_loss(err, nominal=num) if shares_h else p.uset.robust_loss(err)
    robust = clamp_robust(nominal, robust_num / denom if denom > 0 else 0.0)
    heldout_error = None if p.held is None else relative_error(p.held.gram(device=p.weight.device), w_in, err)
    srank = None
    if p.uset.dynamic:
        top, _ = spectral_norm_sq(err)
        srank = float(err.double().pow(2).sum()) / top if top > 0 else 0.0
    return nominal, robust, heldout_error, srank


def _result(p: _Problem, w_hat: torch.Tensor, mask: torch.Tensor, history: list[dict[str, Any]],
            start: float) -> LayerResult:
    """The :class:`LayerResult` of the solved problem: the mask (within the prior), weights and errors."""
    if p.prior is not None:
        mask = mask & p.prior
    w_hat = torch.where(mask, w_hat, torch.zeros_like(w_hat))
    nominal, robust, heldout_error, srank = _errors(p, w_hat)
    out = w_hat.to(p.weight.dtype)
    out = torch.where(mask, out, torch.zeros_like(out))
    return LayerResult(
        weight=out,
        mask=mask,
        nominal_error=nominal,
        robust_error=robust,
        heldout_error=heldout_error,
        srank=srank,
        sparsity=1.0 - float(mask.float().mean()),
        seconds=time.perf_counter() - start,
        solver=p.solver,
        uncertainty=p.uset.describe(),
        pattern=str(p.pat),
        damping=p.ridge.raised,  # never below the set's ridge: what the solves finally used
        history=history,
        selection=None if p.selection is None else p.selection.to_dict(),
    )


# ----------------------------------------------------------------------------- the entry point
def prune_layer(
    weight: torch.Tensor,
    inputs: torch.Tensor | LayerInputs,
    sparsity: float | None = None,
    pattern: str = "unstructured",
    solver: str = "alps",
    uncertainty: str = "baseline",
    radius: float | None = None,
    coupled: bool | None = None,
    rounds: int = 3,
    heldout: torch.Tensor | LayerInputs | None = None,
    damping: float = 0.01,
    solver_options: dict[str, Any] | None = None,
    prior_mask: torch.Tensor | None = None,
    name: str = "layer",
    auto: AutoOptions | dict[str, Any] | None = None,
) -> LayerResult:
    """Prune one linear layer robustly.

    Args:
        weight: ``(out_features, in_features)``, any float dtype; never modified.
        inputs: calibration inputs of this layer, ``(samples, tokens, in_features)`` or
            ``(N, in_features)`` (then every row is a sample), or a :class:`LayerInputs`.
        sparsity: fraction of weights set to zero, in ``[0, 1)``. ``None``: 0.5, or ``1 - N/M``
            for an ``N:M`` pattern.
        pattern: ``"unstructured"`` (budget over the whole layer), ``"row"`` (same per row),
            ``"N:M"`` such as ``"2:4"`` (keep N of every M consecutive inputs), or ``"structured"``:
            whole input columns (``solver_options={"groups": [...]}`` for heads) chosen by robust
            structured OBS with exact compensation (:func:`robop_lightning.engine.solvers.structured_obs.select_groups`).
        solver: ``"alps"``, ``"cap"``, ``"sparsegpt"``, ``"wanda"`` or ``"magnitude"``.
        uncertainty: the authors' ``"baseline"``, ``"trace"``, ``"e"`` (or ``"ellipsoid"``) or
            ``"cte"`` (one solve on ``H + D``), this project's extension ``"minmax-trace"``,
            ``"minmax-e"`` or ``"cvar"`` (see :mod:`robop_lightning.engine.sets`), or ``"auto"``:
            the set and its gamma chosen per layer by cross-validation (see ``auto``).
        radius: the authors' ``gamma`` for their four sets (``None``: 0.01; for baseline,
            ``damping``), ``rho`` / ``alpha`` for the extension (``None``: its defaults), or
            ``"auto"``: chosen per layer by cross-validation (see ``auto``).
        coupled: extension only: ``False`` uses the per-row form of minmax-trace / minmax-e.
        rounds: outer rounds of the alternating scheme for dynamic sets (0 = nominal solve only).
        heldout: held-out inputs of the same layer, for ``heldout_error``.
        damping: the Baseline set's ``gamma``, relative to ``mean(diag H)`` (SparseGPT's
            ``percdamp``), and the extension's base damping; the authors' robust sets replace it
            by their own ``D``.
        solver_options: extra keyword arguments for the solver (e.g. ``{"block_size": 128}`` for
            cap, ``{"max_iter": 100}`` for alps, ``{"block_size": 64}`` for sparsegpt; or the solver's dataclass,
            :mod:`robop_lightning.engine.solvers.options`).
        prior_mask: keep-mask of an earlier pruning (gradual schedules): weights outside it stay
            pruned and count towards the budget; solvers prune them first, with compensation.
        name: the layer's name in messages.
        auto: how ``uncertainty="auto"`` (the set and its gamma) or ``radius="auto"`` (the gamma of
            the given set) choose: K-fold cross-validation over calibration samples
            (:class:`robop_lightning.engine.selection.AutoOptions`; a dict with the same keys works).

    Returns:
        A :class:`LayerResult`.

    Raises:
        ValueError: NaN/Inf in weight or inputs, sparsity outside [0, 1), an N:M that does not
            divide ``in_features``, mismatched shapes, an unknown solver / set / pattern, or a
            radius outside its range.

    Example:
        >>> import torch
        >>> from robop_lightning import prune_layer
        >>> w, x = torch.randn(16, 32), torch.randn(8, 4, 32)
        >>> r = prune_layer(w, x, sparsity=0.5, solver="sparsegpt")
        >>> int(r.mask.sum()), r.nominal_error <= r.robust_error
        (256, True)
    """
    start = time.perf_counter()
    _check_weight(weight, name)
    if isinstance(pattern, str) and pattern.strip().lower() == "structured":
        # whole input columns (or solver_options["groups"]) by robust structured OBS
        return prune_layer_structured(
            weight, inputs, sparsity, uncertainty, radius, coupled, rounds, heldout, damping, solver_options,
            prior_mask, name,
        )
    req = _check_request(weight, sparsity, pattern, solver, uncertainty, radius, coupled, rounds, damping,
                         solver_options, prior_mask, name, auto)
    cols = weight.shape[1]
    li = as_layer_inputs(inputs, cols, name=f"{name}: inputs")
    held = None if heldout is None else as_layer_inputs(heldout, cols, name=f"{name}: heldout")
    selection = None
    if req.auto is not None:
        selection = _select_set(weight, li, req, uncertainty, damping, name)
        req.uset = make_uncertainty(selection.chosen.set, selection.chosen.gamma, coupled)
    p = _prepare(weight, li, held, req, damping, selection, name)
    history: list[dict[str, Any]] = []
    if p.keeps_everything:
        w_hat, mask = p.w.clone(), torch.ones(p.w.shape, dtype=torch.bool, device=weight.device)
    elif p.solved_once:
        w_hat, mask = _solve_static(p)
    else:
        w_hat, mask, history = _solve_dynamic(p, rounds)
    _warn_if_raised(p)
    return _result(p, w_hat, mask, history, start)


def prune_layer_structured(
    weight, inputs, sparsity, uncertainty, radius, coupled, rounds, heldout, damping, solver_options, prior_mask, name
):
    """``prune_layer(pattern="structured")``: zero whole input columns (or groups) and compensate the rest.

    The layer keeps its shape (the removed columns are exact zeros, the same in every row); use
    :func:`robop_lightning.pipeline.shrink_step.prune_model_structured` to shrink modules physically. ``solver_options`` may hold
    ``groups`` (index lists, e.g. one per head; default: single columns) and ``per_step``.
    The fraction of groups removed is ``round(sparsity * groups)``.

    Example:
        >>> from robop_lightning import prune_layer
        >>> import torch
        >>> r = prune_layer(torch.randn(8, 16), torch.randn(64, 16), sparsity=0.25, pattern="structured")
        >>> int((r.mask.sum(0) == 0).sum()), r.pattern
        (4, 'structured')
    """
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
        w64 = weight.detach().double().cpu()
        heldout_error = relative_error(hh, w64, w64 - out.double().cpu())
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
