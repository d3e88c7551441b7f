"""Where a suite's fitted heads and fine-tuned checkpoints are cached, how they are written, and
what the cache holds."""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file

from taskvec.errors import ConfigError, TaskVecError
from taskvec.io.atomic import atomic_path
from taskvec.io.safetensors_file import SafetensorsFile


def default_cache() -> Path:
    """$TASKVEC_CACHE, else ~/.cache/taskvec."""
    return Path(os.environ.get("TASKVEC_CACHE", Path.home() / ".cache" / "taskvec"))


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


@dataclass
class CacheEntry:
    """One task of a suite in the cache: its folder, recipe hash, and fine-tuned checkpoint (if made)."""

    suite: str
    task: str
    recipe: str
    folder: Path
    finetuned: Path | None
    bytes: int

    @property
    def unfinished(self) -> bool:
        """A fine-tuning was started and saved its progress but has not finished."""
        return self.finetuned is None and (self.folder / "state.pt").exists()


def cache_entries(cache: Path | None = None) -> list[CacheEntry]:
    """Every task folder of the cache (`bench/<suite>/<task>-<recipe>/`), by suite then task."""
    root = (cache or default_cache()) / "bench"
    out = []
    for stamp in sorted(root.glob("*/*/recipe.json")):
        folder = stamp.parent
        try:
            info = json.loads(stamp.read_text())
        except (OSError, ValueError):
            continue  # not written by taskvec
        if not isinstance(info, dict):
            continue
        ft = folder / "finetuned.safetensors"
        size = sum(p.stat().st_size for p in folder.iterdir() if p.is_file())
        out.append(
            CacheEntry(
                str(info.get("suite", folder.parent.name)),
                str(info.get("task", folder.name.rsplit("-", 1)[0])),
                str(info.get("hash", "")),
                folder,
                ft if ft.is_file() else None,
                size,
            )
        )
    return sorted(out, key=lambda e: (e.suite, e.task, str(e.folder)))


def cached_checkpoint(suite: str, task: str, cache: Path | None = None) -> Path:
    """The fine-tuned checkpoint of `task` of `suite` (a suite file, a built-in name, or a suite
    name found in the cache). Its tensors carry the suite's `model.` wrapper prefix; `merge`,
    `extract` and `bases build` match them to a base's names."""
    from taskvec.bench.suite import load_suite

    entries = cache_entries(cache)
    where = cache or default_cache()
    try:
        spec = load_suite(suite)
    except ConfigError:
        if Path(suite).suffix in (".yaml", ".yml") or Path(suite).exists():
            raise
        spec = None  # a suite known only by the name its cache entries record
    if spec is not None:
        if task not in {t.name for t in spec.tasks}:
            raise ConfigError(
                f"suite {spec.name!r} has no task {task!r}; tasks: {', '.join(t.name for t in spec.tasks)}"
            )
        folder = where / "bench" / spec.name / spec.cache_name(spec.task(task))
        found = [e for e in entries if e.folder == folder]
    else:
        found = [e for e in entries if e.suite == suite and e.task == task]
        if len(found) > 1:
            raise ConfigError(
                f"{where}: {len(found)} cached recipes of task {task!r} of suite {suite!r} "
                f"({', '.join(e.folder.name for e in found)}); pass the suite file to choose"
            )
        if not found:
            known = sorted({e.suite for e in entries})
            raise ConfigError(
                f"{where}: nothing cached for task {task!r} of suite {suite!r}"
                + (f"; cached suites: {', '.join(known)}" if known else "")
            )
    if not found or found[0].finetuned is None:
        raise ConfigError(
            f"{where}: task {task!r} of suite {suite!r} has no fine-tuned checkpoint in the cache yet; "
            "`taskvec bench run` makes it"
        )
    assert found[0].finetuned is not None
    return found[0].finetuned
