"""Low-rank task vectors: truncated SVD per tensor and their storage.

`compress` turns any task vector into factors U diag(s) V^T per matrix (a conv kernel is seen as
the (out, in * kh * kw) matrix), one tensor at a time, reporting the reconstruction error of what
is stored. `factors_of` (taskvec.core.factored) finds the factors behind a task vector, and
`factored_gram` computes <tau_i, tau_j> from them without materialising dense tensors.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from taskvec.core.factored import as_matrix, factored_gram, factors_of, is_factored  # noqa: F401  (their former home)
from taskvec.core.stream import byte_progress, write_checkpoint
from taskvec.core.taskvector import TaskVector
from taskvec.errors import ConfigError
from taskvec.io import TensorSpec
from taskvec.io.lowrank import (
    LOWRANK_FORMAT,
    PARTS,
    SHAPES_KEY,
    Factors,
    part_key,
)
from taskvec.io.writer import DEFAULT_SHARD_BYTES

EXACT_SVD_ELEMS = 1 << 22
"""Matrices up to this many elements get an exact SVD; larger ones a randomized one."""
OVERSAMPLE = 8
POWER_ITERS = 4


# --------------------------------------------------------------------------- truncated SVD


def pick_rank(s: torch.Tensor, total_sq: float, energy: float) -> int:
    """Smallest k with sum(s[:k]^2) >= energy * total_sq (s sorted descending); len(s)+1 if none."""
    c = torch.cumsum(s.to(torch.float64) ** 2, 0)
    hit = torch.nonzero(c >= energy * total_sq - 1e-12 * total_sq)
    return int(hit[0, 0]) + 1 if hit.numel() else len(s) + 1


def truncated_svd(
    a: torch.Tensor, rank: int | None = None, energy: float | None = None, exact_elems: int = EXACT_SVD_ELEMS
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(u, s, v) with a ~ u diag(s) v^T, of `rank` (capped at min(m, n)) or of the smallest rank
    whose singular values hold `energy` of ||a||_F^2. Exact SVD for small matrices; randomized
    (torch.svd_lowrank, growing the sketch until the energy is reached) for large ones."""
    if (rank is None) == (energy is None):
        raise ConfigError("give exactly one of rank or energy")
    m, n = a.shape
    full = min(m, n)
    total = float(a.to(torch.float64).pow(2).sum())
    if m * n <= exact_elems or (rank is not None and rank + OVERSAMPLE >= full):
        u, s, vh = torch.linalg.svd(a, full_matrices=False)
        k = min(rank, full) if rank is not None else min(pick_rank(s, total, energy), full)  # type: ignore[arg-type]
        return u[:, :k], s[:k], vh[:k].T
    q = min(full, (rank if rank is not None else 32) + OVERSAMPLE)
    while True:
        u, s, v = torch.svd_lowrank(a, q=q, niter=POWER_ITERS)
        if rank is not None:
            k = min(rank, full)
            return u[:, :k], s[:k], v[:, :k]
        k = pick_rank(s, total, energy)  # type: ignore[arg-type]
        if k <= len(s) - OVERSAMPLE // 2 or q >= full:
            k = min(k, len(s))
            return u[:, :k], s[:k], v[:, :k]
        if 2 * q + OVERSAMPLE >= full:
            return truncated_svd(a, energy=energy, exact_elems=m * n)
        q = 2 * q


# --------------------------------------------------------------------------- compress


@dataclass(frozen=True)
class TensorReport:
    """How one tensor was stored: rank (None: dense), its error ||A - A_stored||_F, ||A||_F, bytes."""

    key: str
    shape: tuple[int, ...]
    rank: int | None
    error: float
    norm: float
    dense_bytes: int
    stored_bytes: int

    @property
    def rel_error(self) -> float:
        return self.error / self.norm if self.norm > 0 else 0.0


@dataclass(frozen=True)
class CompressReport:
    tensors: list[TensorReport]

    @property
    def error(self) -> float:
        return math.sqrt(sum(t.error**2 for t in self.tensors))

    @property
    def norm(self) -> float:
        return math.sqrt(sum(t.norm**2 for t in self.tensors))

    @property
    def rel_error(self) -> float:
        return self.error / self.norm if self.norm > 0 else 0.0

    @property
    def dense_bytes(self) -> int:
        return sum(t.dense_bytes for t in self.tensors)

    @property
    def stored_bytes(self) -> int:
        return sum(t.stored_bytes for t in self.tensors)


