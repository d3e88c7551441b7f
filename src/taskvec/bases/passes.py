"""The streamed passes that compute bases from task vectors, optionally writing them, while
measuring the statistics the decoder and the exact errors need (inner products, summed in
float64, of the bases *as stored*, i.e. after rounding to the bank's dtype; products under the
precision policy of `core.similarity.block_gram`)."""

from __future__ import annotations

import os
from collections.abc import Sequence
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import torch

from taskvec.core.similarity import block_gram, gram_dtype
from taskvec.core.stream import (
    LastSliceCache,
    byte_progress,
    chunks,
    frozen_gc,
    keep_freed_memory,
    prefetch,
    write_checkpoint,
)
from taskvec.core.taskvector import TaskVector, compute_dtype
from taskvec.io import CheckpointWriter, TensorSpec
from taskvec.io.writer import DEFAULT_SHARD_BYTES
from taskvec.methods import compose

BASIS_FORMAT = "taskvec/bases-basis"


def tapped(tv: TaskVector) -> TaskVector:
    """`tv` reading through a per-thread memory of its last slice, so a slice read by a merge
    method and again for the statistics comes from disk once."""
    return TaskVector(LastSliceCache(tv.source), name=tv.name)


def merged_basis(members: Sequence[TaskVector], merge: str, params: dict[str, Any]) -> TaskVector:
    """One cluster's basis: 'mean' is task arithmetic with weights 1/n; any registered method otherwise."""
    if merge == "mean":
        return compose(members, "task_arithmetic", [1.0 / len(members)] * len(members))
    return compose(members, merge, **params)


def basis_specs(tv: TaskVector, dtype: torch.dtype) -> dict[str, TensorSpec]:
    return {k: TensorSpec(tv.spec(k).shape, dtype) for k in tv.keys()}


def cluster_pass(
    basis: TaskVector,
    members: Sequence[TaskVector],
    store_dtype: torch.dtype,
    *,
    chunk_elems: int,
    out: str | os.PathLike[str] | None = None,
    shard_size: int = DEFAULT_SHARD_BYTES,
    progress: bool = False,
    description: str = "basis",
) -> tuple[float, torch.Tensor, torch.Tensor]:
    """Stream one merged basis (writing it to `out` if given) and return, in float64,
    (||s||^2, [<s, tau_j>]_j, Gram of the members), with s rounded to `store_dtype`.

    `members` should be the tapped task vectors `basis` was composed from, so each slice is read once.
    """
    n = len(members)
    parts: dict[tuple[str, int], tuple[float, list[float], list[list[float]]]] = {}
    pdt = gram_dtype([store_dtype, *(m.spec(k).dtype for m in members for k in basis.keys())])

    def slice_fn(key: str, s: int, e: int) -> torch.Tensor:
        # May run in the writer's worker threads: partial sums are kept per slice and added in a
        # fixed order below. They are kept as Python floats, not small tensors: many small tensors
        # left between the big slice buffers fragment the heap and inflate resident memory.
        b = basis.source.read_flat(key, s, e)
        y = torch.empty(n + 1, e - s, dtype=pdt)  # the stored basis, then the members
        y[0] = b.to(store_dtype)
        for j, m in enumerate(members):
            y[j + 1] = m.source.read_flat(key, s, e)
        stats = block_gram(y).tolist()
        parts[(key, s)] = (stats[0][0], stats[0][1:], [row[1:] for row in stats[1:]])
        return b

    specs = basis_specs(basis, store_dtype)
    if out is not None:
        write_checkpoint(
            out,
            specs,
            slice_fn,
            max_shard_bytes=shard_size,
            chunk_elems=chunk_elems,
            metadata={"taskvec": BASIS_FORMAT},
            progress=progress,
            description=description,
        )
    else:
        total = sum(sp.numel for sp in specs.values()) * 4 * n
        with byte_progress(total, description, progress) as advance:
            for key, sp in specs.items():
                for s, e in chunks(sp.numel, chunk_elems):
                    slice_fn(key, s, e)
                    advance((e - s) * 4 * n)
    h = 0.0
    c = torch.zeros(n, dtype=torch.float64)
    g = torch.zeros(n, n, dtype=torch.float64)
    for key, sp in specs.items():  # a fixed order of summation: results do not depend on threading
        for s, _ in chunks(sp.numel, chunk_elems):
            ph, pc, pg = parts.pop((key, s))
            h += ph
            c += torch.tensor(pc, dtype=torch.float64)
            g += torch.tensor(pg, dtype=torch.float64)
    return h, c, g


def linear_pass(
    tvs: Sequence[TaskVector],
    mixing: torch.Tensor,
    store_dtype: torch.dtype,
    *,
    chunk_elems: int,
    outs: Sequence[str | os.PathLike[str]] | None = None,
    shard_size: int = DEFAULT_SHARD_BYTES,
    progress: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """S = V @ mixing, all M bases at once in one read of the T task vectors (writing basis m to
    outs[m] if given, each with the core's atomic streamed writer). Returns (C, H) in float64:
    C = S^T V (M x T) and H = S^T S (M x M), with S rounded to `store_dtype`."""
    t, m = mixing.shape
    first = tvs[0]
    keys = first.keys()
    cdt = compute_dtype(*{tv.spec(k).dtype for tv in tvs for k in keys})
    w = mixing.to(cdt)
    pdt = gram_dtype([cdt, store_dtype])
    specs = basis_specs(first, store_dtype)
    cross = torch.zeros(m, t, dtype=torch.float64)
    hgram = torch.zeros(m, m, dtype=torch.float64)
    total = sum(sp.numel for sp in specs.values()) * 4 * t
    with ExitStack() as stack:
        stack.enter_context(keep_freed_memory())
        stack.enter_context(frozen_gc())
        writers = [
            stack.enter_context(
                CheckpointWriter(Path(o), specs, max_shard_bytes=shard_size, metadata={"taskvec": BASIS_FORMAT})
            )
            for o in (outs or [])
        ]
        order = writers[0].order if writers else list(specs)
        with byte_progress(total, f"{m} bases from {t} task vectors", progress) as advance:
            jobs = [(key, s, e) for key in order for s, e in chunks(specs[key].numel, chunk_elems)]
            for i, (key, s, e) in enumerate(jobs):
                for job in jobs[i + 2 : i + 3] if i else jobs[:3]:  # start reading the next slices of every input
                    for tv in tvs:
                        prefetch(tv.source, *job)
                x = torch.stack([tv.source.read_flat(key, s, e).to(cdt) for tv in tvs])
                b = w.T @ x
                bq = b.to(store_dtype).to(pdt)
                both = block_gram(bq, torch.cat([bq, x.to(pdt)]))  # [S^T S | S^T V] in one product
                hgram += both[:, :m]
                cross += both[:, m:]
                for j, wr in enumerate(writers):
                    wr.write(key, b[j])
                advance((e - s) * 4 * t)
    return cross, hgram
