"""Disk limits shared by the benchmark scripts: let writeback settle, drop the page cache, time a
sequential read or write."""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path


def _pending_writeback() -> int:
    """Bytes of dirty or in-flight pages (/proc/meminfo Dirty + Writeback); 0 where unknown."""
    try:
        info = dict(line.split(":", 1) for line in Path("/proc/meminfo").read_text().splitlines())
        return sum(int(info[k].split()[0]) * 1024 for k in ("Dirty", "Writeback"))
    except (OSError, KeyError, ValueError):
        return 0


def settle(limit_bytes: int = 64 << 20, timeout_s: float = 300.0) -> float:
    """`sync`, then wait until at most `limit_bytes` are dirty or being written back (files just
    generated are still being written for a while, and a read measured meanwhile competes with
    that writeback). Returns the seconds it took."""
    t0 = time.perf_counter()
    os.sync()
    while _pending_writeback() > limit_bytes and time.perf_counter() - t0 < timeout_s:
        time.sleep(0.5)
        os.sync()
    return time.perf_counter() - t0


def drop_caches(files: list[Path] = []) -> str:  # noqa: B006 (never mutated)
    """Let writeback settle, then evict the page cache: "drop_caches" (root), else "fadvise"
    (each of `files` evicted with posix_fadvise(DONTNEED))."""
    settle()
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


def cold_read(files: list[Path]) -> tuple[float, float, str]:
    """(seconds, GB/s, cache mode) of a sequential read of `files` after writeback settled and
    the page cache was dropped."""
    mode = drop_caches(files)
    s = sequential_read(files)
    return s, sum(p.stat().st_size for p in files) / 1e9 / s, mode


def load_average() -> str:
    """The 1/5/15-minute load averages, as `uptime` prints them."""
    return " / ".join(f"{x:.1f}" for x in os.getloadavg())


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