def compress_tensor(
    t: torch.Tensor, rank: int | None, energy: float | None, dtype: torch.dtype
) -> tuple[Factors | None, torch.Tensor | None]:
    """(factors, None) for a matrix or conv kernel worth factoring; (None, dense) otherwise
    (1-D tensors, or factors that would take more room than the tensor)."""
    if t.dim() < 2 or t.numel() == 0:
        return None, t.to(dtype)
    a = as_matrix(t)
    cdt = torch.promote_types(t.dtype, torch.float32)
    u, s, v = truncated_svd(a.to(cdt), rank, energy)
    m, n = a.shape
    if s.shape[0] * (m + n + 1) >= m * n:
        return None, t.to(dtype)
    return Factors(u.to(dtype).contiguous(), s.to(dtype).contiguous(), v.to(dtype).contiguous(), tuple(t.shape)), None


def compress(
    tv: TaskVector,
    out: str | os.PathLike[str],
    *,
    rank: int | None = None,
    energy: float | None = None,
    dtype: torch.dtype = torch.float32,
    shard_size: int = DEFAULT_SHARD_BYTES,
    overwrite: bool = False,
    progress: bool = False,
) -> CompressReport:
    """Store `tv` as a low-rank task vector at `out` (atomic) and report each tensor's error.

    Each tensor of two or more dimensions keeps `rank` singular values, or the fewest holding
    `energy` of its squared norm; other tensors, and tensors whose factors would be larger,
    stay dense. Errors are measured in float64 against what is stored (after rounding to `dtype`).
    Tensors are read and factored one at a time; the factors are held until written.
    """
    if (rank is None) == (energy is None):
        raise ConfigError("give exactly one of --rank or --energy")
    if rank is not None and rank < 1:
        raise ConfigError(f"--rank must be at least 1, got {rank}")
    if energy is not None and not 0.0 < energy <= 1.0:
        raise ConfigError(f"--energy must be in (0, 1], got {energy}")
    stored: dict[str, torch.Tensor] = {}
    shapes: dict[str, list[int]] = {}
    reports: list[TensorReport] = []
    total = sum(tv.spec(k).numel * 4 for k in tv.keys())
    with byte_progress(total, f"compressing {tv.name}", progress) as advance:
        for key in tv.keys():
            t = tv[key]
            f, dense = compress_tensor(t, rank, energy, dtype)
            ref = t.to(torch.float64)
            if f is None:
                assert dense is not None
                stored[key] = dense.contiguous()
                err = float((dense.to(torch.float64) - ref).norm())
                r, nbytes = None, dense.numel() * dense.element_size()
            else:
                for p, x in zip(PARTS, (f.u, f.s, f.v), strict=True):
                    stored[part_key(key, p)] = x
                shapes[key] = list(t.shape)
                err = float((f.dense(torch.float64) - ref).norm())
                r, nbytes = f.rank, f.nbytes()
            reports.append(
                TensorReport(
                    key,
                    tuple(t.shape),
                    r,
                    err,
                    float(ref.norm()),
                    t.numel() * torch.empty((), dtype=dtype).element_size(),
                    nbytes,
                )
            )
            advance(t.numel() * 4)
    specs = {k: TensorSpec(tuple(v.shape), v.dtype) for k, v in stored.items()}
    meta = {
        "taskvec": LOWRANK_FORMAT,
        SHAPES_KEY: json.dumps(shapes, separators=(",", ":")),
        "taskvec_lowrank_rule": f"rank={rank}" if rank is not None else f"energy={energy}",
    }
    write_checkpoint(
        Path(out),
        specs,
        lambda k, s, e: stored[k].reshape(-1)[s:e],
        max_shard_bytes=shard_size,
        metadata=meta,
        overwrite=overwrite,
        progress=False,
        description="writing low-rank task vector",
    )
    return CompressReport(reports)
