"""The five solvers: ``(W, effective damped H, pattern) -> (W_hat, keep-mask)``.

All share one signature, ``solver(w, h, pattern, *, h_diag=None, warm=None, **options)``:
``w`` is float32 ``(m, n)``, ``h`` the damped effective Gram ``(n, n)`` in float64, ``h_diag`` the
undamped diagonal (Wanda's ``||X_j||^2``, SparseGPT's dead-input test), ``warm`` a previous
solution (used by ALPS). Options are solver specific (see each module).
"""

import inspect

from robop_lightning.solvers.alps import alps
from robop_lightning.solvers.cap import cap
from robop_lightning.solvers.magnitude import magnitude
from robop_lightning.solvers.refit import refit
from robop_lightning.solvers.sparsegpt import sparsegpt
from robop_lightning.solvers.wanda import wanda

SOLVERS = {"alps": alps, "cap": cap, "sparsegpt": sparsegpt, "wanda": wanda, "magnitude": magnitude}
# Solvers whose result depends on more than diag(H) (they need a damped, invertible Gram).
USES_FULL_GRAM = frozenset({"alps", "cap", "sparsegpt"})
# Solvers whose result does not depend on the calibration data at all.
DATA_FREE = frozenset({"magnitude"})
# What the engine passes itself; everything else keyword-only in a solver's signature is a user option.
_ENGINE_ARGS = frozenset({"warm", "prior", "h_diag", "history"})
SOLVER_OPTIONS = {
    name: tuple(
        p.name for p in inspect.signature(fn).parameters.values()
        if p.kind == p.KEYWORD_ONLY and p.name not in _ENGINE_ARGS
    )
    for name, fn in SOLVERS.items()
}


def check_solver_options(solver: str, options: dict | None, name: str = "layer") -> dict:
    """``options`` as a dict, or a ``ValueError`` naming the unknown keys and the valid ones.

    Example:
        >>> check_solver_options("sparsegpt", {"blocksize": 64})
        {'blocksize': 64}
    """
    options = dict(options or {})
    unknown = sorted(set(options) - set(SOLVER_OPTIONS[solver]))
    if unknown:
        valid = ", ".join(SOLVER_OPTIONS[solver]) or "none"
        raise ValueError(f"{name}: unknown solver option(s) {', '.join(map(repr, unknown))} for {solver!r}; "
                         f"its options are: {valid}.")
    return options

__all__ = ["SOLVERS", "SOLVER_OPTIONS", "check_solver_options", "USES_FULL_GRAM", "DATA_FREE", "alps", "cap", "sparsegpt", "wanda", "magnitude", "refit"]
