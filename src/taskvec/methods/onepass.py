"""Top-k trimming merges (TIES, magnitude pruning) of a whole tensor in one pass over the inputs.

Each task's exact top-k threshold needs the whole tensor, and a merged entry needs the
thresholds of every task: read naively, every input is read, cast and checked twice. Here each
tensor is read once:

1. a few blocks spread over the tensor give, per task, a bracket [lo, hi] that holds the
   threshold with a wide margin (sample quantiles of |tau| widened by 4.5 standard errors);
2. every block is merged as if the threshold were `hi` (entries above `hi` are kept whatever the
   exact threshold in the bracket is, entries below `lo` are dropped), the entries above `hi`
   are counted, and the columns with an entry inside a bracket are kept aside (a few percent);
3. the exact (threshold, cut) of each task follows from the counts and the kept columns, whose
   merged values are then recomputed with it.

The output is bit-identical to trimming by the exact thresholds block by block: the same blocks,
the same arithmetic, and the columns recomputed in arrays whose layout gives each column the same
summation order as in its block. When a bracket misses (an unusual tensor), `None` is returned
and the caller falls back to the two-pass merge.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from itertools import pairwise

import torch

from taskvec.core.stream import chunks, one_torch_thread, prefetch, read_into
from taskvec.core.taskvector import all_finite
from taskvec.io import Source
from taskvec.methods.registry import MergeMethod, MethodParams, method_source, weighted_sum
from taskvec.methods.selection import magnitude_threshold, trim_by_threshold
from taskvec.methods.ties import TiesParams, elect_and_merge

Combine = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (trimmed deltas (T, n), weights (T,)) -> (n,)

SMALL_BYTES = 64 << 20  # tensors whose T task-vector slices fit in this are held whole, thresholds exact at once
SAMPLE_BLOCKS = 4  # blocks spread over a tensor that give the brackets...
SAMPLE_STRIDE = 4  # ...every 4th column of them
SIGMAS = 4.5  # bracket half-width in standard errors of the sample quantile
MAX_KEPT = 0.2  # fraction of a tensor's columns kept aside above which the bracket is given up
LAYOUT = 256  # columns are recomputed in arrays of a multiple of this many columns (see `_recompute`)
WORKERS = 2
SUB_BLOCK = 1 << 15  # columns merged at once inside a block (a multiple of LAYOUT)


def combine_fn(method: MergeMethod, params: MethodParams) -> Combine | None:
    """What the built-in trimming method does after its trim, or None for any other method."""
    if method_source(method.name) != "taskvec":
        return None
    if method.name == "ties" and isinstance(params, TiesParams):
        majority = params.majority
        return lambda trimmed, w: elect_and_merge(trimmed, w, majority)
    if method.name == "magnitude":
        return weighted_sum
    return None


def block_layout(n: int, slice_elems: int, block: int) -> list[tuple[int, int]]:
    """The merge blocks of a tensor streamed in slices of `slice_elems`: `block` columns each,
    restarting at every slice (the layout of `ComposedSource.read_flat`)."""
    out = []
    for s0, e0 in chunks(n, slice_elems):
        for s in range(s0, max(e0, s0 + 1), block):
            out.append((s, min(e0, s + block)))
    return out


def exact_trim(deltas: torch.Tensor, thresholds: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    """`trim_by_threshold` of columns at arbitrary flat positions `pos` (same factors, same products)."""
    thr = thresholds[:, 0].to(deltas.dtype)[:, None]
    a = deltas.abs()
    keep = (a > thr) | ((a == thr) & (pos[None, :] <= thresholds[:, 1:].to(torch.int64)))
    return deltas * keep.to(deltas.dtype)


@dataclass
class _Block:
    above: torch.Tensor  # (T,) entries above hi
    pos: torch.Tensor  # flat positions of the kept-aside columns of the block's main part
    cols: torch.Tensor  # (T, m) their deltas
    tail: tuple[int, torch.Tensor] | None  # (flat start, deltas) of the block's tail when it has such columns
    kept: int = field(default=0)


def merge_tensor(
    sources: Sequence[Source],
    key: str,
    numel: int,
    dtype: torch.dtype,
    weights: torch.Tensor,
    density: float,
    combine: Combine,
    layout: list[tuple[int, int]],
    out: torch.Tensor,
) -> torch.Tensor | None:
    """Merge tensor `key` into `out` (flat, `numel`) in one pass; return the (T, 2) float64
    (threshold, cut) table of `magnitude_threshold`, or None (and `out` undefined) when a bracket
    missed and the tensor must be merged in two passes."""
    t = len(sources)
    k = int(density * numel)
    width = max(e - s for s, e in layout)
    with one_torch_thread():
        if t * numel * dtype.itemsize <= SMALL_BYTES:
            return _merge_whole(sources, key, numel, dtype, weights, density, combine, layout, out)
        if density >= 1 or k >= numel or k <= 0 or dtype != torch.float32:
            return None
        sample = [layout[i * len(layout) // SAMPLE_BLOCKS] for i in range(SAMPLE_BLOCKS)]
        sample = sorted(set(sample))
        held: dict[tuple[int, int], torch.Tensor] = {}
        for s, e in sample:
            d = torch.empty(t, e - s, dtype=dtype)
            for i, src in enumerate(sources):
                read_into(src, key, s, e, d[i])
            held[(s, e)] = d
        picked = torch.cat([d[:, ::SAMPLE_STRIDE] for d in held.values()], dim=1) if held else None
        bracket = _brackets(picked, density) if picked is not None else None
        if bracket is None:
            return None
        lo, hi = bracket

        def one(s: int, e: int) -> list[_Block]:
            d = held.pop((s, e), None)
            if d is None:
                d = _scratch(t, width, dtype)[:, : e - s]
                for i, src in enumerate(sources):
                    read_into(src, key, s, e, d[i])
            return [_merge_block(d[:, a:b], s + a, lo, hi, weights, combine, out) for a, b in _parts(e - s)]

        # The kept columns go to two buffers allocated once (pages are mapped as they fill): many
        # small tensors left between the blocks' large temporaries would fragment the heap.
        cap = int(MAX_KEPT * numel)
        store_cols = torch.empty(t, cap, dtype=dtype)
        store_pos = torch.empty(cap, dtype=torch.int64)
        blocks: list[_Block] = []
        kept = used = 0
        order = sample + [b for b in layout if b not in held]
        for parts in _window(_pool(), one, order, lambda j: _announce(sources, key, order, j)):
            for b in parts:
                kept += b.kept
                m = b.pos.numel()
                if kept > cap:
                    return None
                store_cols[:, used : used + m] = b.cols
                store_pos[used : used + m] = b.pos
                b.cols, b.pos = store_cols[:, used : used + m], store_pos[used : used + m]
                used += m
                blocks.append(b)
        return _finish(blocks, lo, hi, k, weights, combine, out, store_cols[:, :used], store_pos[:used])


_pool_lock = threading.Lock()
_pools: list[ThreadPoolExecutor] = []


def _pool() -> ThreadPoolExecutor:
    """The threads that merge blocks, kept for the process (their buffers are reused)."""
    with _pool_lock:
        if not _pools:
            _pools.append(ThreadPoolExecutor(WORKERS, thread_name_prefix="taskvec-onepass"))
        return _pools[0]


def _window(
    pool: ThreadPoolExecutor,
    fn: Callable[[int, int], list[_Block]],
    order: list[tuple[int, int]],
    announce: Callable[[int], None],
) -> Iterator[list[_Block]]:
    """`fn` over `order` in the pool, a few blocks in flight, results in order; `announce(j)` as block j starts."""
    pending: list[Future[list[_Block]]] = []
    ahead = 2 * WORKERS
    try:
        for j, (s, e) in enumerate(order):
            announce(j)
            pending.append(pool.submit(fn, s, e))
            if len(pending) >= ahead:
                yield pending.pop(0).result()
        while pending:
            yield pending.pop(0).result()
    finally:
        for f in pending:
            f.cancel()


PREFETCH_BLOCKS = 8


def _announce(sources: Sequence[Source], key: str, order: list[tuple[int, int]], j: int) -> None:
    """Start reading the block `PREFETCH_BLOCKS` after block j (and the first ones at j = 0)."""
    for i in range(j + 1, j + PREFETCH_BLOCKS + 1) if j == 0 else (j + PREFETCH_BLOCKS,):
        if i < len(order):
            for src in sources:
                prefetch(src, key, *order[i])


def _brackets(sample: torch.Tensor, density: float) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Per task, [lo, hi]: the sample's order statistics of |x| `SIGMAS` standard errors either side
    of its top-`density` quantile, from a sample (T, m) of the tensor. Found like the threshold
    itself: one histogram of the top 16 bits of |x|'s bit pattern (all tasks at once), then a
    sort of the few entries in the bins between the two."""
    t, m = sample.shape
    a = sample.abs()
    sd = SIGMAS * math.sqrt(density * (1 - density) * m) + 1
    r_hi, r_lo = max(1, int(density * m - sd)), min(m, int(math.ceil(density * m + sd)))  # ranks from the top
    digits = a.view(torch.int32) >> 16  # |x| >= 0: 15 bits
    offsets = torch.arange(t, dtype=torch.int32)[:, None] << 15
    hist = torch.bincount((digits + offsets).reshape(-1), minlength=t << 15).reshape(t, 1 << 15)
    top = hist.flip(1).cumsum(1).flip(1)  # top[i, d]: entries of task i whose digit is >= d
    d_hi = (top >= r_hi).sum(1) - 1
    d_lo = (top >= r_lo).sum(1) - 1
    bounds = torch.empty(2, t, dtype=torch.float32)
    for i in range(t):
        dh, dl = int(d_hi[i]), int(d_lo[i])
        higher = int(top[i, dh + 1]) if dh + 1 < (1 << 15) else 0
        inside = a[i][(digits[i] >= dl) & (digits[i] <= dh)].sort(descending=True).values
        bounds[0, i], bounds[1, i] = inside[r_hi - higher - 1], inside[r_lo - higher - 1]
    hi, lo = bounds[0], bounds[1]
    if not bool(torch.isfinite(hi).all()) or bool((lo <= 0).any()):  # infinities or NaN, or many zeros: not here
        return None
    return lo, hi


