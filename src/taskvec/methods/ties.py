"""TIES-Merging (Yadav et al., 2023): trim each task vector to its top-k entries, elect a sign per
entry, and average only the entries that agree with it (disjoint mean)."""

from __future__ import annotations

import threading
from typing import Literal

import torch
from pydantic import Field

from taskvec.methods import kernels
from taskvec.methods.registry import MergeMethod, MethodParams, SliceContext, register
from taskvec.methods.selection import trim_by_threshold


class TiesParams(MethodParams):
    density: float = Field(0.2, gt=0.0, le=1.0, description="fraction of entries kept per task vector and tensor")
    majority: Literal["total", "frequency"] = Field("total", description="elect the sign by summed mass or by count")


def elect_and_merge(
    trimmed: torch.Tensor, weights: torch.Tensor, majority: str, scratch: torch.Tensor | None = None
) -> torch.Tensor:
    """Sign election on the trimmed (unweighted) deltas, then the weighted disjoint mean.

    Written with float arithmetic only (masks as 0/1 factors), which is several times faster
    than boolean masks on CPU and gives the same values; the (T, n) temporaries are per-thread
    buffers reused from call to call (no large allocation, and they stay in cache), or
    `scratch`, a free buffer of `trimmed`'s shape and dtype that the caller hands over."""
    w = weights.to(trimmed.dtype)
    agree = scratch if scratch is not None else _buffer(trimmed, 0)
    # by count: the sum of the signs (small integers, exact in any order)
    mass = trimmed.sum(0) if majority == "total" else torch.sign(trimmed, out=agree).sum(0)
    unit = all(x == 1 for x in w.tolist())  # a list of T numbers: cheaper than a tensor compare per block
    if trimmed.dim() == 2 and kernels.fits(trimmed, agree, mass) and agree.is_contiguous() and kernels.available():
        # the steps below in one pass (same products and comparisons); torch still does the sum
        count = kernels.elect(trimmed, mass, w, agree)
        return agree.sum(0).div_(count)
    # +1 where mass >= 0, else -1 (a compare into a float tensor: much faster than through a boolean one)
    elected = torch.ge(mass, 0, out=mass).mul_(2).sub_(1)
    # 1 where the entry has the elected sign, else 0 (zeros have neither): one product and one compare
    torch.gt(torch.mul(trimmed, elected, out=agree), 0, out=agree)
    count = agree.sum(0).clamp_(min=1)
    weighted = trimmed if unit else torch.mul(trimmed, w[:, None], out=_buffer(trimmed, 1))
    total = torch.mul(weighted, agree, out=agree).sum(0)  # agree is not needed any more: no new buffer
    return total.div_(count)


SCRATCH_ELEMS = 1 << 19  # largest (T, n) whose temporaries are kept per thread (2 MiB of float32 each)
_local = threading.local()


def _buffer(like: torch.Tensor, i: int) -> torch.Tensor:
    """Buffer `i` (0 or 1) of `like`'s shape and dtype: a per-thread one kept for the next call
    when `like` is a small CPU tensor (the blocks of a streamed merge), else a new one."""
    n = like.numel()
    if like.device.type != "cpu" or n > SCRATCH_ELEMS:
        return torch.empty(like.shape, dtype=like.dtype, device=like.device)
    buf = getattr(_local, "buf", None)
    if buf is None or buf.dtype != like.dtype:
        buf = _local.buf = torch.empty(2 * SCRATCH_ELEMS, dtype=like.dtype)
    return buf[i * SCRATCH_ELEMS : i * SCRATCH_ELEMS + n].view(like.shape)


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
