"""Typed solver options: one frozen dataclass per solver, its fields the solver's own keyword options.

The fields and defaults are read from each solver's signature (keyword-only arguments the engine
does not pass itself), so they cannot drift from the code. A dict of options is checked by
building the dataclass: a misspelt key is refused with the list of valid ones, never ignored.

Example:
    >>> SparseGPTOptions(block_size=64)
    SparseGPTOptions(block_size=64)
    >>> solver_options("cap", {"block_size": 128}).block_size
    128
"""

from __future__ import annotations

import dataclasses
import inspect
import warnings
from collections.abc import Callable, Mapping
from typing import Any

from robop_lightning.engine.solvers.alps import alps
from robop_lightning.engine.solvers.cap import cap
from robop_lightning.engine.solvers.magnitude import magnitude
from robop_lightning.engine.solvers.sparsegpt import sparsegpt
from robop_lightning.engine.solvers.wanda import wanda

__all__ = ["AlpsOptions", "CapOptions", "MagnitudeOptions", "SparseGPTOptions", "WandaOptions", "OPTION_TYPES",
           "ENGINE_ARGS", "solver_options"]

# What the engine passes itself; everything else keyword-only in a solver's signature is a user option.
ENGINE_ARGS = frozenset({"warm", "prior", "h_diag", "history", "factor"})
# Old spellings still accepted, with a warning.
RENAMED = {"sparsegpt": {"blocksize": "block_size"}}


def _options_type(class_name: str, solver: str, fn: Callable[..., Any]) -> type:
    fields = [
        (p.name, p.annotation, dataclasses.field(default=p.default))
        for p in inspect.signature(fn).parameters.values()
        if p.kind == p.KEYWORD_ONLY and p.name not in ENGINE_ARGS
    ]
    cls = dataclasses.make_dataclass(class_name, fields, frozen=True, kw_only=True)
    cls.__module__ = __name__
    cls.__doc__ = (f"Options of the ``{solver}`` solver (:func:`robop_lightning.engine.solvers.{solver}`), with its defaults: "
                   + (", ".join(f"``{n}``" for n, _, _ in fields) or "none") + ".")
    return cls


AlpsOptions = _options_type("AlpsOptions", "alps", alps)
CapOptions = _options_type("CapOptions", "cap", cap)
SparseGPTOptions = _options_type("SparseGPTOptions", "sparsegpt", sparsegpt)
WandaOptions = _options_type("WandaOptions", "wanda", wanda)
MagnitudeOptions = _options_type("MagnitudeOptions", "magnitude", magnitude)
OPTION_TYPES: dict[str, type] = {"alps": AlpsOptions, "cap": CapOptions, "sparsegpt": SparseGPTOptions,
                                 "wanda": WandaOptions, "magnitude": MagnitudeOptions}


def solver_options(solver: str, options: Mapping[str, Any] | Any | None, name: str = "layer") -> Any:
    """``options`` (a dict, the solver's dataclass, or ``None``) as the solver's dataclass.

    Raises:
        ValueError: an unknown solver, a key the solver does not have (naming the valid ones), or a
            dataclass of another solver.
    """
    cls = OPTION_TYPES.get(solver)
    if cls is None:
        raise ValueError(f"{name}: unknown solver {solver!r}: use one of {', '.join(OPTION_TYPES)}.")
    if options is None:
        return cls()
    if dataclasses.is_dataclass(options) and not isinstance(options, type):
        if not isinstance(options, cls):
            raise ValueError(f"{name}: {type(options).__name__} are not options of {solver!r}; pass {cls.__name__}.")
        return options
    if not isinstance(options, Mapping):
        raise ValueError(f"{name}: solver_options must be a dict or {cls.__name__}, got {type(options).__name__}.")
    options = dict(options)
    for old, new in RENAMED.get(solver, {}).items():
        if old in options and new not in options:
            warnings.warn(f"{name}: {solver} option {old!r} is now called {new!r}.", DeprecationWarning, stacklevel=3)
            options[new] = options.pop(old)
    valid = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(options) - set(valid))
    if unknown:
        raise ValueError(f"{name}: unknown solver option(s) {', '.join(map(repr, unknown))} for {solver!r}; "
                         f"its options are: {', '.join(valid) or 'none'}.")
    return cls(**options)
