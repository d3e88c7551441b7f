"""The registry of static merge methods.

A method merges, for one slice of one tensor, the stacked task-vector slices `deltas` (T, n)
with per-task weights (T,) into one merged delta (n,). Methods that trim by magnitude declare
it, and receive each task's threshold on |tau| computed over the whole tensor (so results do
not depend on how the tensor is sliced). To add a method: write one file in this folder that
calls `register(...)`, import it in `methods/__init__.py`, and add its test.

Other installed packages can add methods through the entry-point group `taskvec.merge_methods`:
each entry point, named like the method, points to a `MergeMethod` (or a function returning one),
e.g. in the plugin's pyproject.toml `[project.entry-points."taskvec.merge_methods"]`
`my_merge = "my_pkg.merge:METHOD"`. They are loaded when a method name is not built in, or when
all methods are listed.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from importlib.metadata import entry_points

import torch
from pydantic import BaseModel, ConfigDict, ValidationError

from taskvec.errors import ConfigError, UnknownMethodError, format_validation_error


class MethodParams(BaseModel):
    """Base of every method's parameters: unknown keys and non-finite numbers are errors."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


@dataclass(frozen=True)
class SliceContext:
    """What a method may know about the slice it merges."""

    key: str
    start: int
    stop: int
    numel: int  # of the whole tensor
    thresholds: torch.Tensor | None  # (T, 2): per task, the k-th largest |tau_t| over the whole tensor and the
    # flat index of the last entry equal to it that is kept (ties broken by position), if asked for


MergeFn = Callable[[torch.Tensor, torch.Tensor, MethodParams, SliceContext], torch.Tensor]


@dataclass(frozen=True)
class MergeMethod:
    name: str
    summary: str
    params: type[MethodParams]
    merge: MergeFn
    magnitude_density: Callable[[MethodParams], float] | None = None  # set when the method trims by magnitude


_REGISTRY: dict[str, MergeMethod] = {}
_SOURCES: dict[str, str] = {}  # method name -> the package it came from, for methods of other packages
ENTRY_POINT_GROUP = "taskvec.merge_methods"


def register(method: MergeMethod) -> MergeMethod:
    if method.name in _REGISTRY:
        raise ValueError(f"merge method {method.name!r} is registered twice")
    _REGISTRY[method.name] = method
    return method


def get_method(name: str) -> MergeMethod:
    if name not in _REGISTRY:
        _load_entry_points(name)
    try:
        return _REGISTRY[name]
    except KeyError:
        raise UnknownMethodError(f"unknown merge method {name!r}; known: {', '.join(sorted(_REGISTRY))}") from None


def list_methods() -> list[MergeMethod]:
    """Every merge method: the built-in ones and those of installed packages."""
    _load_entry_points()
    return [_REGISTRY[k] for k in sorted(_REGISTRY)]


def method_source(name: str) -> str:
    """The package a registered method comes from ('taskvec' for the built-in ones)."""
    return _SOURCES.get(name, "taskvec")


def _load_entry_points(only: str | None = None) -> None:
    """Register the methods other packages declare in the `taskvec.merge_methods` entry-point group."""
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        if only is not None and ep.name != only:
            continue
        package = ep.dist.name if ep.dist is not None else ep.module
        if _SOURCES.get(ep.name) == package:
            continue  # loaded already
        where = f"merge method {ep.name!r} of package {package!r} (entry point {ep.value!r})"
        try:
            obj = ep.load()
            method = obj if isinstance(obj, MergeMethod) else obj() if callable(obj) else obj
        except Exception as e:
            raise ConfigError(f"{where}: cannot be loaded ({type(e).__name__}: {e})") from None
        if not isinstance(method, MergeMethod):
            raise ConfigError(
                f"{where}: expected a MergeMethod or a function returning one, got {type(method).__name__}"
            )
        if method.name != ep.name:
            raise ConfigError(f"{where}: the method it points to is named {method.name!r}")
        if ep.name in _REGISTRY and _REGISTRY[ep.name] is not method:
            raise ConfigError(f"{where}: the name is taken by package {method_source(ep.name)!r}")
        _REGISTRY[ep.name] = method  # its module may have registered it on import already
        _SOURCES[ep.name] = package


def parse_params(method: MergeMethod, params: dict[str, object]) -> MethodParams:
    """Validate `params` for `method`; the error names the method and the bad option."""
    try:
        return method.params(**params)
    except ValidationError as e:
        raise ConfigError(f"method {method.name!r}: invalid parameter ({format_validation_error(e)})") from None


def weighted_sum(deltas: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """sum_t w_t * delta_t over the first dimension."""
    return torch.einsum("t,tn->n", weights.to(deltas.dtype), deltas) if deltas.shape[0] else deltas.sum(0)
