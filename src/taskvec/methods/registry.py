"""The registry of static merge methods.

A method merges, for one slice of one tensor, the stacked task-vector slices `deltas` (T, n)
with per-task weights (T,) into one merged delta (n,). Methods that trim by magnitude declare
it, and receive each task's threshold on |tau| computed over the whole tensor (so results do
not depend on how the tensor is sliced). To add a method: write one file in this folder that
calls `register(...)`, import it in `methods/__init__.py`, and add its test.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, ValidationError

from taskvec.errors import ConfigError, UnknownMethodError


class MethodParams(BaseModel):
    """Base of every method's parameters: unknown keys are errors."""

    model_config = ConfigDict(extra="forbid", frozen=True)


@dataclass(frozen=True)
class SliceContext:
    """What a method may know about the slice it merges."""

    key: str
    start: int
    stop: int
    thresholds: torch.Tensor | None  # (T,) k-th largest |tau_t| over the whole tensor, if asked for
    generator: torch.Generator | None  # seeded from (seed, key, start), if the method is random


MergeFn = Callable[[torch.Tensor, torch.Tensor, MethodParams, SliceContext], torch.Tensor]


@dataclass(frozen=True)
class MergeMethod:
    name: str
    summary: str
    params: type[MethodParams]
    merge: MergeFn
    magnitude_density: Callable[[MethodParams], float] | None = None  # set when the method trims by magnitude
    seeded: Callable[[MethodParams], int] | None = None  # set when the method draws random masks


_REGISTRY: dict[str, MergeMethod] = {}


def register(method: MergeMethod) -> MergeMethod:
    if method.name in _REGISTRY:
        raise ValueError(f"merge method {method.name!r} is registered twice")
    _REGISTRY[method.name] = method
    return method


def get_method(name: str) -> MergeMethod:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise UnknownMethodError(f"unknown merge method {name!r}; known: {', '.join(sorted(_REGISTRY))}") from None


def list_methods() -> list[MergeMethod]:
    return [_REGISTRY[k] for k in sorted(_REGISTRY)]


def parse_params(method: MergeMethod, params: dict[str, object]) -> MethodParams:
    """Validate `params` for `method`; the error names the method and the bad option."""
    try:
        return method.params(**params)
    except ValidationError as e:
        msgs = "; ".join(f"{'.'.join(str(p) for p in err['loc'])}: {err['msg']}" for err in e.errors())
        raise ConfigError(f"method {method.name!r}: invalid parameter ({msgs})") from None


def weighted_sum(deltas: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """sum_t w_t * delta_t over the first dimension."""
    return torch.einsum("t,tn->n", weights.to(deltas.dtype), deltas) if deltas.shape[0] else deltas.sum(0)


def trim_by_threshold(deltas: torch.Tensor, thresholds: torch.Tensor) -> torch.Tensor:
    """Zero every entry of task t with |delta| below its threshold (keeps the top-k by magnitude)."""
    return deltas * (deltas.abs() >= thresholds.to(deltas.dtype)[:, None])


def magnitude_threshold(x: torch.Tensor, density: float) -> float:
    """The k-th largest |x| with k = int(density * numel): keeping |x| >= it keeps the top k.

    numpy's introselect (`np.partition`) is several times faster than `torch.kthvalue` here.
    """
    n = x.numel()
    k = int(density * n)
    if density >= 1 or k >= n:
        return 0.0
    if k <= 0:
        return float("inf")
    a = x.detach().reshape(-1).abs().numpy()
    return float(np.partition(a, n - k)[n - k])
