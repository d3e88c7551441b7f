"""Where taskvec keeps what it builds for itself."""

from __future__ import annotations

import os
from pathlib import Path


def default_cache() -> Path:
    """$TASKVEC_CACHE, else ~/.cache/taskvec: fitted heads and fine-tuned checkpoints of the
    benchmark suites (`bench/`), and the compiled kernels (`kernels/`)."""
    return Path(os.environ.get("TASKVEC_CACHE", Path.home() / ".cache" / "taskvec"))
