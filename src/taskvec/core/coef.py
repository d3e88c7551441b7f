"""Coefficients: one number for all tensors, or a per-layer map from glob patterns to numbers."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from fnmatch import fnmatchcase

from taskvec.errors import ConfigError

Coef = float | int | Mapping[str, float] | Callable[[str], float]


def resolve(coef: Coef, key: str) -> float:
    """The coefficient of tensor `key`: a map's first matching glob wins; no match is an error."""
    if isinstance(coef, (int, float)):
        return float(coef)
    if isinstance(coef, Mapping):
        for pattern, value in coef.items():
            if fnmatchcase(key, pattern):
                return float(value)
        raise ConfigError(f"coefficient map has no pattern matching tensor {key!r} (add a '*' entry as default)")
    if callable(coef):
        return float(coef(key))
    raise ConfigError(f"coefficient must be a number, a {{glob: number}} map or a callable, got {type(coef).__name__}")


def matches(key: str, include: list[str] | None, exclude: list[str] | None) -> bool:
    """True when `key` matches some include glob (or there are none) and no exclude glob."""
    if include and not any(fnmatchcase(key, p) for p in include):
        return False
    return not (exclude and any(fnmatchcase(key, p) for p in exclude))
