"""DARE (Yu et al., 2024): drop each entry of each task vector with probability 1 - density and
rescale the survivors by 1 / density, then sum (`dare`) or TIES-merge (`dare_ties`).

Masks are drawn in fixed blocks of `MASK_BLOCK` elements aligned to absolute flat positions,
each block of each task from its own generator seeded by (seed, tensor name, task, block). The
mask of an entry therefore depends only on where it is in its tensor: the in-memory and the
streamed paths, and any slice size, give the same bits, in any order of tensors.
"""

from __future__ import annotations

import hashlib
from functools import lru_cache
from typing import Literal

import torch
from pydantic import Field

from taskvec.methods.registry import MergeMethod, MethodParams, SliceContext, register, weighted_sum
from taskvec.methods.ties import elect_and_merge

MASK_BLOCK = 1 << 16


class DareParams(MethodParams):
    density: float = Field(0.5, gt=0.0, le=1.0, description="probability of keeping an entry")
    seed: int = Field(0, description="seed of the random drop masks")


class DareTiesParams(DareParams):
    majority: Literal["total", "frequency"] = "total"


def block_seed(seed: int, key: str, task: int, block: int) -> int:
    """A stable 63-bit seed for the mask of one block of one task's tensor `key`."""
    h = hashlib.blake2b(f"{seed}|{key}|{task}|{block}".encode(), digest_size=8).digest()
    return int.from_bytes(h, "little") & ((1 << 63) - 1)


@lru_cache(maxsize=32)  # slices smaller than a block reuse its mask; never modified in place
def block_mask(seed: int, key: str, task: int, block: int, numel: int, density: float) -> torch.Tensor:
    """The keep-mask (float32 0/1) of block `block` of a tensor of `numel` elements: Bernoulli(density)
    draws from the block's own generator, as PEFT's `random_pruning` draws them."""
    n = min(MASK_BLOCK, numel - block * MASK_BLOCK)
    g = torch.Generator().manual_seed(block_seed(seed, key, task, block))
    return torch.bernoulli(torch.full((n,), density, dtype=torch.float32), generator=g)


def slice_mask(seed: int, key: str, task: int, start: int, stop: int, numel: int, density: float) -> torch.Tensor:
    """The keep-mask of flat positions [start, stop) of one task's tensor, cut from its blocks."""
    if stop <= start:
        return torch.empty(0, dtype=torch.float32)
    first, last = start // MASK_BLOCK, (stop - 1) // MASK_BLOCK
    parts = [block_mask(seed, key, task, b, numel, density) for b in range(first, last + 1)]
    mask = parts[0] if len(parts) == 1 else torch.cat(parts)
    off = first * MASK_BLOCK
    return mask[start - off : stop - off]


def drop_and_rescale(deltas: torch.Tensor, density: float, seed: int, ctx: SliceContext) -> torch.Tensor:
    """Each task's slice times its mask, divided by `density`."""
    if density >= 1:
        return deltas
    out = []
    for t, d in enumerate(deltas):
        mask = slice_mask(seed, ctx.key, t, ctx.start, ctx.stop, ctx.numel, density).to(device=d.device, dtype=d.dtype)
        out.append(d * mask / density)
    return torch.stack(out)


def merge(deltas: torch.Tensor, weights: torch.Tensor, params: MethodParams, ctx: SliceContext) -> torch.Tensor:
    assert isinstance(params, DareParams)
    return weighted_sum(drop_and_rescale(deltas, params.density, params.seed, ctx), weights)


def merge_ties(deltas: torch.Tensor, weights: torch.Tensor, params: MethodParams, ctx: SliceContext) -> torch.Tensor:
    assert isinstance(params, DareTiesParams)
    return elect_and_merge(drop_and_rescale(deltas, params.density, params.seed, ctx), weights, params.majority)


METHOD = register(MergeMethod("dare", "drop and rescale, then sum", DareParams, merge))
METHOD_TIES = register(
    MergeMethod("dare_ties", "drop and rescale, then TIES sign election", DareTiesParams, merge_ties)
)
