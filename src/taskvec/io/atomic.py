"""Put a finished temporary file or folder in place of its destination, never half-written."""

from __future__ import annotations

import os
import shutil
from pathlib import Path


def replace_path(tmp: Path, out: Path) -> None:
    """Move `tmp` to `out`, replacing any previous `out` (file or folder) only once `tmp` is complete."""
    old = out.parent / f".{out.name}.old-{os.getpid()}"
    if out.exists():
        os.replace(out, old)
    os.replace(tmp, out)
    if old.exists():
        shutil.rmtree(old) if old.is_dir() else old.unlink()


def write_text_atomic(path: Path, text: str) -> None:
    """Write `text` to a temporary file beside `path` (fsynced), then rename it into place."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.partial-{os.getpid()}"
    try:
        with open(tmp, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
