"""Streamed Gram matrix of task vectors: the one routine behind every inner product, norm and
cosine of whole task vectors."""

from __future__ import annotations

from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TYPE_CHECKING

import torch

from taskvec.core.factored import factored_gram, is_factored
from taskvec.core.sources import check_same_tensors
from taskvec.core.stream import CHUNK_ELEMS, byte_progress, chunks, keep_freed_memory, prefetch

if TYPE_CHECKING:
    from taskvec.core.taskvector import TaskVector

GRAM_BLOCK_BYTES = 32 << 20  # float64 bytes of one block of slices of all task vectors


def gram_chunk(n_vectors: int, budget: int = GRAM_BLOCK_BYTES) -> int:
    """Slice length such that `n_vectors` float64 slices take about `budget` bytes."""
    return int(max(1 << 12, min(CHUNK_ELEMS, budget // (8 * max(n_vectors, 1)))))


def gram_matrix(
    tvs: Sequence[TaskVector],
    chunk_elems: int | None = None,
    *,
    progress: bool = False,
    description: str | None = None,
) -> torch.Tensor:
    """G[i, j] = <tau_i, tau_j> in float64, streamed.

    The slice [s, s + chunk) of every task vector is read into one (T, chunk) float64 block and
    G += X X^T is one matrix product (all T task vectors at once, accumulated in float64). The
    next block is read by a second thread while the product runs, and the reads after it are
    announced to the operating system ahead of time, so reading and arithmetic overlap.
    """
    if not tvs:
        raise ValueError("a Gram matrix needs at least one task vector")
    for tv in tvs[1:]:
        check_same_tensors(tvs[0].source, tv.source)
    if any(is_factored(tv) for tv in tvs):  # low-rank task vectors: inner products from their factors
        return factored_gram(tvs)
    t = len(tvs)
    chunk = chunk_elems or gram_chunk(t)
    keys = tvs[0].keys()
    jobs = [(k, s, e) for k in keys for s, e in chunks(tvs[0].spec(k).numel, chunk)]
    g = torch.zeros(t, t, dtype=torch.float64)
    bufs = [torch.empty(t, chunk, dtype=torch.float64) for _ in range(2)]
    total = sum(tvs[0].spec(k).numel for k in keys) * t * 4

    def fill(i: int) -> torch.Tensor:
        key, s, e = jobs[i]
        x = bufs[i % 2][:, : e - s]
        for j, tv in enumerate(tvs):
            x[j].copy_(tv.source.read_flat(key, s, e))
        return x

    def announce(i: int) -> None:
        if i < len(jobs):
            for tv in tvs:
                prefetch(tv.source, *jobs[i])

    description = description or f"Gram matrix of {t} task vectors"
    with (
        keep_freed_memory(),
        byte_progress(total, description, progress) as advance,
        ThreadPoolExecutor(1, thread_name_prefix="taskvec-gram-read") as reader,
    ):
        for i in range(min(2, len(jobs))):
            announce(i)
        nxt: Future[torch.Tensor] | None = reader.submit(fill, 0) if jobs else None
        for i in range(len(jobs)):
            assert nxt is not None
            x = nxt.result()
            announce(i + 2)
            nxt = reader.submit(fill, i + 1) if i + 1 < len(jobs) else None
            g.addmm_(x, x.T)
            advance((jobs[i][2] - jobs[i][1]) * t * 4)
    return (g + g.T) / 2


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
