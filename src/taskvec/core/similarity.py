"""Streamed Gram matrix of task vectors: one slice of every task vector in memory at a time."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from taskvec.core.stream import CHUNK_ELEMS, chunks
from taskvec.core.taskvector import TaskVector, check_same_tensors


def gram_matrix(tvs: Sequence[TaskVector], chunk_elems: int = CHUNK_ELEMS) -> torch.Tensor:
    """G[i, j] = <tau_i, tau_j>, accumulated in float64 tensor by tensor."""
    for tv in tvs[1:]:
        check_same_tensors(tvs[0].source, tv.source)
    g = torch.zeros(len(tvs), len(tvs), dtype=torch.float64)
    for key in tvs[0].keys():
        for s, e in chunks(tvs[0].spec(key).numel, chunk_elems):
            x = torch.stack([tv.source.read_flat(key, s, e).to(torch.float64) for tv in tvs])
            g += x @ x.T
    return g


def cosine_matrix(tvs: Sequence[TaskVector]) -> torch.Tensor:
    """Cosine similarity of every pair of task vectors, from the streamed Gram matrix; NaN in the
    rows and columns of a zero task vector (its direction is undefined)."""
    g = gram_matrix(tvs)
    n = g.diagonal().sqrt()
    cos = g / n[:, None] / n[None, :]
    zero = n == 0
    cos[zero, :] = float("nan")
    cos[:, zero] = float("nan")
    return cos
