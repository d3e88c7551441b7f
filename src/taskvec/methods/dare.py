"""DARE (Yu et al., 2024): drop each entry of each task vector with probability 1 - density and
rescale the survivors by 1 / density, then sum (`dare`) or TIES-merge (`dare_ties`).

Masks are drawn from a generator seeded by (seed, tensor name, slice start), so a merge is
reproducible and independent of the order tensors are processed in.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field

from taskvec.methods.registry import MergeMethod, MethodParams, SliceContext, register, weighted_sum
from taskvec.methods.ties import elect_and_merge


class DareParams(MethodParams):
    density: float = Field(0.5, gt=0.0, le=1.0, description="probability of keeping an entry")
    seed: int = Field(0, description="seed of the random drop masks")


class DareTiesParams(DareParams):
    majority: Literal["total", "frequency"] = "total"


def drop_and_rescale(deltas: torch.Tensor, density: float, generator: torch.Generator | None) -> torch.Tensor:
    """Each task's slice drawn in turn from one generator (the order PEFT's `dare_linear` uses)."""
    if density >= 1:
        return deltas
    out = []
    for d in deltas:
        mask = torch.bernoulli(torch.full_like(d, density), generator=generator)
        out.append(d * mask / density)
    return torch.stack(out)


def merge(deltas: torch.Tensor, weights: torch.Tensor, params: MethodParams, ctx: SliceContext) -> torch.Tensor:
    assert isinstance(params, DareParams)
    return weighted_sum(drop_and_rescale(deltas, params.density, ctx.generator), weights)


def merge_ties(deltas: torch.Tensor, weights: torch.Tensor, params: MethodParams, ctx: SliceContext) -> torch.Tensor:
    assert isinstance(params, DareTiesParams)
    return elect_and_merge(drop_and_rescale(deltas, params.density, ctx.generator), weights, params.majority)


METHOD = register(
    MergeMethod("dare", "drop and rescale, then sum", DareParams, merge, seeded=lambda p: p.seed)  # type: ignore[attr-defined]
)
METHOD_TIES = register(
    MergeMethod("dare_ties", "drop and rescale, then TIES sign election", DareTiesParams, merge_ties, seeded=lambda p: p.seed)  # type: ignore[attr-defined]
)