def _merge_block(
    d: torch.Tensor,
    s: int,
    lo: torch.Tensor,
    hi: torch.Tensor,
    weights: torch.Tensor,
    combine: Combine,
    out: torch.Tensor,
) -> _Block:
    """Merge block d (T, L) at flat `s` as if each threshold were hi; note what the exact one may change.
    Masks are 0/1 floats in per-thread buffers (float ops are the fast ones on CPU, and no large
    allocation per block)."""
    t, n = d.shape
    a, keep = _buffers(t, n, d.dtype)
    torch.abs(d, out=a)
    torch.gt(a, hi[:, None], out=keep)  # 1 where |x| > hi: kept whatever the exact threshold
    above = keep.sum(1)  # integers below 2^24: exact in float32
    torch.ge(a, lo[:, None], out=a).sub_(keep)  # 1 where lo <= |x| <= hi
    cols = a.sum(0)  # per column, how many tasks are inside their bracket (exact in any order)
    main = n - n % LAYOUT
    idx = cols[:main].nonzero().reshape(-1)
    tail = (s + main, d[:, main:].clone()) if main < n and bool(cols[main:].any()) else None
    kept = idx.numel() + (n - main if tail is not None else 0)
    block = _Block(above.to(torch.int64), idx + s, d.index_select(1, idx), tail, kept)
    out[s : s + n] = combine(torch.mul(d, keep, out=keep), weights)
    return block


