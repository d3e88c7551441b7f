"""The per-tensor streaming plan: every output tensor is computed slice by slice and written
as it is produced, so peak memory is a few slices whatever the size of the model."""

from __future__ import annotations

import ctypes
import gc
import os
import threading
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import torch
from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn, TransferSpeedColumn

from taskvec.io import CheckpointWriter, Source, TensorSpec
from taskvec.io.writer import DEFAULT_SHARD_BYTES

CHUNK_ELEMS = 1 << 21  # 2M elements: 8 MiB of float32 per slice
PIPELINE_WORKERS = 2  # slices computed ahead of the writer, in parallel
PREFETCH_AHEAD = 6  # slices whose reads are started ahead of the one being computed


def chunks(numel: int, size: int = CHUNK_ELEMS) -> Iterator[tuple[int, int]]:
    """Flat [start, stop) ranges that cover `numel` elements."""
    if numel == 0:
        yield 0, 0
        return
    for s in range(0, numel, size):
        yield s, min(numel, s + size)


_Remembered = tuple[str, int, int, torch.Tensor, dict[torch.dtype, torch.Tensor]]  # key, start, stop, data, casts


class LastSliceCache:
    """Remembers the last slice each thread read from a source: many task vectors share one base,
    and each slice of the base is then read from disk once instead of once per task vector, and
    cast once (`read_cast`). A read inside the remembered slice (a block of it) is a view of it.
    Slices are computed in worker threads, hence one memory per thread; whole-tensor reads are
    not kept, so at most one slice per thread (and its casts) stays in memory."""

    def __init__(self, source: Source):
        self.source = source
        self.name = source.name
        self._local = threading.local()

    def keys(self) -> list[str]:
        return self.source.keys()

    def spec(self, key: str) -> TensorSpec:
        return self.source.spec(key)

    def prefetch(self, key: str, start: int = 0, stop: int | None = None) -> None:
        prefetch(self.source, key, start, stop)

    def _last(self, key: str, start: int, stop: int) -> _Remembered:
        last = getattr(self._local, "last", None)
        if last is None or last[0] != key or not last[1] <= start <= stop <= last[2]:
            last = (key, start, stop, self.source.read_flat(key, start, stop), {})
            self._local.last = last
        return last

    def read_flat(self, key: str, start: int = 0, stop: int | None = None) -> torch.Tensor:
        if stop is None:
            return self.source.read_flat(key, start, stop)
        _, s0, e0, data, _ = self._last(key, start, stop)
        return data if (s0, e0) == (start, stop) else data[start - s0 : stop - s0]

    def read_cast(self, key: str, start: int, stop: int | None, dtype: torch.dtype) -> torch.Tensor:
        """`read_flat(key, start, stop).to(dtype)`, the cast of the remembered slice made once."""
        if stop is None:
            return self.source.read_flat(key, start, stop).to(dtype)
        _, s0, e0, data, casts = self._last(key, start, stop)
        if data.dtype == dtype:
            cast = data
        elif dtype in casts:
            cast = casts[dtype]
        else:
            cast = casts[dtype] = data.to(dtype)
        return cast if (s0, e0) == (start, stop) else cast[start - s0 : stop - s0]


def read_cast(source: Source, key: str, start: int, stop: int | None, dtype: torch.dtype) -> torch.Tensor:
    """`source.read_flat(key, start, stop).to(dtype)`; a source that remembers slices casts each once."""
    fn = getattr(source, "read_cast", None)
    return fn(key, start, stop, dtype) if callable(fn) else source.read_flat(key, start, stop).to(dtype)


def read_into(source: Source, key: str, start: int, stop: int | None, out: torch.Tensor) -> None:
    """`out[:] = source.read_flat(key, start, stop)` (cast to `out`'s dtype); a source with a
    `read_into` method computes straight into `out`, without a temporary slice."""
    fn = getattr(source, "read_into", None)
    if callable(fn):
        fn(key, start, stop, out)
    else:
        out.copy_(source.read_flat(key, start, stop))


def prefetch(source: object, key: str, start: int = 0, stop: int | None = None) -> None:
    """Ask the operating system to start reading a slice, and everything it is computed from, so
    that the read overlaps with other work. A source opts in with a `prefetch` method; wrappers
    without one are looked through (`source`, `pretrained`/`finetuned`, linear terms)."""
    fn = getattr(source, "prefetch", None)
    if callable(fn):
        fn(key, start, stop)
        return
    inner: list[object] = [getattr(source, a) for a in ("source", "pretrained", "finetuned") if hasattr(source, a)]
    inner += [src for _, src in getattr(source, "terms", [])]
    for src in inner:
        prefetch(src, key, start, stop)


@contextmanager
def byte_progress(total: int, description: str, enabled: bool) -> Iterator[Callable[[int], None]]:
    """A rich progress bar over bytes; yields a function that advances it."""
    if not enabled:
        yield lambda n: None
        return
    columns = [
        TextColumn("{task.description}"),
        BarColumn(),
        DownloadColumn(),
        TransferSpeedColumn(),
        TimeRemainingColumn(),
    ]
    with Progress(*columns, transient=False) as bar:
        task = bar.add_task(description, total=total)
        yield lambda n: bar.advance(task, n)


_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_THRESHOLD = -1, -2, -3
_keep_depth = 0
_keep_lock = threading.Lock()


