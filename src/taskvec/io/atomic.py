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
