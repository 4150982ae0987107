"""The five solvers: ``(W, effective damped H, pattern) -> (W_hat, keep-mask)``.

All share one signature, ``solver(w, h, pattern, *, h_diag=None, warm=None, **options)``:
``w`` is float32 ``(m, n)``, ``h`` the damped effective Gram ``(n, n)`` in float64, ``h_diag`` the
undamped diagonal (Wanda's ``||X_j||^2``, SparseGPT's dead-input test), ``warm`` a previous
solution (used by ALPS). Options are solver specific (see each module).
"""

import dataclasses
from collections.abc import Mapping
from typing import Any

from robop_lightning.engine.solvers.alps import alps
from robop_lightning.engine.solvers.alps import prepare as _alps_prepare
from robop_lightning.engine.solvers.cap import cap
from robop_lightning.engine.solvers.magnitude import magnitude
from robop_lightning.engine.solvers.options import RENAMED as OPTION_RENAMES
from robop_lightning.engine.solvers.options import OPTION_TYPES, solver_options
from robop_lightning.engine.solvers.refit import refit
from robop_lightning.engine.solvers.sparsegpt import prepare as _sparsegpt_prepare
from robop_lightning.engine.solvers.sparsegpt import sparsegpt
from robop_lightning.engine.solvers.wanda import wanda

SOLVERS = {"alps": alps, "cap": cap, "sparsegpt": sparsegpt, "wanda": wanda, "magnitude": magnitude}
# Solvers whose result depends on more than diag(H) (they need a damped, invertible Gram).
USES_FULL_GRAM = frozenset({"alps", "cap", "sparsegpt"})
# Solvers whose factorisation of the damped Gram the engine makes (and shares between layers with the
# same Gram): ``prepare(h)`` gives what the solver takes as ``factor=``, or ``None`` where ``h`` is not
# positive definite as the solver needs it (SparseGPT: its float64 Cholesky; ALPS: float64 and float32).
PREPARE = {"alps": _alps_prepare, "sparsegpt": _sparsegpt_prepare}
# Solvers whose result does not depend on the calibration data at all.
DATA_FREE = frozenset({"magnitude"})
SOLVER_OPTIONS = {name: tuple(f.name for f in dataclasses.fields(cls)) for name, cls in OPTION_TYPES.items()}


def check_solver_options(solver: str, options: Any, name: str = "layer") -> dict:
    """The options the caller gave, as a dict of keyword arguments for the solver.

    ``options`` is a dict, the solver's options dataclass (:mod:`robop_lightning.engine.solvers.options`) or
    ``None``; an unknown key raises a ``ValueError`` naming the valid ones.

    Example:
        >>> check_solver_options("sparsegpt", {"block_size": 64})
        {'block_size': 64}
    """
    typed = solver_options(solver, options, name)
    if not isinstance(options, Mapping):  # None, or the dataclass itself
        return {} if options is None else dataclasses.asdict(typed)
    keys = {OPTION_RENAMES.get(solver, {}).get(k, k) for k in options}
    return {k: v for k, v in dataclasses.asdict(typed).items() if k in keys}


__all__ = ["SOLVERS", "SOLVER_OPTIONS", "OPTION_TYPES", "check_solver_options", "solver_options", "USES_FULL_GRAM", "PREPARE", "DATA_FREE", "alps", "cap", "sparsegpt", "wanda", "magnitude", "refit"]
