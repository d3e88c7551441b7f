"""Where a suite's fitted heads and fine-tuned checkpoints are cached, and how they are written
(`bench/cache_index.py` lists what the cache holds)."""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from pathlib import Path

import torch
from safetensors.torch import save_file

from taskvec.errors import TaskVecError
from taskvec.io.atomic import atomic_path
from taskvec.io.safetensors_file import SafetensorsFile


def save_atomic(tensors: dict[str, torch.Tensor], path: Path) -> None:
    """Write a safetensors file of the cache through `atomic_path` (the cache is taskvec's own)."""
    with atomic_path(path, overwrite=True, owned=lambda p: None, against_read=False) as tmp:
        save_file({k: v.contiguous() for k, v in tensors.items()}, tmp)


def load_cached(
    path: Path, like: Mapping[str, torch.Tensor] | None = None, keys: tuple[str, ...] = ()
) -> dict[str, torch.Tensor] | None:
    """The tensors of a cache file, or None (with a warning) when it is damaged or does not fit:
    not a whole safetensors file, other tensor names or shapes than `like`, or without `keys`.
    The caller then recomputes the entry and replaces it."""
    why = None
    try:
        f = SafetensorsFile(path)
        try:
            tensors = {k: f.read(k) for k in f.keys()}
        finally:
            f.close()
    except (TaskVecError, OSError) as e:
        why = str(e)
    else:
        if like is not None and (set(tensors) != set(like) or any(tensors[k].shape != like[k].shape for k in like)):
            why = "its tensors do not match the backbone's"
        elif any(k not in tensors for k in keys):
            why = f"it lacks {', '.join(k for k in keys if k not in tensors)}"
    if why is None:
        return tensors
    warnings.warn(f"{path}: damaged cache entry ({why}); computing it again", stacklevel=2)
    return None
