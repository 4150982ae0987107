"""Options as dataclasses: a dict with the same keys works wherever one is expected, checked.

Example:
    >>> from dataclasses import dataclass
    >>> @dataclass(frozen=True)
    ... class Opts:
    ...     size: int = 1
    >>> coerce_options(Opts, {"size": 3}, "opts"), coerce_options(Opts, None, "opts")
    (Opts(size=3), Opts(size=1))
    >>> coerce_options(Opts, {"sise": 3}, "opts")
    Traceback (most recent call last):
    ...
    ValueError: unknown opts 'sise': valid keys are size.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any, TypeVar

__all__ = ["coerce_options"]

T = TypeVar("T")


def coerce_options(cls: type[T], value: T | Mapping[str, Any] | None, what: str) -> T:
    """``None`` -> ``cls()``; an instance -> itself; a dict -> ``cls(**value)``, unknown keys refused
    with the valid ones (``what`` names the options in the messages)."""
    if value is None:
        return cls()
    if isinstance(value, cls):
        return value
    if not isinstance(value, Mapping):
        raise ValueError(f"{what} must be a {cls.__name__} or a dict, got {type(value).__name__}.")
    valid = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(value) - set(valid))
    if unknown:
        raise ValueError(f"unknown {what} {', '.join(map(repr, unknown))}: valid keys are {', '.join(valid)}.")
    return cls(**value)
