"""`compose`: merge task vectors with a registered method into one lazy task vector."""

from __future__ import annotations

import threading
from collections.abc import Sequence

import torch

from taskvec.core.coef import Coef, check_coef_map, resolve
from taskvec.core.taskvector import TaskVector, _compute_dtype, check_same_tensors
from taskvec.io import TensorSpec
from taskvec.methods.registry import MergeMethod, MethodParams, SliceContext, get_method, magnitude_threshold, parse_params


def _nan_as_zero(x: torch.Tensor) -> torch.Tensor:
    """NaN (only in task vectors read with allow_nonfinite) ranks as 0 when thresholds are found:
    it is never among the kept entries' order statistics, and the threshold search stays defined."""
    return torch.where(torch.isnan(x), 0.0, x) if bool(torch.isnan(x).any()) else x


class ComposedSource:
    """The merged delta, computed slice by slice from the task vectors' slices."""

    def __init__(self, tvs: Sequence[TaskVector], method: MergeMethod, params: MethodParams, weights: Sequence[Coef]):
        if not tvs:
            raise ValueError("compose needs at least one task vector")
        for tv in tvs[1:]:
            check_same_tensors(tvs[0].source, tv.source)
        self.tvs, self.method, self.params, self.weights = list(tvs), method, params, list(weights)
        for w, tv in zip(self.weights, self.tvs):
            check_coef_map(w, tvs[0].keys(), f"weight map of {tv.name}")
        self.name = f"{method.name}({', '.join(tv.name for tv in tvs)})" if len(tvs) < 4 else f"{method.name} of {len(tvs)}"
        self._thresholds: dict[str, torch.Tensor] = {}
        self._lock = threading.Lock()

    def keys(self) -> list[str]:
        return self.tvs[0].keys()

    def spec(self, key: str) -> TensorSpec:
        specs = [tv.spec(key) for tv in self.tvs]
        return TensorSpec(specs[0].shape, _compute_dtype(*(s.dtype for s in specs)))

    def thresholds(self, key: str) -> torch.Tensor:
        """Per-task (threshold, cut) of the whole tensor (see `magnitude_threshold`); one task's tensor in memory at a time."""
        with self._lock:  # one computation per tensor even when its slices are merged in parallel
            return self._thresholds_locked(key)

    def _thresholds_locked(self, key: str) -> torch.Tensor:
        if key not in self._thresholds:
            assert self.method.magnitude_density is not None
            density = self.method.magnitude_density(self.params)
            vals = [magnitude_threshold(_nan_as_zero(tv.source.read_flat(key)), density) for tv in self.tvs]
            if len(self._thresholds) >= 8:  # a few tensors' worth: slices of neighbouring tensors run in parallel
                self._thresholds.pop(next(iter(self._thresholds)))
            self._thresholds[key] = torch.tensor(vals, dtype=torch.float64)
        return self._thresholds[key]

    def read_flat(self, key: str, start: int = 0, stop: int | None = None) -> torch.Tensor:
        spec = self.spec(key)
        stop = spec.numel if stop is None else stop
        deltas = torch.stack([tv.source.read_flat(key, start, stop).to(spec.dtype) for tv in self.tvs])
        weights = torch.tensor([resolve(w, key) for w in self.weights], dtype=spec.dtype)
        ctx = SliceContext(
            key=key, start=start, stop=stop, numel=spec.numel,
            thresholds=self.thresholds(key) if self.method.magnitude_density is not None else None,
        )
        return self.method.merge(deltas, weights, self.params, ctx)


def compose(
    task_vectors: Sequence[TaskVector],
    method: str = "task_arithmetic",
    weights: Coef | Sequence[Coef] | None = None,
    **params: object,
) -> TaskVector:
    """Merge `task_vectors` with a registered method into one lazy task vector.

    `weights`: one coefficient for all, or one per task vector (a number or a {glob: number} map).
    `params`: the method's options, e.g. `density=0.2` for TIES; unknown options are errors.
    Apply the result with `merged.apply_to(base, coef=lam)`.
    """
    m = get_method(method)
    p = parse_params(m, dict(params))
    if weights is None:
        ws: list[Coef] = [1.0] * len(task_vectors)
    elif isinstance(weights, Sequence) and not isinstance(weights, str):
        ws = list(weights)
    else:
        ws = [weights] * len(task_vectors)  # type: ignore[list-item]
    if len(ws) != len(task_vectors):
        raise ValueError(f"{len(task_vectors)} task vectors but {len(ws)} weights")
    return TaskVector(ComposedSource(task_vectors, m, p, ws))
