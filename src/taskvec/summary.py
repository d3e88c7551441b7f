"""Streamed statistics of a checkpoint or task vector, for `taskvec info`."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import torch

from taskvec.core.stream import chunks
from taskvec.io import CheckpointLike, open_checkpoint


@dataclass
class TensorStats:
    key: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    numel: int
    zeros: int
    norm: float
    max_abs: float


@dataclass
class Summary:
    n_tensors: int = 0
    numel: int = 0
    nbytes: int = 0
    zeros: int = 0
    norm: float = 0.0
    max_abs: float = 0.0
    dtypes: dict[str, int] = field(default_factory=dict)
    tensors: list[TensorStats] = field(default_factory=list)


def summarize(path: CheckpointLike) -> Summary:
    """Per-tensor and total size, exact-zero count, L2 norm and max |x|, one slice at a time."""
    src = open_checkpoint(path)
    out = Summary()
    dtypes: Counter[str] = Counter()
    sq = 0.0
    for key in src.keys():
        spec = src.spec(key)
        zeros, tsq, tmax = 0, 0.0, 0.0
        for s, e in chunks(spec.numel):
            x = src.read_flat(key, s, e)
            zeros += int((x == 0).sum())
            if x.numel():
                xd = x.to(torch.float64)
                tsq += float(torch.dot(xd, xd))
                tmax = max(tmax, float(xd.abs().max()))
        out.tensors.append(TensorStats(key, spec.shape, spec.dtype, spec.numel, zeros, tsq**0.5, tmax))
        out.n_tensors += 1
        out.numel += spec.numel
        out.nbytes += spec.nbytes
        out.zeros += zeros
        sq += tsq
        out.max_abs = max(out.max_abs, tmax)
        dtypes[str(spec.dtype).replace("torch.", "")] += spec.numel
    out.norm = sq**0.5
    out.dtypes = dict(dtypes)
    return out
