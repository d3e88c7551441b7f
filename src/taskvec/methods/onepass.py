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
from functools import partial
from itertools import pairwise

import torch

from taskvec.core.stream import chunks, one_torch_thread, prefetch, read_into
from taskvec.core.taskvector import all_finite
from taskvec.io import Source
from taskvec.methods import kernels
from taskvec.methods.registry import MergeMethod, MethodParams, method_source, weighted_sum
from taskvec.methods.selection import magnitude_threshold, trim_by_threshold
from taskvec.methods.ties import TiesParams, elect_and_merge


@dataclass(frozen=True)
class Combine:
    """What a trimming method does after its trim: `fn(trimmed (T, n), weights (T,), a free (T, n)
    buffer or None) -> (n,)`. `ties_majority` is set for TIES, whose whole blocks the fused
    kernel can merge (`kernels.ties_block`)."""

    fn: Callable[[torch.Tensor, torch.Tensor, torch.Tensor | None], torch.Tensor]
    ties_majority: str | None = None

    def __call__(self, trimmed: torch.Tensor, weights: torch.Tensor, scratch: torch.Tensor | None) -> torch.Tensor:
        return self.fn(trimmed, weights, scratch)


SMALL_BYTES = 1 << 20  # tensors whose T slices fit in this (norms, biases): held whole, exact thresholds at once
SAMPLE_BLOCKS = 4  # blocks spread over a tensor that give the brackets...
SAMPLE_STRIDE = 4  # ...every 4th column of them
SIGMAS = 4.5  # bracket half-width in standard errors of the sample quantile
MAX_KEPT = 0.2  # fraction of a tensor's columns kept aside above which the bracket is given up
LAYOUT = 256  # columns are recomputed in arrays of a multiple of this many columns (see `_recompute`)
WORKERS = 2
SUB_BLOCK = 1 << 16  # columns merged at once inside a block (a multiple of LAYOUT)


def combine_fn(method: MergeMethod, params: MethodParams) -> Combine | None:
    """What the built-in trimming method does after its trim, or None for any other method."""
    if method_source(method.name) != "taskvec":
        return None
    if method.name == "ties" and isinstance(params, TiesParams):
        majority = params.majority
        return Combine(lambda trimmed, w, scratch: elect_and_merge(trimmed, w, majority, scratch), majority)
    if method.name == "magnitude":
        return Combine(lambda trimmed, w, scratch: weighted_sum(trimmed, w))
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


@dataclass(frozen=True)
class Trim:
    """One tensor to trim and merge: the task vectors' sources, the tensor's name, size and dtype,
    the task weights, the density kept, what follows the trim, the blocks and the flat output."""

    sources: Sequence[Source]
    key: str
    numel: int
    dtype: torch.dtype
    weights: torch.Tensor
    density: float
    combine: Combine
    layout: list[tuple[int, int]]
    out: torch.Tensor


