#!/usr/bin/env python3
"""Where the CPU time of a streamed merge goes: `taskvec merge CONFIG.yaml` run in-process under
cProfile timed by process CPU time, each torch kernel and system call charged to the Python
function that called it, then summed into parts (reading, casts, NaN/inf checks, threshold
selection, TIES election, writing, ...).

Slices are computed by one worker with one torch thread (the threshold pool runs serially too),
so that the profile sees every call; the work is the same as in the parallel run, which adds
thread overhead on top. The page cache is dropped first (needs root), so reads are cold.

Usage
-----
    python3 benchmarks/streaming_merge.py --params 2.5e8 --skip-mergekit --generate-only \
        --workdir /tmp/taskvec-bench-small          # inputs, once
    python3 benchmarks/profile_merge.py /tmp/taskvec-bench-small/configs/taskvec-ties.yaml
"""

from __future__ import annotations

import argparse
import collections
import cProfile
import importlib
import os
import pstats
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch

PARTS = (
    "reading (readahead, pread copies)",
    "dtype casts and copies",
    "NaN/inf checks",
    "arithmetic (ft - base, weighted sum, base + delta)",
    "threshold (radix select)",
    "trim (top-k mask)",
    "sign election + disjoint mean",
    "writing",
    "Python overhead, other",
)
_READ_FUNCS = ("stream.py:read_flat", "stream.py:_last", "stream.py:prefetch", "errors.py:tensor_entry")
_SELECT_FUNCS = (
    "_select32",
    "candidates",
    "_positions",
    "select_threshold",
    "magnitude_threshold",
    "_digits",
    "<lambda>",
)


def part(caller: str, op: str) -> str:
    """The part of the merge a call belongs to: `caller` is 'file.py:function', `op` the builtin it
    called ('(python)' for the function's own time, which includes operators such as `-`)."""
    if op in ("posix_fadvise", "preadv") or caller.startswith(("safetensors_file.py", "sources.py")):
        return PARTS[0]
    if caller in _READ_FUNCS:
        return PARTS[0]
    if caller in ("taskvector.py:_nonfinite", "taskvector.py:all_finite", "compose.py:_nan_as_zero"):
        return PARTS[2]
    if caller == "taskvector.py:cast_checked" and op in ("isfinite", "all"):
        return PARTS[2]
    if op in ("to", "copy_") or caller in ("stream.py:read_cast", "compose.py:tensor_threshold"):
        return PARTS[1]
    if caller.startswith("selection.py:") and caller.split(":")[1] in _SELECT_FUNCS:
        return PARTS[4]
    if caller == "selection.py:trim_by_threshold":
        return PARTS[5]
    if caller == "ties.py:elect_and_merge":
        return PARTS[6]
    if caller in ("functional.py:einsum", "registry.py:weighted_sum", "taskvector.py:add_scaled"):
        return PARTS[3]
    if caller in ("taskvector.py:read_flat", "taskvector.py:read_into") and op in ("(python)", "sub_"):
        return PARTS[3]
    if caller.startswith(("writer.py", "atomic.py")):
        return PARTS[7]
    return PARTS[8]


def _name(func: tuple[str, int, str]) -> str:
    return f"{os.path.basename(func[0])}:{func[2]}"


def _op(builtin: str) -> str:
    """'to' of "<method 'to' of ...>", 'preadv' of '<built-in method posix.preadv>'."""
    return builtin.split("'")[1] if "'" in builtin else builtin.split(".")[-1].rstrip(">")


def rows(stats: pstats.Stats) -> collections.Counter[tuple[str, str]]:
    """CPU seconds per (calling function, builtin or '(python)')."""
    out: collections.Counter[tuple[str, str]] = collections.Counter()
    raw: dict[Any, Any] = stats.stats  # type: ignore[attr-defined]
    for func, (_cc, _nc, tt, _ct, callers) in raw.items():
        if func[0] == "~":  # a builtin: charge each caller its share
            for c, v in callers.items():
                out[(_name(c), _op(func[2]))] += v[2]
        else:
            out[(_name(func), "(python)")] += tt
    return out


class _Serial:
    """Stands in for the threshold pool: the profiler sees only the thread that enabled it."""

    def __init__(self, *args: object, **kwargs: object):
        pass

    def __enter__(self) -> _Serial:
        return self

    def __exit__(self, *exc: object) -> None:
        return None

    def map(self, fn: Callable[[Any], Any], items: Iterable[Any]) -> list[Any]:
        return [fn(x) for x in items]


def profile(config: Path, out: Path) -> tuple[float, float, pstats.Stats]:
    from taskvec.config import load_merge_config
    from taskvec.merge import merge_checkpoints

    torch.set_num_threads(1)
    compose_mod = importlib.import_module("taskvec.methods.compose")
    tv_mod = importlib.import_module("taskvec.core.taskvector")
    compose_mod.ThreadPoolExecutor = _Serial
    write = tv_mod.write_checkpoint
    tv_mod.write_checkpoint = lambda *a, **k: write(*a, **(k | {"workers": 1}))
    cfg = load_merge_config(config)
    shutil.rmtree(out, ignore_errors=True)
    subprocess.run(["sync"], check=False)
    try:
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
    except OSError:
        print("(page cache not dropped: needs root)", file=sys.stderr)
    prof = cProfile.Profile(time.process_time)
    t0, w0 = time.process_time(), time.perf_counter()
    prof.enable()
    merge_checkpoints(cfg, out)
    prof.disable()
    cpu, wall = time.process_time() - t0, time.perf_counter() - w0
    shutil.rmtree(out, ignore_errors=True)
    return cpu, wall, pstats.Stats(prof)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("config", type=Path, help="merge config (e.g. written by streaming_merge.py)")
    ap.add_argument("--out", type=Path, help="where the merged model is written (removed after)")
    ap.add_argument("--top", type=int, default=25, help="calls listed after the parts")
    ap.add_argument("--pstats", type=Path, help="also save the raw profile here")
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        cpu, wall, stats = profile(args.config, args.out or Path(tmp) / "merged")
    if args.pstats:
        stats.dump_stats(args.pstats)
    calls = rows(stats)
    parts: collections.Counter[str] = collections.Counter()
    for (caller, op), t in calls.items():
        parts[part(caller, op)] += t
    total = sum(parts.values())
    print(f"{args.config}: {cpu:.2f} CPU s, {wall:.2f} s wall (profiled, one slice worker)\n")
    print("| part | CPU s | share |\n|---|---:|---:|")
    for name in PARTS:
        print(f"| {name} | {parts[name]:.2f} | {100 * parts[name] / total:.1f}% |")
    print(f"\ntop {args.top} calls (calling function, builtin):")
    for (caller, op), t in calls.most_common(args.top):
        print(f"{100 * t / total:5.1f}% {t:6.2f} s  {caller:40s} {op}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
