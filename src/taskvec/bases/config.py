"""`taskvec bases build` YAML config: which task vectors, and how to build their bases."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

from pydantic import AliasPath, BaseModel, Field, SerializeAsAny, field_validator, model_validator

from taskvec.bases.fit import BASES, ClusterOptions
from taskvec.config import DtypeName, Strict, TaskSource, load_yaml_config
from taskvec.core.source import open_task, source_label
from taskvec.core.taskvector import TaskVector
from taskvec.io.writer import parse_size
from taskvec.registry import validation_error

TaskEntry = TaskSource  # one task of a bank: a saved task vector, or a fine-tuned checkpoint


FLAT_OPTIONS = ("merge", "merge_params", "seed", "temperature", "steps", "lr", "normalize")
"""Options of the built-in methods that may also be given at the top level (the flat form)."""


class BasesConfig(Strict):
    """Example::

    method:                  # a bases method (taskvec.bases.fit.BASES) and its own options
      kind: cluster          # cluster | learned | pca
      merge: ties            # cluster only: mean | task_arithmetic | ties | ...
      merge_params: {density: 0.2}
    m: null                  # null: from the eigengap
    dtype: float16
    tasks:
      - {name: sentiment, task_vector: tvs/sentiment.safetensors}
      - {name: topic, finetuned: ft/topic}      # needs `base`

    `method: cluster` with the method's options at the top level (`merge: ties`) works too.
    """

    method: str = Field(
        "cluster",
        validation_alias=AliasPath("method", "method"),
        description="a bases method: cluster | learned | pca (taskvec.bases.fit.BASES)",
    )
    method_options: SerializeAsAny[Strict] = Field(
        default_factory=lambda: ClusterOptions(),
        validation_alias="method",
        description="the options of `method` (given inside `method`, or beside it)",
    )
    m: int | None = Field(None, ge=1)
    tasks: list[TaskEntry] = Field(min_length=1)
    base: str | None = None
    include: list[str] | None = None
    exclude: list[str] | None = None
    affinity: Literal["clip", "shift"] = "clip"
    max_m: int | None = Field(None, ge=1)
    dtype: DtypeName | None = None
    shard_size: str | int = "2GB"

    @model_validator(mode="before")
    @classmethod
    def _nest(cls, data: Any) -> Any:
        """`method: {kind: name, ...options}`, or `method: name` with its options at the top level:
        both become `method: {method: name, ...options}`, read by `method` and `method_options`."""
        if not isinstance(data, Mapping):
            return data
        data = dict(data)
        method = data.pop("method", "cluster")
        flat = {k: data.pop(k) for k in FLAT_OPTIONS if k in data}
        if "method_options" in data:  # a dumped config read back
            method = {**data.pop("method_options"), "method": method}
        if isinstance(method, Mapping):
            if flat:
                raise validation_error(f"{', '.join(flat)}: give the method's options inside `method`, not beside it")
            options = dict(method)
            options["method"] = options.pop("kind", options.get("method", "cluster"))
        else:
            options = {"method": method, **flat}
        data["method"] = options
        return data

    @field_validator("method_options", mode="before")
    @classmethod
    def _options(cls, v: Any) -> BaseModel:
        return BASES.parse(v)

    @field_validator("shard_size")
    @classmethod
    def _size(cls, v: str | int) -> str | int:
        if parse_size(v) <= 0:
            raise ValueError("must be positive")
        return v

    @model_validator(mode="after")
    def _base(self) -> BasesConfig:
        if any(t.finetuned for t in self.tasks) and self.base is None:
            raise ValueError("tasks given as 'finetuned' checkpoints need 'base'")
        return self

    def resolve_paths(self, root: Path) -> BasesConfig:
        """Paths are relative to the config file's folder."""

        def fix(p: str | None) -> str | None:
            return None if p is None else str(root / p if not Path(p).is_absolute() else Path(p))

        tasks = [
            t.model_copy(update={"task_vector": fix(t.task_vector), "finetuned": fix(t.finetuned), "lora": fix(t.lora)})
            for t in self.tasks
        ]
        return self.model_copy(update={"tasks": tasks, "base": fix(self.base)})

    def options(self) -> dict[str, Any]:
        """Keyword options of `build_bank` for this method: its own options, affinity and max_m."""
        own = self.method_options.model_dump()
        own.pop("method", None)
        return {"affinity": self.affinity, "max_m": self.max_m, **own}


def load_bases_config(path: str | Path) -> BasesConfig:
    return load_yaml_config(path, BasesConfig)


def task_vectors_of(cfg: BasesConfig, *, allow_nonfinite: bool = False) -> tuple[list[TaskVector], list[str]]:
    """Open every task of the config lazily; a task without a name is named after its file."""
    tvs = [
        open_task(t, cfg.base, include=cfg.include, exclude=cfg.exclude, allow_nonfinite=allow_nonfinite)
        for t in cfg.tasks
    ]
    return tvs, [source_label(t) for t in cfg.tasks]
