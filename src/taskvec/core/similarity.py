"""Streamed Gram matrix of task vectors: the one routine behind every inner product, norm and
cosine of whole task vectors."""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TYPE_CHECKING

import torch

from taskvec.core.factored import factored_gram, is_factored
from taskvec.core.sources import check_same_tensors
from taskvec.core.stream import (
    CHUNK_ELEMS,
    byte_progress,
    chunks,
    frozen_gc,
    keep_freed_memory,
    one_torch_thread,
    prefetch,
    read_into,
)

if TYPE_CHECKING:
    from taskvec.core.taskvector import TaskVector

GRAM_BLOCK_BYTES = 24 << 20  # bytes of one block of slices of all task vectors, in the products' dtype
PRODUCT_COLUMNS = 1024  # columns summed in float32 before the float64 sum (see `block_gram`)


def gram_dtype(dtypes: Iterable[torch.dtype]) -> torch.dtype:
    """The precision of the products: float64 when any input is float64, else float32."""
    return torch.float64 if torch.float64 in set(dtypes) else torch.float32


def block_gram(x: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
    """x @ y.T (y = x if None) in float64, for (rows, n) blocks of task vectors.

    float64 blocks: float64 products. float32 blocks (fp16, bf16 and fp32 inputs): float32
    products summed in float32 over runs of `PRODUCT_COLUMNS` columns, the runs summed in float64.
    Each run's float32 dot product is within gamma_b = b u / (1 - b u) (b = PRODUCT_COLUMNS,
    u = 2^-24) of the exact sum of |x_k y_k| (Higham, Accuracy and Stability, 3.1); the product
    of two fp16 or two bf16 values is exact in float32. The result is on x's device."""
    y = x if y is None else y
    if x.dtype == torch.float64 or y.dtype == torch.float64:
        return x.to(torch.float64) @ y.to(torch.float64).T
    n = x.shape[1]
    full = n - n % PRODUCT_COLUMNS
    out = torch.zeros(x.shape[0], y.shape[0], dtype=torch.float64, device=x.device)
    if full:
        xs = x[:, :full].reshape(x.shape[0], -1, PRODUCT_COLUMNS).transpose(0, 1)
        ys = y[:, :full].reshape(y.shape[0], -1, PRODUCT_COLUMNS).transpose(0, 1)
        out += torch.bmm(xs, ys.transpose(1, 2)).sum(0, dtype=torch.float64)
    if full < n:
        out += (x[:, full:] @ y[:, full:].T).to(torch.float64)
    return out


def gram_error_bound(x: torch.Tensor) -> torch.Tensor:
    """Per entry, a bound of the error of the streamed Gram matrix of the rows of `x` (T, n) when
    its products are float32 (`block_gram`): (gamma_b + gamma'_m) * |x| @ |x|.T, with b =
    `PRODUCT_COLUMNS`, gamma_b = b u / (1 - b u), u = 2^-24 for the float32 runs, and gamma'_m the
    same for float64 (u = 2^-53) over the m <= n / b + 2 runs summed per block and across blocks."""
    b, n = PRODUCT_COLUMNS, x.shape[1]
    m = n // b + 2
    u32, u64 = 2.0**-24, 2.0**-53
    gamma = b * u32 / (1 - b * u32) + m * u64 / (1 - m * u64)
    a = x.abs().to(torch.float64)
    return gamma * (a @ a.T)


def gram_chunk(n_vectors: int, budget: int = GRAM_BLOCK_BYTES, itemsize: int = 8) -> int:
    """Slice length such that `n_vectors` slices of `itemsize`-byte elements take about `budget` bytes."""
    return int(max(1 << 12, min(CHUNK_ELEMS, budget // (itemsize * max(n_vectors, 1)))))


def gram_matrix(
    tvs: Sequence[TaskVector],
    chunk_elems: int | None = None,
    *,
    progress: bool = False,
    description: str | None = None,
    device: str | torch.device | None = None,
) -> torch.Tensor:
    """G[i, j] = <tau_i, tau_j> in float64, streamed.

    The slice [s, s + chunk) of every task vector is read (cast and checked in place) into one
    (T, chunk) block and G += X X^T is one product per block (`block_gram`: float64 products for
    float64 task vectors, float32 products summed in float64 otherwise), on `device` (default
    the CPU). Two threads each read a block and, on the CPU, take its product, while the reads
    after them are announced to the operating system ahead of time, so reading and arithmetic
    overlap and both cores work; the blocks' products are summed in block order, so the result
    does not depend on which thread finished first.
    """
    if not tvs:
        raise ValueError("a Gram matrix needs at least one task vector")
    for tv in tvs[1:]:
        check_same_tensors(tvs[0].source, tv.source)
    if any(is_factored(tv) for tv in tvs):  # low-rank task vectors: inner products from their factors
        return factored_gram(tvs)
    t = len(tvs)
    keys = tvs[0].keys()
    cdt = gram_dtype(tv.spec(k).dtype for tv in tvs for k in keys)
    chunk = chunk_elems or gram_chunk(t, itemsize=cdt.itemsize)  # float32 blocks: twice the columns of float64
    jobs = [(k, s, e) for k in keys for s, e in chunks(tvs[0].spec(k).numel, chunk)]
    dev = torch.device(device or "cpu")
    g = torch.zeros(t, t, dtype=torch.float64, device=dev)
    # on the CPU a block's product is taken by the thread that read it, so its buffer is free when
    # its result is; on a GPU the main thread still copies block i while block i + READ_AHEAD is read
    bufs = [torch.empty(t, chunk, dtype=cdt) for _ in range(READ_AHEAD + (dev.type != "cpu"))]
    total = sum(tvs[0].spec(k).numel for k in keys) * t * 4

    def fill(i: int) -> torch.Tensor:
        """Block i read into its buffer; on the CPU, its product too (the threads share the work)."""
        key, s, e = jobs[i]
        x = bufs[i % len(bufs)][:, : e - s]
        for j, tv in enumerate(tvs):
            read_into(tv.source, key, s, e, x[j])
        return block_gram(x) if dev.type == "cpu" else x

    def announce(i: int) -> None:
        if i < len(jobs):
            for tv in tvs:
                prefetch(tv.source, *jobs[i])

    description = description or f"Gram matrix of {t} task vectors"
    with (
        keep_freed_memory(),
        frozen_gc(),
        one_torch_thread(),  # the threads below are the parallelism: teams of OpenMP threads each would spin
        byte_progress(total, description, progress) as advance,
        ThreadPoolExecutor(READ_AHEAD, thread_name_prefix="taskvec-gram-read") as reader,
    ):
        for i in range(min(ANNOUNCE_AHEAD + 1, len(jobs))):
            announce(i)
        ahead: deque[Future[torch.Tensor]] = deque(reader.submit(fill, i) for i in range(min(READ_AHEAD, len(jobs))))
        for i in range(len(jobs)):
            x = ahead.popleft().result()
            announce(i + ANNOUNCE_AHEAD + 1)
            if i + READ_AHEAD < len(jobs):  # into block i's buffer (CPU: product taken) or i - 1's (GPU: copied)
                ahead.append(reader.submit(fill, i + READ_AHEAD))
            g += x if dev.type == "cpu" else block_gram(x.to(dev))  # summed in block order either way
            advance((jobs[i][2] - jobs[i][1]) * t * 4)
    g = g.cpu()
    return (g + g.T) / 2


READ_AHEAD = 2  # blocks read (cast and checked) and, on the CPU, multiplied by threads at once
ANNOUNCE_AHEAD = 8  # blocks whose reads the operating system is asked to start ahead (page cache, not RSS)


def cosine_matrix(tvs: Sequence[TaskVector], *, device: str | torch.device | None = None) -> torch.Tensor:
    """Cosine similarity of every pair of task vectors, from the streamed Gram matrix (its products
    on `device`); NaN in the rows and columns of a zero task vector (its direction is undefined)."""
    g = gram_matrix(tvs, device=device)
    n = g.diagonal().sqrt()
    cos = g / n[:, None] / n[None, :]
    zero = n == 0
    cos[zero, :] = float("nan")
    cos[:, zero] = float("nan")
    return cos
