"""The registry of static merge methods.

A method merges, for one slice of one tensor, the stacked task-vector slices `deltas` (T, n)
with per-task weights (T,) into one merged delta (n,). Methods that trim by magnitude declare
it, and receive each task's threshold on |tau| computed over the whole tensor (so results do
not depend on how the tensor is sliced). To add a method: write one file in this folder that
calls `register(MergeMethod(...))`, and add its test; the modules of this folder are found
without a list of imports.

Other installed packages add methods through the entry-point group `taskvec.merge_methods`: each
entry point, named like the method, points to a `MergeMethod` (or a function returning one), e.g.
in the plugin's pyproject.toml `[project.entry-points."taskvec.merge_methods"]`
`my_merge = "my_pkg.merge:METHOD"`. See docs/extending.md.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import cast

import torch
from pydantic import BaseModel, ConfigDict, ValidationError

from taskvec.errors import ConfigError, UnknownMethodError, format_validation_error
from taskvec.registry import Kind, Registry


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


@dataclass(frozen=True, init=False)
class MergeMethod(Kind[MergeFn]):
    """A merge method: its name, a one-line summary, its parameters' model and its merge function
    (the registry's `config` and `build`); `magnitude_density` is set when it trims by magnitude."""

    magnitude_density: Callable[[MethodParams], float] | None = None

    def __init__(
        self,
        name: str,
        summary: str,
        params: type[MethodParams],
        merge: MergeFn,
        magnitude_density: Callable[[MethodParams], float] | None = None,
    ) -> None:
        super().__init__(name, params, merge, summary)
        object.__setattr__(self, "magnitude_density", magnitude_density)

    @property
    def summary(self) -> str:
        return self.doc

    @property
    def params(self) -> type[MethodParams]:
        return cast(type[MethodParams], self.config)

    @property
    def merge(self) -> MergeFn:
        return self.build


ENTRY_POINT_GROUP = "taskvec.merge_methods"
METHODS: Registry[MergeFn] = Registry(
    "merge method", key="method", group=ENTRY_POINT_GROUP, package=__name__.rpartition(".")[0]
)
"""Every merge method by name: the modules of this folder and the entry points of other packages."""


def register(method: MergeMethod) -> MergeMethod:
    """Add `method` to `METHODS` (call it at the top level of the method's module)."""
    return METHODS.add(method)


def get_method(name: str) -> MergeMethod:
    if name not in METHODS:
        raise UnknownMethodError(f"unknown merge method {name!r}; known: {', '.join(sorted(METHODS.known()))}")
    method = METHODS.get(name)
    if not isinstance(method, MergeMethod):
        raise ConfigError(f"merge method {name!r} of package {METHODS.source(name)!r} is not a MergeMethod")
    return method


def list_methods() -> list[MergeMethod]:
    """Every merge method: the built-in ones and those of installed packages."""
    return [get_method(k) for k in sorted(METHODS.names())]


def method_source(name: str) -> str:
    """The package a registered method comes from ('taskvec' for the built-in ones)."""
    return METHODS.source(name)


def parse_params(method: MergeMethod, params: dict[str, object]) -> MethodParams:
    """Validate `params` for `method`; the error names the method and the bad option."""
    try:
        return method.params(**params)
    except ValidationError as e:
        raise ConfigError(f"method {method.name!r}: invalid parameter ({format_validation_error(e)})") from None


def weighted_sum(deltas: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """sum_t w_t * delta_t over the first dimension."""
    return torch.einsum("t,tn->n", weights.to(deltas.dtype), deltas) if deltas.shape[0] else deltas.sum(0)