def _buffers(t: int, n: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Two per-thread (T, n) buffers."""
    bufs = getattr(_local, "masks", None)
    if bufs is None or bufs.dtype != dtype or bufs.numel() < 2 * t * n:
        bufs = _local.masks = torch.empty(2 * t * n, dtype=dtype)
    return bufs[: t * n].view(t, n), bufs[t * n : 2 * t * n].view(t, n)


def _finish(
    blocks: list[_Block],
    lo: torch.Tensor,
    hi: torch.Tensor,
    k: int,
    weights: torch.Tensor,
    combine: Combine,
    out: torch.Tensor,
    cols: torch.Tensor,
    pos: torch.Tensor,
) -> torch.Tensor | None:
    """Exact thresholds from the counts and the kept columns (`cols` at flat positions `pos`, the
    blocks' main parts; the blocks' tails apart); recompute those columns."""
    tails = [b.tail for b in blocks if b.tail is not None]
    all_pos = torch.cat([pos] + [torch.arange(s0, s0 + x.shape[1]) for s0, x in tails])
    order = torch.argsort(all_pos)  # ties at the threshold are kept by position
    all_pos = all_pos[order]
    above = torch.stack([b.above for b in blocks]).sum(0)
    table = torch.empty(len(lo), 2, dtype=torch.float64)
    for i in range(len(lo)):
        a = torch.cat([cols[i]] + [x[i] for _, x in tails])[order].abs_()
        inside = (a >= lo[i]) & (a <= hi[i])
        cand, cpos = a[inside], all_pos[inside]
        r = k - int(above[i])  # the threshold is the r-th largest candidate
        if not 1 <= r <= cand.numel():
            return None
        thr = cand.kthvalue(cand.numel() - r + 1).values
        need = r - int((cand > thr).sum())
        table[i, 0], table[i, 1] = float(thr), float(cpos[cand == thr][need - 1])
    _recompute(cols, pos, tails, table, weights, combine, out)
    return table


def _recompute(
    cols: torch.Tensor,
    pos: torch.Tensor,
    tails: list[tuple[int, torch.Tensor]],
    table: torch.Tensor,
    weights: torch.Tensor,
    combine: Combine,
    out: torch.Tensor,
) -> None:
    """Merge the kept columns with the exact thresholds. Vectorised reductions sum the last
    (length mod W) columns of an array in another order than the others, for a vector width W
    that divides `LAYOUT`: the columns of the blocks' main parts are recomputed in arrays of a
    multiple of `LAYOUT` columns (zero-padded), each block's tail as an array of its own length."""
    step = 1 << 18
    for s in range(0, pos.numel(), step):
        p, c = pos[s : s + step], cols[:, s : s + step]
        m = p.numel()
        x = torch.zeros(c.shape[0], -(-m // LAYOUT) * LAYOUT, dtype=c.dtype)
        x[:, :m] = exact_trim(c, table, p)
        out[p] = combine(x, weights)[:m]
    for s0, d in tails:
        out[s0 : s0 + d.shape[1]] = combine(exact_trim(d, table, torch.arange(s0, s0 + d.shape[1])), weights)


def _merge_whole(
    sources: Sequence[Source],
    key: str,
    numel: int,
    dtype: torch.dtype,
    weights: torch.Tensor,
    density: float,
    combine: Combine,
    layout: list[tuple[int, int]],
    out: torch.Tensor,
) -> torch.Tensor:
    """A small tensor: all T task vectors held at once, exact thresholds, then the blocks."""
    t = len(sources)
    whole = torch.empty(t, numel, dtype=dtype)
    for i, src in enumerate(sources):
        for s, e in chunks(numel):
            read_into(src, key, s, e, whole[i, s:e])
    table = torch.tensor([magnitude_threshold(_nan_as_zero(whole[i]), density) for i in range(t)], dtype=torch.float64)
    for s, e in layout:
        for a, b in _parts(e - s):
            out[s + a : s + b] = combine(trim_by_threshold(whole[:, s + a : s + b], table, s + a), weights)
    return table


def _parts(n: int) -> list[tuple[int, int]]:
    """A block of `n` columns in parts that stay in cache: a multiple of `LAYOUT` columns each, the
    last one taking the block's tail, so that every column is summed as in the whole block."""
    cuts = [*range(0, n - SUB_BLOCK + 1, SUB_BLOCK), n] if n > SUB_BLOCK else [0, n]
    return list(pairwise(cuts))


def _nan_as_zero(x: torch.Tensor) -> torch.Tensor:
    return x if all_finite(x) or not bool(torch.isnan(x).any()) else torch.where(torch.isnan(x), 0.0, x)


_local = threading.local()


def _scratch(t: int, width: int, dtype: torch.dtype) -> torch.Tensor:
    """A per-thread (T, width) buffer, reused from block to block."""
    buf = getattr(_local, "buf", None)
    if buf is None or buf.dtype != dtype or buf.numel() < t * width:
        buf = _local.buf = torch.empty(t * width, dtype=dtype)
    return buf[: t * width].view(t, width)
