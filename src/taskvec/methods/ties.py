"""TIES-Merging (Yadav et al., 2023): trim each task vector to its top-k entries, elect a sign per
entry, and average only the entries that agree with it (disjoint mean)."""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field

from taskvec.methods.registry import MergeMethod, MethodParams, SliceContext, register
from taskvec.methods.selection import trim_by_threshold


class TiesParams(MethodParams):
    density: float = Field(0.2, gt=0.0, le=1.0, description="fraction of entries kept per task vector and tensor")
    majority: Literal["total", "frequency"] = Field("total", description="elect the sign by summed mass or by count")


def elect_and_merge(trimmed: torch.Tensor, weights: torch.Tensor, majority: str) -> torch.Tensor:
    """Sign election on the trimmed (unweighted) deltas, then the weighted disjoint mean.

    Written with float arithmetic only (masks as 0/1 factors), which is several times faster
    than boolean masks on CPU and gives the same values."""
    sign = trimmed.sign()
    ones = torch.ones(trimmed.shape[0], dtype=trimmed.dtype, device=trimmed.device)
    # sums of small integers are exact in any order: a matrix-vector product, faster than sum(0)
    mass = trimmed.sum(0) if majority == "total" else ones @ sign
    elected = (mass >= 0).to(trimmed.dtype).mul_(2).sub_(1)  # +1 where mass >= 0, else -1
    agree = torch.eq(sign, elected, out=sign)  # 1 where the entry has the elected sign, else 0
    count = (ones @ agree).clamp_(min=1)
    w = weights.to(trimmed.dtype)
    weighted = trimmed if bool((w == 1).all()) else trimmed * w[:, None]
    total = torch.mul(weighted, agree, out=agree).sum(0)  # agree is not needed any more: no new buffer
    return total.div_(count)


def merge(deltas: torch.Tensor, weights: torch.Tensor, params: MethodParams, ctx: SliceContext) -> torch.Tensor:
    assert ctx.thresholds is not None and isinstance(params, TiesParams)
    return elect_and_merge(trim_by_threshold(deltas, ctx.thresholds, ctx.start), weights, params.majority)


METHOD = register(
    MergeMethod(
        "ties",
        "trim, elect sign, disjoint mean",
        TiesParams,
        merge,
        magnitude_density=lambda p: p.density,  # type: ignore[attr-defined]
    )
)
