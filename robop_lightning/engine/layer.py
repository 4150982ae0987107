"""``prune_layer``: prune one linear layer under an uncertainty set with one of five solvers.

The authors' sets (baseline, trace, e, cte; SPEC §2a) are closed forms: the solver runs once on
``H + D`` (:mod:`robop_lightning.engine.sets.closed_form`). This project's min-max extension
(minmax-trace, minmax-e, cvar; SPEC §2b) alternates (SPEC §3, :func:`robop_lightning.engine.alternation.alternate`)
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

import time
import warnings
from typing import Any

import torch

from robop_lightning.engine.damping import damp_until_definite, unit_scale
from robop_lightning.engine.gram import LayerInputs, as_layer_inputs
from robop_lightning.engine.patterns import parse_pattern
from robop_lightning.report import LayerResult
from robop_lightning.engine.alternation import alternate, blown_up, clamp_robust, quad, relative_error
from robop_lightning.engine.solvers import DATA_FREE, SOLVERS, USES_FULL_GRAM, check_solver_options
from robop_lightning.engine.solvers.refit import refit
from robop_lightning.engine.solvers.structured_obs import select_groups
from robop_lightning.engine.selection import (
    AutoOptions,
    Candidate,
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
        # whole input columns (or solver_options["groups"]) by robust structured OBS (issue 7)
        return prune_layer_structured(
            weight, inputs, sparsity, uncertainty, radius, coupled, rounds, heldout, damping, solver_options,
            prior_mask, name,
        )
    rows, cols = weight.shape
    pat = parse_pattern(pattern, sparsity)
    pat.check_shape(rows, cols, name)
    if not isinstance(solver, str) or solver.lower() not in SOLVERS:
        raise ValueError(f"{name}: unknown solver {solver!r}: use one of {', '.join(SOLVERS)}.")
    solver = solver.lower()
    choose = check_auto_request(uncertainty, radius, solver, name)
    auto_opts = AutoOptions.coerce(auto) if choose else None
    uset: UncertaintySet = make_uncertainty("baseline" if choose else uncertainty, None if choose else radius, coupled)
    if isinstance(rounds, bool) or not isinstance(rounds, int) or rounds < 0:
        raise ValueError(f"{name}: rounds must be a non-negative integer, got {rounds!r}.")
    if isinstance(damping, bool) or not isinstance(damping, (int, float)) or not damping >= 0:
        raise ValueError(f"{name}: damping must be a number >= 0 (relative to mean(diag H)), got {damping!r}.")
    options = check_solver_options(solver, solver_options, name)

    if prior_mask is not None:
        if not isinstance(prior_mask, torch.Tensor) or prior_mask.dtype != torch.bool or prior_mask.shape != weight.shape:
            raise ValueError(
                f"{name}: prior_mask must be a bool tensor shaped like the weight {tuple(weight.shape)} (True = kept)."
            )
        prior_mask = prior_mask.to(weight.device)
        if pat.keep_count(rows, cols) > int(prior_mask.sum()):
            raise ValueError(
                f"{name}: the earlier mask keeps {int(prior_mask.sum())} weights, fewer than the {pat.keep_count(rows, cols)} "
                f"that sparsity {pat.sparsity:g} keeps; a schedule must not lower the sparsity."
            )
    li = as_layer_inputs(inputs, cols, name=f"{name}: inputs")
    held = None if heldout is None else as_layer_inputs(heldout, cols, name=f"{name}: heldout")
    selection = None
    if choose:
        set_auto = uncertainty.strip().lower() == "auto"
        candidates = auto_opts.candidates
        if candidates is None:
            candidates = default_candidates("auto" if set_auto else canonical_set_name(uncertainty))
        elif not set_auto:
            candidates = [c for c in candidates if Candidate.parse(c).set in ("baseline", canonical_set_name(uncertainty))]
        selection = select_uncertainty(weight, li, pat, candidates, folds=auto_opts.folds, select=auto_opts.select,
                                       scorer=auto_opts.scorer_for(solver), damping=damping, prior_mask=prior_mask,
                                       name=name, rows=auto_opts.rows, screen=auto_opts.screen)
        uset = make_uncertainty(selection.chosen.set, selection.chosen.gamma, coupled)
    device = weight.device
    h = li.gram(device=device)
    w = weight.detach().to(dtype=torch.float32).clone(memory_format=torch.contiguous_format)
    if prior_mask is not None:
        w = w * prior_mask

    mean_diag = float(h.diagonal().mean())
    lam0 = damping * mean_diag
    if mean_diag == 0.0:
        warnings.warn(
            f"{name}: all calibration inputs are zero; every mask has zero calibration error, "
            "so the weights are pruned by magnitude.",
            RuntimeWarning,
            stacklevel=2,
        )
        lam0 = 0.0
    # With all-zero inputs every mask is optimal; the identity makes every solver pick by magnitude.
    h_solve = h if mean_diag > 0 else torch.eye(cols, dtype=h.dtype, device=device)
    uset.prepare(h_solve, li, lam0)
    history: list[dict[str, Any]] = []
    lam_set = lam_base = uset.ridge  # what the set adds to its effective matrix (replaces lam0 for trace/e/cte)
    used_lam = [lam_base]
    # Every solver is invariant to scaling H, but some work in float32: a Gram of badly scaled
    # inputs (mean diag far outside float32's range once inverted) is handed over divided by a
    # power of 4, which is exact and leaves well-scaled layers bit-identical.
    # the scale of what the solver is handed: H plus the set's D (an absolute CTE ridge can dwarf H)
    scale = mean_diag
    if isinstance(uset, ClosedFormSet) and uset.name != "baseline" and mean_diag > 0:
        scale = float(uset.effective().diagonal().mean()) + lam_base
    unit = unit_scale(scale)
    raised = [lam_base]  # the largest damping the solves needed: one warning per layer, at the end

    def damp(h_eff: torch.Tensor) -> torch.Tensor:
        hd, lam = damp_until_definite(h_eff, lam_base, name, warn=False)
        raised[0] = max(raised[0], lam)
        return hd

    def solve(h_eff: torch.Tensor, warm: torch.Tensor | None = None, h_diag: torch.Tensor | None = None):
        h_damped = h_eff
        if solver in USES_FULL_GRAM:
            h_damped = damp(h_eff)
            used_lam[0] = raised[0]
        fn = SOLVERS[solver] if mean_diag > 0 else SOLVERS["magnitude"]
        h_diag = h_eff.diagonal() if h_diag is None else h_diag
        return fn(w, h_damped / unit, pat, h_diag=h_diag / unit, warm=warm, prior=prior_mask, **options)

    if pat.kind != "nm" and pat.keep_count(rows, cols) == rows * cols and prior_mask is None:
        w_hat, mask = w.clone(), torch.ones(rows, cols, dtype=torch.bool, device=device)
    elif not uset.dynamic or solver in DATA_FREE or mean_diag == 0:
        for _ in range(7):
            w_hat, mask = solve(uset.effective(), h_diag=uset.score_diagonal())
            if solver not in USES_FULL_GRAM or mean_diag == 0 or not blown_up(h, w, w_hat, mask):
                break
            # numerically singular H + D (Cholesky passed on rounding noise): the compensation exploded
            lam_base = max(lam_base * 10, 1e-6 * scale)
            raised[0] = max(raised[0], lam_base)
        else:
            raise ValueError(f"{name}: the solver's result stays non-finite or far worse than masking alone even "
                             f"with damping {lam_base:.3g}; the calibration inputs are degenerate for this set.")
    else:
        def step(h_k: torch.Tensor, previous):
            w_k, m_k = solve(h_k, warm=None if previous is None else previous[0])
            return (w_k, m_k), w - w_k

        best, history = alternate(step, h_solve, uset, rounds, nominal=lambda e: quad(h, e),
                                  describe=lambda prev, cur: {"mask_change": float((cur[1] != prev[1]).float().mean())})
        phi, (w_hat, mask), h_k = best.robust_loss, best.solution, best.h
        if solver in USES_FULL_GRAM:
            # With the mask fixed the problem is convex-concave and the robust optimum is the
            # least-squares refit under the saddle-point Gram (plug-in theorem). First the exact
            # refit under the best round's Gram, then short Frank-Wolfe steps towards the current
            # worst case (long steps overshoot: the worst case of a few samples or one direction
            # is far from H*), each kept only if it lowers the robust loss.
            h_fit = h_k
            candidates = [(h_k, "refit")]
            for j in range(rounds + 1):
                improved = False
                for h_try, label in candidates:
                    refitted = refit(w, damp(h_try) / unit, mask, x0=w_hat)
                    phi_fit = uset.robust_loss(w - refitted)
                    history.append({"round": label, "robust_loss": phi_fit,
                                    "nominal_loss": quad(h, w - refitted), "mask_change": 0.0})
                    if phi_fit < phi:
                        phi, w_hat, h_fit, improved = phi_fit, refitted, h_try, True
                        break
                if j and not improved:
                    break
                worst = uset.worst_case(w - w_hat)
                candidates = [((1 - g) * h_fit + g * worst, f"refit step {g:g}") for g in (0.2, 0.05)]

    if raised[0] > lam_set:
        warnings.warn(
            f"{name}: the damped Gram was not positive definite; damping raised from {lam_set:.3g} to "
            f"{raised[0]:.3g} (rank-deficient or badly scaled calibration inputs). More calibration data, "
            "or a larger `damping`, avoids this.",
            RuntimeWarning,
            stacklevel=2,
        )
        used_lam[0] = raised[0]
    if prior_mask is not None:
        mask = mask & prior_mask
    w_hat = torch.where(mask, w_hat, torch.zeros_like(w_hat))
    w_in = weight.detach().to(torch.float32)
    err = w_in - w_hat
    denom = quad(h, w_in)  # each (out x in x in) float64 product once: they cost as much as a SparseGPT solve
    num = quad(h, err)
    nominal = num / denom if denom > 0 else 0.0
    shares_h = isinstance(uset, ClosedFormSet) and uset.h is h
    robust_num = uset.robust_loss(err, nominal=num) if shares_h else uset.robust_loss(err)
    robust = clamp_robust(nominal, robust_num / denom if denom > 0 else 0.0)
    heldout_error = None if held is None else relative_error(held.gram(device=device), w_in, err)
    srank = None
    if uset.dynamic:
        top, _ = spectral_norm_sq(err)
        srank = float(err.double().pow(2).sum()) / top if top > 0 else 0.0

    out = w_hat.to(weight.dtype)
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
        solver=solver,
        uncertainty=uset.describe(),
        pattern=str(pat),
        damping=used_lam[0],
        history=history,
        selection=None if selection is None else selection.to_dict(),
    )


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
