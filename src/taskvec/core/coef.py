"""Coefficients: one number for all tensors, or a per-layer map from glob patterns to numbers."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping
from fnmatch import fnmatchcase

from taskvec.errors import ConfigError

Coef = float | int | Mapping[str, float] | Callable[[str], float]


def _finite(x: object, key: str) -> float:
    v = float(x)  # type: ignore[arg-type]
    if not math.isfinite(v):
        raise ConfigError(f"coefficient {v} of tensor {key!r} is not a finite number")
    return v


def resolve(coef: Coef, key: str) -> float:
    """The coefficient of tensor `key`: a map's first matching glob wins; no match, or a NaN or
    infinite coefficient, is an error."""
    if isinstance(coef, (int, float)):
        return _finite(coef, key)
    if isinstance(coef, Mapping):
        for pattern, value in coef.items():
            if fnmatchcase(key, pattern):
                return _finite(value, key)
        raise ConfigError(f"coefficient map has no pattern matching tensor {key!r} (add a '*' entry as default)")
    if callable(coef):
        return _finite(coef(key), key)
    raise ConfigError(f"coefficient must be a number, a {{glob: number}} map or a callable, got {type(coef).__name__}")


def check_coef_map(coef: Coef, keys: Iterable[str], where: str = "coefficient map") -> None:
    """Refuse a {glob: number} map with a pattern that can never be used because earlier patterns
    already take every tensor it matches (the first matching pattern wins).

    A pattern is dead when it comes after '*', or when it matches some of the tensor names `keys`
    of the model the map is applied to and each of them is matched by an earlier pattern. Checking
    against the actual names is exact for that model, where deciding whether one glob covers
    another for every possible name is not. A pattern that matches no tensor of this model is
    allowed (one map may serve models with and without, say, a classifier head).
    """
    if not isinstance(coef, Mapping):
        return
    patterns = list(coef)
    names = list(keys)
    for i, p in enumerate(patterns):
        earlier = patterns[:i]
        if "*" in earlier:
            raise ConfigError(f"{where}: pattern {p!r} can never match: the earlier pattern '*' takes every tensor")
        hit = [k for k in names if fnmatchcase(k, p)]
        if not hit:
            continue
        free = [k for k in hit if not any(fnmatchcase(k, q) for q in earlier)]
        if not free:
            cover = [q for q in earlier if any(fnmatchcase(k, q) for k in hit)]
            raise ConfigError(
                f"{where}: pattern {p!r} can never match: every tensor it matches is taken first by "
                + ", ".join(repr(q) for q in cover)
            )


def check_patterns(keys: Iterable[str], include: list[str] | None, exclude: list[str] | None, where: str) -> None:
    """Refuse include/exclude globs that match none of `keys` (a typo would silently select nothing)."""
    names = list(keys)
    for opt, pats in (("include", include), ("exclude", exclude)):
        for p in pats or []:
            if not any(fnmatchcase(k, p) for k in names):
                raise ConfigError(f"{opt} pattern {p!r} matches no tensor of {where}")


def matches(key: str, include: list[str] | None, exclude: list[str] | None) -> bool:
    """True when `key` matches some include glob (or there are none) and no exclude glob."""
    if include and not any(fnmatchcase(key, p) for p in include):
        return False
    return not (exclude and any(fnmatchcase(key, p) for p in exclude))