def merge_tensor(job: Trim) -> torch.Tensor | None:
    """Merge tensor `job.key` into `job.out` in one pass; return the (T, 2) float64 (threshold,
    cut) table of `magnitude_threshold`, or None (and `out` undefined) when a bracket missed and
    the tensor must be merged in two passes."""
    sources, key, numel, dtype = job.sources, job.key, job.numel, job.dtype
    weights, density, combine, layout, out = job.weights, job.density, job.combine, job.layout, job.out
    t = len(sources)
    k = int(density * numel)
    width = max(e - s for s, e in layout)
    with one_torch_thread():
        if t * numel * dtype.itemsize <= SMALL_BYTES:
            return _merge_whole(job)
        if density >= 1 or k >= numel or k <= 0 or dtype != torch.float32:
            return None
        sample = [layout[i * len(layout) // SAMPLE_BLOCKS] for i in range(SAMPLE_BLOCKS)]
        sample = sorted(set(sample))

        def read(block: tuple[int, int]) -> torch.Tensor:
            d = torch.empty(t, block[1] - block[0], dtype=dtype)
            for i, src in enumerate(sources):
                read_into(src, key, *block, d[i])
            return d

        held = dict(zip(sample, _pool().map(read, sample), strict=True))  # read by the block threads
        picked = torch.cat([d[:, ::SAMPLE_STRIDE] for d in held.values()], dim=1) if held else None
        bracket = _brackets(picked, density, _pool()) if picked is not None else None
        if bracket is None:
            return None
        lo, hi = bracket

        group = _fused_group(combine, weights, lo, hi, t)

        def one(s: int, e: int) -> list[_Block]:
            d = held.pop((s, e), None)
            if d is None:
                d = _scratch(t, width, dtype)[:, : e - s]
                for i, src in enumerate(sources):
                    read_into(src, key, s, e, d[i])
            if group is not None and e - s >= kernels.MIN_COLS:
                return [_merge_block(d, s, lo, hi, weights, combine, out, group)]
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


def _brackets(
    sample: torch.Tensor, density: float, pool: ThreadPoolExecutor | None = None
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Per task, [lo, hi] (`_bracket` of each row of the sample (T, m)), the tasks in parallel in `pool`."""
    one = partial(_bracket, density=density)
    found = [f for f in (pool.map(one, sample) if pool is not None else map(one, sample)) if f is not None]
    if len(found) < sample.shape[0]:
        return None
    return torch.tensor([lo for lo, _ in found]), torch.tensor([hi for _, hi in found])


def _bracket(sample: torch.Tensor, density: float) -> tuple[float, float] | None:
    """[lo, hi]: the sample's order statistics of |x| `SIGMAS` standard errors either side of its
    top-`density` quantile, from a sample (m,) of one task's tensor. Found like the threshold
    itself: a histogram of the top 16 bits of |x|'s bit pattern, then a sort of the few entries
    in the bins between the two. None when it cannot hold the threshold (infinities or NaN, or
    many zeros)."""
    m = sample.numel()
    sd = SIGMAS * math.sqrt(density * (1 - density) * m) + 1
    r_hi, r_lo = max(1, int(density * m - sd)), min(m, int(math.ceil(density * m + sd)))  # ranks from the top
    if kernels.available() and kernels.fits(sample) and sample.is_contiguous() and sample.dim() == 1:
        hi, lo = kernels.abs_order_stats(sample, r_hi, r_lo)  # the same order statistics, in one pass
        return (lo, hi) if math.isfinite(hi) and lo > 0 else None
    a = sample.abs()
    digits = a.view(torch.int32) >> 16  # |x| >= 0: 15 bits
    top = torch.bincount(digits, minlength=1 << 15).flip(0).cumsum(0).flip(0)  # top[d]: entries whose digit is >= d
    dh, dl = int((top >= r_hi).sum()) - 1, int((top >= r_lo).sum()) - 1
    higher = int(top[dh + 1]) if dh + 1 < (1 << 15) else 0
    inside = a[(digits >= dl) & (digits <= dh)].sort(descending=True).values
    hi, lo = float(inside[r_hi - higher - 1]), float(inside[r_lo - higher - 1])
    if not math.isfinite(hi) or not lo > 0:
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
    group: int | None = None,
) -> _Block:
    """Merge block d (T, L) at flat `s` as if each threshold were hi; note what the exact one may change.
    With `group` (`_fused_group`), TIES in one call of the fused kernel; else the trim kernel and
    the method's combine, or torch operations alone: the same output, bit for bit. Masks are 0/1
    floats in per-thread buffers (float ops are the fast ones on CPU, and no large allocation per
    block)."""
    t, n = d.shape
    main = n - n % LAYOUT
    if group is not None:
        by_count = combine.ties_majority == "frequency"
        part = out[s : s + n]
        return _kept_block(
            d, s, main, lambda pos, vals: kernels.ties_block(d, lo, hi, weights, by_count, group, main, part, pos, vals)
        )
    a, keep = _buffers(t, n, d.dtype)
    if kernels.fits(d, keep, lo, hi) and lo.is_contiguous() and hi.is_contiguous() and kernels.available():
        block = _kept_block(d, s, main, lambda pos, vals: kernels.trim_block(d, lo, hi, main, keep, pos, vals))
        out[s : s + n] = combine(keep, weights, a)
        return block
    torch.abs(d, out=a)
    torch.gt(a, hi[:, None], out=keep)  # 1 where |x| > hi: kept whatever the exact threshold
    above = keep.sum(1)  # integers below 2^24: exact in float32
    torch.ge(a, lo[:, None], out=a).sub_(keep)  # 1 where lo <= |x| <= hi
    cols = a.sum(0)  # per column, how many tasks are inside their bracket (exact in any order)
    idx = cols[:main].nonzero().reshape(-1)
    tail = (s + main, d[:, main:].clone()) if main < n and bool(cols[main:].any()) else None
    kept = idx.numel() + (n - main if tail is not None else 0)
    block = _Block(above.to(torch.int64), idx + s, d.index_select(1, idx), tail, kept)
    out[s : s + n] = combine(torch.mul(d, keep, out=keep), weights, a)  # a is free once cols is summed
    return block


def _fused_group(combine: Combine, weights: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, t: int) -> int | None:
    """The column group of torch's sum order (`kernels.sum_group`) when the fused TIES kernel
    merges this tensor's blocks, else None."""
    if combine.ties_majority is None or not kernels.available() or not kernels.fits(weights, lo, hi):
        return None
    return kernels.sum_group(t)


def _kept_block(
    d: torch.Tensor,
    s: int,
    main: int,
    kernel: Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, int, bool]],
) -> _Block:
    """The `_Block` of block d at flat `s` from a block kernel that lists the kept-aside columns
    into a thread's buffers (`kernel(pos, vals) -> (above, m, tail)`)."""
    t, n = d.shape
    pos, vals = _kept_buffers(t, n)
    above, m, tail_any = kernel(pos, vals)
    tail = (s + main, d[:, main:].clone()) if tail_any else None
    return _Block(above, pos[:m] + s, vals[:, :m].clone(), tail, m + (n - main if tail is not None else 0))


def _buffers(t: int, n: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Two per-thread (T, n) buffers."""
    bufs = getattr(_local, "masks", None)
    if bufs is None or bufs.dtype != dtype or bufs.numel() < 2 * t * n:
        bufs = _local.masks = torch.empty(2 * t * n, dtype=dtype)
    return bufs[: t * n].view(t, n), bufs[t * n : 2 * t * n].view(t, n)


def _kept_buffers(t: int, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-thread buffers of the kept-aside columns of a block: positions (n,) and values (T, n)."""
    pos, vals = getattr(_local, "kept", (None, None))
    if pos is None or vals is None or pos.numel() < n or vals.numel() < t * n:
        pos, vals = torch.empty(n, dtype=torch.int64), torch.empty(t * n, dtype=torch.float32)
        _local.kept = pos, vals
    return pos, vals[: t * n].view(t, n)


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
    blocks' main parts; the blocks' tails apart); recompute those columns. Tasks, then column
    chunks, are done in parallel by the block threads."""
    tails = [b.tail for b in blocks if b.tail is not None]
    parts = [(pos, cols)] + [(torch.arange(s0, s0 + x.shape[1]), x) for s0, x in tails]
    above = torch.stack([b.above for b in blocks]).sum(0)
    native = kernels.available() and kernels.fits(cols, lo, hi)
    lo_i, hi_i = lo.tolist(), hi.tolist()

    def threshold(i: int) -> tuple[float, float] | None:
        """Task i's (threshold, cut) from its entries inside the bracket."""
        found = []
        for p, x in parts:
            if native:
                found.append(kernels.candidates(x[i], p, lo_i[i], hi_i[i]))
                continue
            a = x[i].abs()
            j = _inside(a, lo[i], hi[i])
            found.append((a.index_select(0, j), p.index_select(0, j)))
        cand, at = torch.cat([c for c, _ in found]), torch.cat([q for _, q in found])
        if native:
            return kernels.select(cand, at, k - int(above[i]))
        return _select(cand, at, k - int(above[i]))

    pool = _pool()
    found = list(pool.map(threshold, range(len(lo))))
    if any(f is None for f in found):
        return None
    table = torch.tensor(found, dtype=torch.float64)
    list(pool.map(lambda job: job(), _recompute(cols, pos, tails, table, weights, combine, out)))
    return table


def _recompute(
    cols: torch.Tensor,
    pos: torch.Tensor,
    tails: list[tuple[int, torch.Tensor]],
    table: torch.Tensor,
    weights: torch.Tensor,
    combine: Combine,
    out: torch.Tensor,
) -> list[Callable[[], None]]:
    """Jobs that merge the kept columns with the exact thresholds (each writes its own entries of
    `out`). Vectorised reductions sum the last (length mod W) columns of an array in another
    order than the others, for a vector width W that divides `LAYOUT`: the columns of the blocks'
    main parts are recomputed in arrays of a multiple of `LAYOUT` columns (zero-padded), each
    block's tail as an array of its own length."""

    native = kernels.available() and kernels.fits(cols)
    thr, cut = table[:, 0].to(cols.dtype), table[:, 1].to(torch.int64)

    def main(s: int) -> None:
        p, c = pos[s : s + RECOMPUTE_COLS], cols[:, s : s + RECOMPUTE_COLS]
        m = p.numel()
        x = torch.zeros(c.shape[0], -(-m // LAYOUT) * LAYOUT, dtype=c.dtype)
        if native:
            kernels.exact_trim(c, p, thr, cut, x)
        else:
            x[:, :m] = exact_trim(c, table, p)
        out[p] = combine(x, weights, None)[:m]

    def tail(s0: int, d: torch.Tensor) -> None:
        out[s0 : s0 + d.shape[1]] = combine(exact_trim(d, table, torch.arange(s0, s0 + d.shape[1])), weights, None)

    jobs: list[Callable[[], None]] = [partial(main, s) for s in range(0, pos.numel(), RECOMPUTE_COLS)]
    return jobs + [partial(tail, s0, d) for s0, d in tails]


RECOMPUTE_COLS = 1 << 15  # kept columns recomputed at once (a multiple of LAYOUT)


def _merge_whole(job: Trim) -> torch.Tensor:
    """A small tensor: all T task vectors held at once, exact thresholds, then the blocks."""
    t = len(job.sources)
    whole = torch.empty(t, job.numel, dtype=job.dtype)
    for i, src in enumerate(job.sources):
        for s, e in chunks(job.numel):
            read_into(src, job.key, s, e, whole[i, s:e])
    table = torch.tensor(
        [magnitude_threshold(_nan_as_zero(whole[i]), job.density) for i in range(t)], dtype=torch.float64
    )
    for s, e in job.layout:
        for a, b in _parts(e - s):
            trimmed = trim_by_threshold(whole[:, s + a : s + b], table, s + a)
            job.out[s + a : s + b] = job.combine(trimmed, job.weights, None)
    return table


def _parts(n: int) -> list[tuple[int, int]]:
    """A block of `n` columns in parts that stay in cache: a multiple of `LAYOUT` columns each, the
    last one taking the block's tail, so that every column is summed as in the whole block."""
    cuts = [*range(0, n - SUB_BLOCK + 1, SUB_BLOCK), n] if n > SUB_BLOCK else [0, n]
    return list(pairwise(cuts))


def _inside(a: torch.Tensor, lo: torch.Tensor | float, hi: torch.Tensor | float) -> torch.Tensor:
    """Positions, in increasing order, of the entries of |x| (`a`, 1-D) with lo <= a <= hi."""
    inside = a >= lo
    inside &= a <= hi
    return inside.nonzero().reshape(-1)


def _select(cand: torch.Tensor, pos: torch.Tensor, r: int) -> tuple[float, float] | None:
    """(threshold, cut) that keeps the top `r` of the candidates |x| `cand` at flat positions
    `pos` (ties at the threshold kept by position), or None when they do not hold the r-th."""
    if not 1 <= r <= cand.numel():
        return None
    thr = cand.kthvalue(cand.numel() - r + 1).values
    need = r - int((cand > thr).sum())
    return float(thr), float(pos[cand == thr].sort().values[need - 1])


def _nan_as_zero(x: torch.Tensor) -> torch.Tensor:
    return x if all_finite(x) or not bool(torch.isnan(x).any()) else torch.where(torch.isnan(x), 0.0, x)


_local = threading.local()


def _scratch(t: int, width: int, dtype: torch.dtype) -> torch.Tensor:
    """A per-thread (T, width) buffer, reused from block to block."""
    buf = getattr(_local, "buf", None)
    if buf is None or buf.dtype != dtype or buf.numel() < t * width:
        buf = _local.buf = torch.empty(t * width, dtype=dtype)
    return buf[: t * width].view(t, width)
