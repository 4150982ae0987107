"""The five solvers: ``(W, effective damped H, pattern) -> (W_hat, keep-mask)``.

All share one signature, ``solver(w, h, pattern, *, h_diag=None, warm=None, **options)``:
``w`` is float32 ``(m, n)``, ``h`` the damped effective Gram ``(n, n)`` in float64, ``h_diag`` the
undamped diagonal (Wanda's ``||X_j||^2``, SparseGPT's dead-input test), ``warm`` a previous
solution (used by ALPS). Options are solver specific (see each module).
"""

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

__all__ = ["SOLVERS", "USES_FULL_GRAM", "DATA_FREE", "alps", "cap", "sparsegpt", "wanda", "magnitude", "refit"]
