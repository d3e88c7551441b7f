"""Low-rank task vectors: truncated SVD per tensor, their storage, and inner products from factors.

`compress` turns any task vector into factors U diag(s) V^T per matrix (a conv kernel is seen as
the (out, in * kh * kw) matrix), one tensor at a time, reporting the reconstruction error of what
is stored. `factors_of` finds the factors behind a task vector (a compressed file, a LoRA adapter,
or wrappers of them), and `factored_gram` computes <tau_i, tau_j> from factors without
materialising dense tensors.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from taskvec.core.stream import byte_progress, write_checkpoint
from taskvec.core.taskvector import LinearSource, TaskVector, check_same_tensors
from taskvec.errors import ConfigError
from taskvec.io import Source, TensorSpec
from taskvec.io.lowrank import (
    LOWRANK_FORMAT,
    PARTS,
    SHAPES_KEY,
    FactoredSource,
    Factors,
    part_key,
)
from taskvec.io.writer import DEFAULT_SHARD_BYTES

EXACT_SVD_ELEMS = 1 << 22
"""Matrices up to this many elements get an exact SVD; larger ones a randomized one."""
OVERSAMPLE = 8
POWER_ITERS = 4


# --------------------------------------------------------------------------- factors behind a task vector


def _factored_root(tv: TaskVector | Source) -> tuple[FactoredSource, float] | None:
    """The factored source behind a task vector and the scale applied to it, looking through
    wrappers that pass values unchanged (subsets, dtype views, caches) and a single scaled term."""
    src: object = tv.source if isinstance(tv, TaskVector) else tv
    scale = 1.0
    for _ in range(32):
        if isinstance(src, FactoredSource):
            return src, scale
        if isinstance(src, LinearSource):
            if len(src.terms) != 1 or not isinstance(src.terms[0][0], (int, float)):
                return None
            scale *= float(src.terms[0][0])
            src = src.terms[0][1]
            continue
        src = getattr(src, "source", None)
        if src is None:
            return None
    return None


def factors_of(tv: TaskVector | Source, key: str) -> Factors | None:
    """The factors of tensor `key` of a task vector (scaled as the task vector is), or None if it is dense."""
    root = _factored_root(tv)
    if root is None:
        return None
    f = root[0].factors(key)
    if f is None or root[1] == 1.0:
        return f
    return Factors(f.u, f.s * root[1], f.v, f.shape)


def is_factored(tv: TaskVector | Source) -> bool:
    """True if some tensor of the task vector is held as factors."""
    root = _factored_root(tv)
    return root is not None and bool(set(root[0].factored_keys()) & set(tv.keys()))


# --------------------------------------------------------------------------- truncated SVD


def as_matrix(t: torch.Tensor) -> torch.Tensor:
    """A tensor as the matrix its factors describe: (shape[0], prod(shape[1:]))."""
    return t.reshape(t.shape[0], -1)


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


# --------------------------------------------------------------------------- inner products from factors


def factor_inner(a: Factors, b: Factors) -> float:
    """<U_a S_a V_a^T, U_b S_b V_b^T> = sum_ij s_a[i] s_b[j] (U_a^T U_b)[i, j] (V_a^T V_b)[i, j], in float64."""
    ua, va, sa = a.u.to(torch.float64), a.v.to(torch.float64), a.s.to(torch.float64)
    ub, vb, sb = b.u.to(torch.float64), b.v.to(torch.float64), b.s.to(torch.float64)
    return float((((ua.T @ ub) * (va.T @ vb)) * sa[:, None] * sb[None, :]).sum())


def factor_dense_inner(a: Factors, d: torch.Tensor) -> float:
    """<U S V^T, D> = sum_i s_i u_i^T D v_i, in float64, D given as the (m, n) matrix."""
    u, v, s = a.u.to(torch.float64), a.v.to(torch.float64), a.s.to(torch.float64)
    return float(((d.to(torch.float64) @ v) * u).sum(0) @ s)


def factored_gram(tvs: Sequence[TaskVector]) -> torch.Tensor:
    """G[i, j] = <tau_i, tau_j> in float64, tensor by tensor: from factors where both hold them,
    against one dense tensor where only one does, dense where neither does."""
    for tv in tvs[1:]:
        check_same_tensors(tvs[0].source, tv.source)
    t = len(tvs)
    g = torch.zeros(t, t, dtype=torch.float64)
    for key in tvs[0].keys():
        fs = [factors_of(tv, key) for tv in tvs]
        dense: dict[int, torch.Tensor] = {
            i: as_matrix(tv[key].to(torch.float64))
            if tvs[0].spec(key).numel and len(tvs[0].spec(key).shape) > 1
            else tv[key].to(torch.float64).reshape(1, -1)
            for i, (tv, f) in enumerate(zip(tvs, fs, strict=True))
            if f is None
        }
        for i in range(t):
            for j in range(i, t):
                fi, fj = fs[i], fs[j]
                if fi is not None and fj is not None:
                    v = factor_inner(fi, fj)
                elif fi is not None:
                    v = factor_dense_inner(fi, dense[j])
                elif fj is not None:
                    v = factor_dense_inner(fj, dense[i])
                else:
                    v = float((dense[i] * dense[j]).sum())
                g[i, j] += v
                if i != j:
                    g[j, i] += v
    return g
