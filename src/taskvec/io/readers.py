"""Reading input files with limits.

Every JSON file taskvec reads (safetensors headers, shard indexes, bank manifests, adapter
configs) goes through `parse_json`, so a file nested thousands of levels deep or of absurd size is
one clear error, never a `RecursionError` or an exhausted memory. Every input file is checked to
be a regular file first (`check_regular`): a named pipe or a device such as /dev/urandom is
refused at once instead of hanging or reading forever.
"""

from __future__ import annotations

import json
import os
import stat
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from taskvec.errors import CheckpointError

MAX_DEPTH = 64
MAX_BYTES = 256 * 2**20


TRACKED: list[dict[tuple[int, int], str]] = []


@contextmanager
def tracking_inputs() -> Iterator[None]:
    """Within this block, every file taskvec opens for reading is recorded (`note_input`), and no
    output may be, contain or lie inside one of them. The CLI runs each command in such a block."""
    TRACKED.append({})
    try:
        yield
    finally:
        TRACKED.pop()


def note_input(path: str | os.PathLike[str]) -> None:
    """Record `path` as an input of the command running (inside `tracking_inputs`; else nothing)."""
    if not TRACKED:
        return
    try:
        st = os.stat(path)
    except OSError:
        return
    TRACKED[-1][(st.st_dev, st.st_ino)] = os.path.realpath(path)


class JsonLimitError(ValueError):
    """A JSON document is nested too deeply or is too large (a `ValueError`, like a JSON syntax error)."""


def _depth(obj: object) -> int:
    """Nesting depth of parsed JSON, counted without recursion."""
    deepest, stack = 0, [(obj, 1)]
    while stack:
        x, d = stack.pop()
        if isinstance(x, dict):
            x = list(x.values())
        if isinstance(x, list):
            deepest = max(deepest, d)
            if d > MAX_DEPTH:
                return d
            stack.extend((v, d + 1) for v in x if isinstance(v, (dict, list)))
    return deepest


def parse_json(text: str | bytes, *, max_bytes: int = MAX_BYTES, **kwargs: Any) -> Any:
    """`json.loads(text, **kwargs)`, refusing documents over `max_bytes` or nested over `MAX_DEPTH`
    levels with a `JsonLimitError`; bytes must be UTF-8 (`UnicodeDecodeError` otherwise)."""
    if len(text) > max_bytes:
        raise JsonLimitError(f"JSON of {len(text):,} bytes, more than the {max_bytes:,} allowed")
    if isinstance(text, bytes):
        text = text.decode("utf-8")
    try:
        obj = json.loads(text, **kwargs)
    except RecursionError:
        raise JsonLimitError(f"JSON nested more than {MAX_DEPTH} levels deep") from None
    if _depth(obj) > MAX_DEPTH:
        raise JsonLimitError(f"JSON nested more than {MAX_DEPTH} levels deep")
    return obj


def check_regular(path: str | os.PathLike[str]) -> None:
    """Refuse `path` unless it is missing, a folder or a regular file (after symbolic links): a
    named pipe, socket or device is a `CheckpointError` naming it (reading one would hang)."""
    try:
        mode = os.stat(path).st_mode
    except OSError:
        return  # missing or unreadable: the reader reports it
    if not (stat.S_ISREG(mode) or stat.S_ISDIR(mode)):
        kind = (
            "a named pipe"
            if stat.S_ISFIFO(mode)
            else "a device"
            if stat.S_ISCHR(mode) or stat.S_ISBLK(mode)
            else ("a socket" if stat.S_ISSOCK(mode) else "not a regular file")
        )
        raise CheckpointError(f"{path}: is {kind}, not a regular file; refused (taskvec reads only files and folders)")


def read_bytes(path: str | os.PathLike[str], max_bytes: int) -> bytes:
    """The bytes of the regular file `path`, refused (CheckpointError) when over `max_bytes`."""
    check_regular(path)
    note_input(path)
    size = os.stat(path).st_size
    if size > max_bytes:
        raise CheckpointError(f"{path}: is {size:,} bytes, more than the {max_bytes:,} allowed for this file")
    with open(path, "rb") as f:
        return f.read(max_bytes + 1)


def read_text(path: str | os.PathLike[str], max_bytes: int = MAX_BYTES) -> str:
    """The UTF-8 text of the regular file `path`; not UTF-8 or too large is a CheckpointError naming it."""
    raw = read_bytes(path, max_bytes)
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise CheckpointError(f"{path}: is not UTF-8 text (byte {e.start}: {raw[e.start : e.start + 1]!r})") from None


def read_json(path: str | os.PathLike[str], *, max_bytes: int = MAX_BYTES, **kwargs: Any) -> Any:
    """Parse the JSON file `path` with the limits of `parse_json` (its size is checked before reading)."""
    path = Path(path)
    check_regular(path)
    note_input(path)
    size = path.stat().st_size
    if size > max_bytes:
        raise JsonLimitError(f"JSON of {size:,} bytes, more than the {max_bytes:,} allowed")
    with open(path, "rb") as f:
        return parse_json(f.read(max_bytes + 1), max_bytes=max_bytes, **kwargs)
