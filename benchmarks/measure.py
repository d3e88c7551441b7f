"""Disk limits shared by the benchmark scripts: drop the page cache, time a sequential read or write."""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path


def drop_caches(files: list[Path] = []) -> str:  # noqa: B006 (never mutated)
    """Evict the page cache: "drop_caches" (root), else "fadvise" (each of `files` evicted)."""
    subprocess.run(["sync"], check=False)
    try:
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        return "drop_caches"
    except OSError:
        for p in files:
            fd = os.open(p, os.O_RDONLY)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            os.close(fd)
        return "fadvise"


def sequential_read(files: list[Path], block: int = 16 << 20) -> float:
    """Seconds to read the files once, in order, with 16 MiB reads."""
    mv = memoryview(bytearray(block))
    t0 = time.perf_counter()
    for p in files:
        with open(p, "rb", buffering=0) as f:
            while f.readinto(mv):
                pass
    return time.perf_counter() - t0


def sequential_write(path: Path, nbytes: int, block: int = 16 << 20) -> float:
    """Seconds to write `nbytes` to a new file with 16 MiB writes, fsync included (the file is removed)."""
    buf = os.urandom(block)
    t0 = time.perf_counter()
    with open(path, "wb", buffering=0) as f:
        for _ in range(0, nbytes, block):
            f.write(buf)
        os.fsync(f.fileno())
    dt = time.perf_counter() - t0
    path.unlink()
    return dt
