"""The factors behind a task vector (a compressed file, a LoRA adapter, or wrappers of them) and
inner products computed from them without materialising dense tensors."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch

from taskvec.core.sources import LinearSource, check_same_tensors
from taskvec.io import Source
from taskvec.io.lowrank import FactoredSource, Factors

if TYPE_CHECKING:
    from taskvec.core.taskvector import TaskVector


def as_matrix(t: torch.Tensor) -> torch.Tensor:
    """A tensor as the matrix its factors describe: (shape[0], prod(shape[1:]))."""
    return t.reshape(t.shape[0], -1)


# --------------------------------------------------------------------------- factors behind a task vector


def _factored_root(tv: TaskVector | Source) -> tuple[FactoredSource, float] | None:
    """The factored source behind a task vector and the scale applied to it, looking through
    wrappers that pass values unchanged (subsets, dtype views, caches) and a single scaled term."""
    src: object = tv  # a task vector's source is reached like a wrapper's
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
