"""Magnitude pruning: keep each task vector's top-`density` entries by |value|, then sum."""

from __future__ import annotations

import torch
from pydantic import Field

from taskvec.methods.registry import MergeMethod, MethodParams, SliceContext, register, weighted_sum
from taskvec.methods.selection import trim_by_threshold


class MagnitudeParams(MethodParams):
    density: float = Field(0.2, gt=0.0, le=1.0, description="fraction of entries kept per task vector and tensor")


def merge(deltas: torch.Tensor, weights: torch.Tensor, params: MethodParams, ctx: SliceContext) -> torch.Tensor:
    assert ctx.thresholds is not None
    return weighted_sum(trim_by_threshold(deltas, ctx.thresholds, ctx.start), weights)


METHOD = register(
    MergeMethod(
        "magnitude",
        "keep the largest entries of each task vector, then sum",
        MagnitudeParams,
        merge,
        magnitude_density=lambda p: p.density,  # type: ignore[attr-defined]
    )
)
