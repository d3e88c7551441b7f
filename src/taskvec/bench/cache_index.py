"""What the cache of fine-tuned checkpoints holds: `taskvec cache list` and `taskvec cache path`."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from taskvec.bench.suite import load_suite
from taskvec.errors import ConfigError
from taskvec.paths import default_cache


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
