"""Open one task of a config (a merge's model entry, a bank's task) as a task vector."""

from __future__ import annotations

from pathlib import Path

from taskvec.config import TaskSource
from taskvec.core.taskvector import TaskVector
from taskvec.errors import ConfigError
from taskvec.io import CheckpointLike


def source_path(entry: TaskSource) -> str:
    """The file or folder an entry names (its fine-tuned checkpoint, task vector or adapter)."""
    path = entry.finetuned or entry.task_vector or entry.lora
    assert path is not None  # TaskSource holds exactly one
    return path


def source_label(entry: TaskSource) -> str:
    """The entry's name, else its file's name without `.safetensors`."""
    return entry.name or Path(source_path(entry)).name.removesuffix(".safetensors")


def open_task(
    entry: TaskSource,
    base: CheckpointLike | None,
    *,
    include: list[str] | None = None,
    exclude: list[str] | None = None,
    allow_nonfinite: bool = False,
) -> TaskVector:
    """The task vector of `entry`, lazily: a fine-tuned checkpoint minus `base` (names matched as
    for a suite's `finetuned:`, see `align_names`), a saved task vector or low-rank file, or a PEFT
    LoRA adapter of `base`; restricted to `include`/`exclude` globs. NaN or infinite values are an
    error naming the tensor when read, unless `allow_nonfinite`."""
    if entry.finetuned is not None:
        if base is None:
            raise ConfigError(f"{entry.finetuned}: a fine-tuned checkpoint needs the 'base' it was tuned from")
        return TaskVector.from_checkpoints(
            base,
            entry.finetuned,
            include=include,
            exclude=exclude or None,
            name=entry.name,
            allow_nonfinite=allow_nonfinite,
        )
    if entry.lora is not None:
        tv = TaskVector.from_lora(entry.lora, base, name=entry.name, allow_nonfinite=allow_nonfinite)
    else:
        tv = TaskVector.load(source_path(entry), allow_nonfinite=allow_nonfinite)
        tv.name = entry.name or tv.name
    return tv.filter(include, exclude or None) if include or exclude else tv
