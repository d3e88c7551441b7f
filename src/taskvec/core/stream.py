"""The per-tensor streaming plan: every output tensor is computed slice by slice and written
as it is produced, so peak memory is a few slices whatever the size of the model."""

from __future__ import annotations

import os
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


def chunks(numel: int, size: int = CHUNK_ELEMS) -> Iterator[tuple[int, int]]:
    """Flat [start, stop) ranges that cover `numel` elements."""
    if numel == 0:
        yield 0, 0
        return
    for s in range(0, numel, size):
        yield s, min(numel, s + size)


class LastSliceCache:
    """Remembers the last slice read from a source: many task vectors share one base, and each
    slice of the base is then read from disk once instead of once per task vector."""

    def __init__(self, source: Source):
        self.source = source
        self.name = source.name
        self._last: tuple[tuple[str, int, int | None], torch.Tensor] | None = None

    def keys(self) -> list[str]:
        return self.source.keys()

    def spec(self, key: str) -> TensorSpec:
        return self.source.spec(key)

    def read_flat(self, key: str, start: int = 0, stop: int | None = None) -> torch.Tensor:
        tag = (key, start, stop)
        last = self._last  # one read of the attribute: safe when slices are computed in threads
        if last is not None and last[0] == tag:
            return last[1]
        value = self.source.read_flat(key, start, stop)
        self._last = (tag, value)
        return value


@contextmanager
def byte_progress(total: int, description: str, enabled: bool) -> Iterator[Callable[[int], None]]:
    """A rich progress bar over bytes; yields a function that advances it."""
    if not enabled:
        yield lambda n: None
        return
    columns = [TextColumn("{task.description}"), BarColumn(), DownloadColumn(), TransferSpeedColumn(), TimeRemainingColumn()]
    with Progress(*columns, transient=False) as bar:
        task = bar.add_task(description, total=total)
        yield lambda n: bar.advance(task, n)


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
) -> Path:
    """Write every tensor of `specs`, asking `slice_fn(key, start, stop)` for each flat slice.

    Slices are computed by `workers` threads a few slices ahead of the writer (reads and torch
    kernels release the GIL), so disk reads overlap with compute and with each other; they are
    written strictly in order. Memory holds at most `2 * workers` slices in flight.
    `extra_files(tmp)` adds non-weight files to a folder output before it is renamed into place.
    """
    out = Path(out)
    total = sum(s.nbytes for s in specs.values())
    with CheckpointWriter(
        out, specs, max_shard_bytes=max_shard_bytes, metadata=metadata, overwrite=overwrite, extra_files=extra_files
    ) as w:
        jobs = [(key, s, e) for key in w.order for s, e in chunks(specs[key].numel, chunk_elems)]
        with byte_progress(total, description, progress) as advance:
            if workers <= 1:
                for key, s, e in jobs:
                    w.write(key, slice_fn(key, s, e))
                    advance((e - s) * specs[key].dtype.itemsize)
            else:
                with ThreadPoolExecutor(workers, thread_name_prefix="taskvec-slice") as pool:
                    pending: deque[tuple[str, int, int, Future[torch.Tensor]]] = deque()
                    it = iter(jobs)
                    try:
                        for key, s, e in it:
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
