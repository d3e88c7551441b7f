"""Where a suite's fitted heads and fine-tuned checkpoints are cached, and how they are written."""

from __future__ import annotations

import os
from pathlib import Path

import torch
from safetensors.torch import save_file

from taskvec.io.atomic import atomic_path


def default_cache() -> Path:
    """$TASKVEC_CACHE, else ~/.cache/taskvec."""
    return Path(os.environ.get("TASKVEC_CACHE", Path.home() / ".cache" / "taskvec"))


def save_atomic(tensors: dict[str, torch.Tensor], path: Path) -> None:
    """Write a safetensors file of the cache through `atomic_path` (the cache is taskvec's own)."""
    with atomic_path(path, overwrite=True, owned=lambda p: None, against_read=False) as tmp:
        save_file({k: v.contiguous() for k, v in tensors.items()}, tmp)