def _libc() -> ctypes.CDLL | None:
    try:
        libc = ctypes.CDLL(None)
        return libc if hasattr(libc, "mallopt") and hasattr(libc, "malloc_trim") else None
    except OSError:
        return None


@contextmanager
def keep_freed_memory() -> Iterator[None]:
    """Inside, the C allocator (glibc) keeps the memory of freed slices for the next ones instead
    of returning it to the system after each: otherwise every new slice faults its pages in
    again, which costs more CPU than the arithmetic of a streamed merge. The memory is given back
    on exit. Elsewhere than glibc this does nothing."""
    global _keep_depth
    libc = _libc()
    with _keep_lock:
        _keep_depth += 1
        if libc is not None and _keep_depth == 1:
            libc.mallopt(_M_MMAP_THRESHOLD, 32 << 20)  # slices below 32 MiB come from the heap...
            libc.mallopt(_M_TRIM_THRESHOLD, 1 << 30)  # ...which is not shrunk each time one is freed
            libc.mallopt(_M_TOP_PAD, 64 << 20)  # nor is a worker thread's extra heap unmapped once empty
    try:
        yield
    finally:
        with _keep_lock:
            _keep_depth -= 1
            if libc is not None and _keep_depth == 0:
                libc.mallopt(_M_TRIM_THRESHOLD, 128 << 10)
                libc.mallopt(_M_TOP_PAD, 128 << 10)
                libc.malloc_trim(0)


@contextmanager
def frozen_gc() -> Iterator[None]:
    """Inside, the objects alive at entry are left out of Python's full garbage collections
    (`gc.freeze`): a streamed pass makes many small tensors, which triggers full collections, and
    each would scan every object of torch and the model libraries while the other threads wait
    on the interpreter lock. The objects go back to the collector on exit. Nothing is frozen when
    objects already are (by an enclosing pass, or by the caller's own `gc.freeze`, left as it is)."""
    with _keep_lock:
        own = gc.get_freeze_count() == 0
        if own:
            gc.freeze()
    try:
        yield
    finally:
        if own:
            with _keep_lock:
                gc.unfreeze()


@contextmanager
def one_torch_thread() -> Iterator[None]:
    """Run torch kernels single-threaded inside: the caller parallelises over slices instead
    (kernels of several threads at once would each start a team of OpenMP threads that spin)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


SliceFn = Callable[[str, int, int], torch.Tensor]


def write_checkpoint(
    out: str | os.PathLike[str],
    specs: dict[str, TensorSpec],
    slice_fn: SliceFn,
    *,
    max_shard_bytes: int = DEFAULT_SHARD_BYTES,
    metadata: dict[str, str] | None = None,
    overwrite: bool = False,
    chunk_elems: int = CHUNK_ELEMS,
    progress: bool = False,
    description: str = "writing",
    workers: int = PIPELINE_WORKERS,
    extra_files: Callable[[Path], None] | None = None,
    prefetch_fn: Callable[[str, int, int], None] | None = None,
) -> Path:
    """Write every tensor of `specs`, asking `slice_fn(key, start, stop)` for each flat slice.

    Slices are computed by `workers` threads a few slices ahead of the writer (reads and torch
    kernels release the GIL), so disk reads overlap with compute and with each other; they are
    written strictly in order. Memory holds at most `2 * workers` slices in flight.
    `extra_files(tmp)` adds non-weight files to a folder output before it is renamed into place.
    `prefetch_fn(key, start, stop)`, if given, is called for the slice `PREFETCH_AHEAD` jobs
    ahead of the one being computed, to start its reads early.
    """
    out = Path(out)
    total = sum(s.nbytes for s in specs.values())
    with (
        keep_freed_memory(),
        frozen_gc(),
        CheckpointWriter(
            out, specs, max_shard_bytes=max_shard_bytes, metadata=metadata, overwrite=overwrite, extra_files=extra_files
        ) as w,
    ):
        jobs = [(key, s, e) for key in w.order for s, e in chunks(specs[key].numel, chunk_elems)]

        def start(i: int) -> None:  # job i is about to be computed: start reading a later one
            if prefetch_fn is not None:
                if i == 0:
                    for job in jobs[:PREFETCH_AHEAD]:
                        prefetch_fn(*job)
                if i + PREFETCH_AHEAD < len(jobs):
                    prefetch_fn(*jobs[i + PREFETCH_AHEAD])

        with byte_progress(total, description, progress) as advance:
            if workers <= 1:
                for i, (key, s, e) in enumerate(jobs):
                    start(i)
                    w.write(key, slice_fn(key, s, e))
                    advance((e - s) * specs[key].dtype.itemsize)
            else:
                with one_torch_thread(), ThreadPoolExecutor(workers, thread_name_prefix="taskvec-slice") as pool:
                    pending: deque[tuple[str, int, int, Future[torch.Tensor]]] = deque()
                    try:
                        for i, (key, s, e) in enumerate(jobs):
                            start(i)
                            pending.append((key, s, e, pool.submit(slice_fn, key, s, e)))
                            if len(pending) >= 2 * workers:
                                k0, s0, e0, fut = pending.popleft()
                                w.write(k0, fut.result())
                                advance((e0 - s0) * specs[k0].dtype.itemsize)
                        while pending:
                            k0, s0, e0, fut = pending.popleft()
                            w.write(k0, fut.result())
                            advance((e0 - s0) * specs[k0].dtype.itemsize)
                    finally:
                        for *_, fut in pending:
                            fut.cancel()
    return out
