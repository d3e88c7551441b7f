"""Where a suite's fitted heads and fine-tuned checkpoints are cached, and how they are written."""

from __future__ import annotations

import os
from pathlib import Path

import torch
from safetensors.torch import save_file


def default_cache() -> Path:
    """$TASKVEC_CACHE, else ~/.cache/taskvec."""
    return Path(os.environ.get("TASKVEC_CACHE", Path.home() / ".cache" / "taskvec"))


def save_atomic(tensors: dict[str, torch.Tensor], path: Path) -> None:
    """Write a safetensors file under a temporary name, then rename it into place."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    save_file({k: v.contiguous() for k, v in tensors.items()}, tmp)
    os.replace(tmp, path)
