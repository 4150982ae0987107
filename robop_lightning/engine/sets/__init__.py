"""Uncertainty sets: the authors' closed forms (the default) and this project's min-max extension.

=================  ==============================================  ==========================
name               what it is                                      cost
=================  ==============================================  ==========================
``baseline``       the nominal problem, ridge ``gamma mean(diag H)``   one solve
``trace``          authors' Trace: ridge ``gamma tr(H) / sqrt(N)``     one solve
``e``              authors' E ("eigh"): ``gamma sqrt(tr H / N) H^1/2`` one solve + one ``n x n`` eigh
``cte``            authors' CTE: absolute ridge ``gamma`` (scale!)     one solve
``minmax-trace``   extension: coupled worst case over a trace ball     4-7 solves (alternation)
``minmax-e``       extension: coupled worst case over an ellipsoid     4-7 solves
``cvar``           extension: CVaR re-weighting of samples             4-7 solves
=================  ==============================================  ==========================

``radius`` is the authors' ``gamma`` for the first four (default 0.01; for ``baseline`` the
default is the engine's ``damping``), and ``rho`` / ``alpha`` for the extension
(:mod:`robop_lightning.engine.sets.minmax`). ``"ellipsoid"`` and ``"eigh"`` are accepted for ``"e"``.

Example:
    >>> import torch
    >>> from robop_lightning.engine.sets import make_uncertainty
    >>> make_uncertainty("trace", 0.01).describe(), make_uncertainty("cvar", 0.5).dynamic
    ('trace(gamma=0.01)', True)
"""

from __future__ import annotations

import math

from robop_lightning.engine.sets.base import UncertaintySet
from robop_lightning.engine.sets.closed_form import (
    CLOSED_FORM_SETS,
    DEFAULT_GAMMA,
    ClosedFormSet,
    closed_form_damping,
)
from robop_lightning.engine.sets.minmax import (
    MINMAX_SETS,
    CVaR,
    MinMaxEllipsoid,
    MinMaxTrace,
    cvar_weights,
    spectral_norm_sq,
)

__all__ = [
    "UncertaintySet",
    "ClosedFormSet",
    "MinMaxTrace",
    "MinMaxEllipsoid",
    "CVaR",
    "closed_form_damping",
    "cvar_weights",
    "spectral_norm_sq",
    "make_uncertainty",
    "canonical_set_name",
    "parse_set_spec",
    "UNCERTAINTY_SETS",
    "CLOSED_FORM_SETS",
    "MINMAX_SETS",
    "DEFAULT_GAMMA",
]

UNCERTAINTY_SETS = CLOSED_FORM_SETS + MINMAX_SETS
_ALIASES = {"ellipsoid": "e", "eigh": "e", "minmax-ellipsoid": "minmax-e"}


def canonical_set_name(name: str) -> str:
    """The set's canonical name (``"Ellipsoid"`` -> ``"e"``), or a ``ValueError`` listing the valid ones."""
    key = name.strip().lower() if isinstance(name, str) else None
    key = _ALIASES.get(key, key)
    if key == "auto":
        raise ValueError(
            "uncertainty='auto' is not a set: prune_layer / prune_model / RobOPCallback choose one per layer with "
            "the unstructured, row and N:M patterns (not with pattern='structured', nor in a set list)."
        )
    if key not in UNCERTAINTY_SETS:
        raise ValueError(
            f"unknown uncertainty set {name!r}: use one of {', '.join(CLOSED_FORM_SETS)} (the authors' closed "
            f"forms; 'ellipsoid' or 'eigh' for 'e') or {', '.join(MINMAX_SETS)} (this project's min-max extension)."
        )
    return key


def make_uncertainty(name: str, radius: float | None = None, coupled: bool | None = None) -> UncertaintySet:
    """Build a set from its public name, checking the radius's range.

    Args:
        name: one of :data:`UNCERTAINTY_SETS` (or an alias of ``"e"``).
        radius: ``gamma`` for the authors' sets, ``rho`` / ``alpha`` for the extension; ``None``
            takes the default.
        coupled: only for ``minmax-trace`` / ``minmax-e`` (``None`` = coupled); the authors' sets
            are per-row closed forms and refuse ``coupled=True``.
    """
    key = canonical_set_name(name)
    if radius is not None:
        if isinstance(radius, bool) or not isinstance(radius, (int, float)) or not math.isfinite(radius):
            raise ValueError(f"radius must be a finite number or None, got {radius!r}.")
        radius = float(radius)
    if coupled is not None and not isinstance(coupled, bool):
        raise ValueError(f"coupled must be True, False or None, got {coupled!r}.")
    if key in CLOSED_FORM_SETS:
        if coupled:
            raise ValueError(
                f"the authors' {key!r} set is a per-row closed form (one solve); coupled=True applies only to the "
                "extension's 'minmax-trace' and 'minmax-e'. Leave coupled unset."
            )
        if radius is not None and radius < 0:
            raise ValueError(f"{key} radius gamma must be >= 0, got {radius}.")
        return ClosedFormSet(key, radius)
    coupled = True if coupled is None else coupled
    if key == "minmax-trace":
        if radius is not None and radius < 0:
            raise ValueError(f"minmax-trace radius rho must be >= 0 (a fraction of tr(H)), got {radius}.")
        return MinMaxTrace(radius, coupled)
    if key == "minmax-e":
        if radius is not None and radius < 0:
            raise ValueError(f"minmax-e radius rho must be >= 0 (relative to ||H~||_F), got {radius}.")
        return MinMaxEllipsoid(radius, coupled)
    if radius is not None and not (0.0 < radius <= 1.0):
        raise ValueError(f"cvar radius alpha must be in (0, 1] (the tail fraction of samples), got {radius}.")
    if not coupled:
        raise ValueError(
            "per-row cvar (coupled=False) is not available: it needs one Gram per output row. "
            "Leave coupled unset for cvar."
        )
    return CVaR(radius)


def parse_set_spec(spec: str, allow_auto: bool = False) -> tuple[str, float | str | None]:
    """``"trace"`` -> ``("trace", None)``; ``"trace=0.003"`` -> ``("trace", 0.003)`` (recipes, CLIs).

    With ``allow_auto``: ``"auto"`` -> ``("auto", None)`` and ``"trace=auto"`` -> ``("trace", "auto")``
    (chosen per layer by :mod:`robop_lightning.engine.selection`).

    Example:
        >>> parse_set_spec("Ellipsoid=1"), parse_set_spec("cvar"), parse_set_spec("e=auto", allow_auto=True)
        (('e', 1.0), ('cvar', None), ('e', 'auto'))
    """
    name, sep, value = str(spec).partition("=")
    if allow_auto and name.strip().lower() == "auto" and not sep:
        return "auto", None
    radius: float | str | None = None
    if sep and allow_auto and value.strip().lower() == "auto":
        radius = "auto"
    elif sep:
        try:
            radius = float(value)
        except ValueError:
            raise ValueError(f"bad uncertainty set {spec!r}: write NAME or NAME=RADIUS, e.g. trace=0.003.") from None
    name = canonical_set_name(name)
    if radius == "auto":
        if name not in CLOSED_FORM_SETS:
            raise ValueError(f"{spec!r}: radius 'auto' chooses the gamma of the authors' sets ({', '.join(CLOSED_FORM_SETS)}).")
        return name, radius
    make_uncertainty(name, radius)  # range checks now, not after an hour of pruning
    return name, radius
