"""`taskvec bases build` YAML config: which task vectors, and how to build their bases."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from taskvec.config import DtypeName, Strict, TaskSource, known_name, load_yaml_config
from taskvec.core.source import open_task, source_label
from taskvec.core.taskvector import TaskVector
from taskvec.io.writer import parse_size

TaskEntry = TaskSource  # one task of a bank: a saved task vector, or a fine-tuned checkpoint


class BasesConfig(Strict):
    """Example::

    method: cluster          # cluster | learned | pca
    m: null                  # null: from the eigengap
    merge: ties              # cluster only: mean | task_arithmetic | ties | ...
    merge_params: {density: 0.2}
    dtype: float16
    tasks:
      - {name: sentiment, task_vector: tvs/sentiment.safetensors}
      - {name: topic, finetuned: ft/topic}      # needs `base`
    """

    method: str = Field("cluster", description="a bases method: cluster | learned | pca (taskvec.bases.fit.BASES)")
    m: int | None = Field(None, ge=1)
    tasks: list[TaskEntry] = Field(min_length=1)
    base: str | None = None
    include: list[str] | None = None
    exclude: list[str] | None = None
    merge: str = "mean"
    merge_params: dict[str, Any] = Field(default_factory=dict)
    affinity: Literal["clip", "shift"] = "clip"
    max_m: int | None = Field(None, ge=1)
    seed: int = 0
    temperature: float = Field(1.0, gt=0)
    steps: int = Field(1000, ge=0)
    lr: float = Field(0.05, gt=0)
    normalize: bool = False
    dtype: DtypeName | None = None
    shard_size: str | int = "2GB"

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

    @field_validator("method")
    @classmethod
    def _known(cls, v: str) -> str:
        from taskvec.bases.fit import BASES

        return known_name(v, BASES.names(), "bases method")

    def options(self) -> dict[str, Any]:
        """Keyword options of `build_bank` for this method: the fields its options model declares."""
        from taskvec.bases.fit import BASES

        own = set(BASES.get(self.method).config.model_fields) - {"method"}
        return {
            "affinity": self.affinity,
            "max_m": self.max_m,
            **{k: getattr(self, k) for k in own if k in type(self).model_fields},
        }


def load_bases_config(path: str | Path) -> BasesConfig:
    return load_yaml_config(path, BasesConfig)


def task_vectors_of(cfg: BasesConfig, *, allow_nonfinite: bool = False) -> tuple[list[TaskVector], list[str]]:
    """Open every task of the config lazily; a task without a name is named after its file."""
    tvs = [
        open_task(t, cfg.base, include=cfg.include, exclude=cfg.exclude, allow_nonfinite=allow_nonfinite)
        for t in cfg.tasks
    ]
    return tvs, [source_label(t) for t in cfg.tasks]
