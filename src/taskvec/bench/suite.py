"""A suite: a pretrained backbone, tasks with their data, splits and heads, and fine-tuned checkpoints.

A suite is a YAML file (validated by pydantic; errors name the file and the key path). The built-in
suites are such files shipped in `taskvec/bench/suites/` and loaded by name through the same code:

    name: my-suite
    backbone: {hf: models/my-bert, pool: mean, text: {max_length: 128}}
    head: {kind: linear_probe}                  # default head of every task
    finetune: {epochs: 2, lr: 5.0e-5}           # recipe for tasks without `finetuned:`
    tasks:
      - name: sentiment
        data: {kind: csv, path: data/sentiment.csv, text: review, label: stars}
        split: {train: 0.6, val: 0.2, test: 0.2}           # seeded fractions, or counts
        finetuned: checkpoints/bert-sentiment/            # a checkpoint you already have
      - name: topic
        data:                                             # splits given as files
          train: {kind: jsonl, path: data/topic-train.jsonl}
          val: {kind: jsonl, path: data/topic-val.jsonl}
          test: {kind: jsonl, path: data/topic-test.jsonl}
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    SerializeAsAny,
    ValidationError,
    field_validator,
    model_validator,
)

from taskvec.bases.fit import BASES
from taskvec.bench.backbones import Backbone, backbone_fields, parse_backbone
from taskvec.bench.data import Split
from taskvec.bench.heads import HEADS
from taskvec.bench.sources import SOURCES, RawData, load_source
from taskvec.config import Strict, known_name, load_yaml_config
from taskvec.errors import ConfigError, format_validation_error
from taskvec.methods import METHODS, get_method
from taskvec.methods.registry import MethodParams
from taskvec.registry import validation_error
from taskvec.variational import PRESETS, TrainConfig, preset

SPLITS = ("train", "val", "test")


class SplitSpec(Strict):
    """Sizes of the seeded train/val/test cut of one data source: counts (integers) or fractions of
    the data (floats in (0, 1]); the three parts are disjoint."""

    train: int | float = Field(gt=0)
    val: int | float = Field(gt=0)
    test: int | float = Field(gt=0)

    @model_validator(mode="after")
    def _fractions(self) -> SplitSpec:
        parts = [self.train, self.val, self.test]
        fracs = [p for p in parts if isinstance(p, float)]
        if any(f > 1 for f in fracs):
            raise ValueError("a fraction must lie in (0, 1]; give counts as integers")
        if len(fracs) == 3 and sum(fracs) > 1 + 1e-9:
            raise ValueError(f"fractions sum to {sum(fracs):g} > 1")
        return self

    def counts(self, n: int) -> tuple[int, int, int]:
        c = [p if isinstance(p, int) else int(p * n) for p in (self.train, self.val, self.test)]
        return c[0], c[1], c[2]


class FinetuneSpec(Strict):
    """Recipe of the fine-tuning the tool runs (and caches) for a task without `finetuned:`."""

    epochs: int = Field(default=1, ge=1)
    batch_size: int = Field(default=32, ge=1)
    lr: float = Field(default=1e-4, gt=0)
    weight_decay: float = Field(default=0.0, ge=0)
    warmup_frac: float = Field(default=0.1, ge=0, le=1)
    max_grad_norm: float = Field(default=1.0, gt=0)


def _head(v: Any) -> Any:
    return None if v is None else HEADS.parse(v)


class TaskSpec(Strict):
    """One task: its data (one source cut by `split`, or a source per split), its head (default:
    the suite's), and optionally a fine-tuned checkpoint you already have."""

    name: str = Field(pattern=r"^[A-Za-z0-9_.\-]+$")
    data: SerializeAsAny[BaseModel] | dict[str, SerializeAsAny[BaseModel]]
    split: SplitSpec | None = None
    head: SerializeAsAny[BaseModel] | None = None
    finetuned: str | None = Field(default=None, description="checkpoint of the fine-tuned backbone (file or folder)")
    cache_key: str | None = Field(
        default=None, description="name of this task's cache entry (default: a hash of its recipe)"
    )
    items_sha256: str | None = Field(
        default=None,
        pattern=r"^[0-9a-f]{64}$",
        description="sha256 of the task's items and labels in every split (see `items_digest`); a "
        "data set that no longer gives these exact items is refused",
    )

    @field_validator("data", mode="before")
    @classmethod
    def _data(cls, v: Any) -> Any:
        if isinstance(v, dict) and "kind" not in v and set(v) == set(SPLITS):
            return {s: SOURCES.parse(v[s]) for s in SPLITS}
        if isinstance(v, dict) and "kind" not in v and set(v) & set(SPLITS):
            raise ValueError(f"per-split data needs all of train, val and test; got {', '.join(v)}")
        return SOURCES.parse(v)

    _task_head = field_validator("head", mode="before")(_head)

    @model_validator(mode="after")
    def _split(self) -> TaskSpec:
        if isinstance(self.data, BaseModel) and self.split is None:
            raise ValueError("one data source needs 'split' (train/val/test counts or fractions)")
        if isinstance(self.data, dict) and self.split is not None:
            raise ValueError("'split' cuts one data source; the data here is already given per split")
        return self


STATIC_DEFAULTS: dict[str, dict[str, Any]] = {
    "task_arithmetic": {},
    "ties": {"density": 0.2},
    "dare": {"density": 0.5, "seed": 0},
    "magnitude": {"density": 0.2},
}
"""The static merges `bench run` composes when a suite names none, with their params."""


def static_params(value: Any) -> dict[str, MethodParams]:
    """`{method: {param: value}}` validated through each merge method's params class."""
    if not isinstance(value, dict):
        raise validation_error("a mapping of merge methods to their params, e.g. {ties: {density: 0.2}}")
    out: dict[str, MethodParams] = {}
    for name, params in value.items():
        if name not in METHODS:
            raise validation_error(f"unknown merge method {name!r}; known: {', '.join(METHODS.known())}")
        try:
            out[name] = get_method(name).params.model_validate(params or {})
        except ValidationError as e:
            raise validation_error(f"{name}.{format_validation_error(e)}") from None
    return out


class BankSpec(Strict):
    """The bank of bases `bench run` builds from the task vectors: M bases (default ceil(T/2)), a
    bases method (taskvec.bases.fit.BASES) with its own options beside it (`merge: ties`, ...),
    and the affinity and max_m of `build_bank`."""

    model_config = ConfigDict(extra="allow")  # the method's own options, checked by its config below

    m: int | None = Field(default=None, ge=1)
    method: str = "cluster"
    affinity: Literal["clip", "shift"] | None = None
    max_m: int | None = Field(default=None, ge=1)

    @model_validator(mode="after")
    def _method_options(self) -> BankSpec:
        BASES.parse({"method": self.method, **self.method_options()})
        return self

    def method_options(self) -> dict[str, Any]:
        """The bases method's own options, as given."""
        return dict(self.model_extra or {})

    def options(self) -> dict[str, Any]:
        """Every option as given in the suite (what the bank stage's key is made of)."""
        return self.model_dump(mode="json", exclude_unset=True)


class PresetSpec(Strict):
    """Overrides of one learned-composition preset: composer fields (checked against the preset's
    composer kind) and training options (those set override the suite's `train`)."""

    composer: dict[str, Any] = Field(default_factory=dict)
    train: TrainConfig = Field(default_factory=TrainConfig)


class ComposeSpec(Strict):
    """What `bench run` composes, and how the learned compositions train (settings chosen on
    validation data only; the suite file is the place to record them).

        compose:
          static: {task_arithmetic: {}, ties: {density: 0.2}}   # merges and their params
          bases: {m: 2}                           # a bank of M bases (default: M = ceil(T/2))
          learned: [atlas_task, atlas_block, adamerging_block, variational]
          train: {epochs: 10, lr: 1.0e-3}         # every learned preset
          presets: {variational: {composer: {kl_weight: 1.0e-4}}}
    """

    static: dict[str, SerializeAsAny[MethodParams]] = Field(
        default_factory=lambda: static_params(STATIC_DEFAULTS),
        description="static merges and their params (default: task_arithmetic, ties, dare, magnitude)",
    )
    bases: BankSpec | None = Field(default_factory=BankSpec, description="the bank of bases; null: no bank")
    learned: list[str] = Field(default_factory=list, description="presets of taskvec.variational.PRESETS")
    train: TrainConfig = Field(
        default_factory=TrainConfig, description="training options of every learned preset (those set)"
    )
    presets: dict[str, PresetSpec] = Field(default_factory=dict)
    seeds: int = Field(default=1, ge=1, description="seeds of every learned method (mean ± sd when > 1)")

    _static = field_validator("static", mode="before")(static_params)

    @model_validator(mode="after")
    def _known(self) -> ComposeSpec:
        for name in [*self.learned, *self.presets]:
            known_name(name, PRESETS, "composer preset")
        for name, own in self.presets.items():
            try:
                preset(name, **own.composer)
            except ValidationError as e:
                raise ValueError(f"presets.{name}.composer.{format_validation_error(e)}") from None
        return self

    def params(self, method: str) -> dict[str, Any]:
        """The params of a static merge as the suite gives them (none: the method's defaults)."""
        given = self.static.get(method)
        return {} if given is None else given.model_dump(mode="json", exclude_unset=True)

    def train_options(self, name: str) -> dict[str, Any]:
        """The training options preset `name` is given: the suite's, then its own."""
        own = self.presets.get(name)
        return {
            **self.train.model_dump(exclude_unset=True),
            **(own.train.model_dump(exclude_unset=True) if own else {}),
        }


class SuiteSpec(Strict):
    """A suite file (see the module docstring)."""

    name: str = Field(pattern=r"^[A-Za-z0-9_.\-]+$")
    description: str = ""
    backbone: SerializeAsAny[BaseModel]
    tasks: list[TaskSpec] = Field(min_length=1)
    head: SerializeAsAny[BaseModel] = Field(default_factory=lambda: HEADS.parse({"kind": "linear_probe"}))
    finetune: FinetuneSpec = Field(default_factory=FinetuneSpec)
    compose: ComposeSpec = Field(default_factory=ComposeSpec)
    seed: int = 0
    _root: Path = PrivateAttr(default_factory=Path.cwd)
    _source: str = PrivateAttr(default="")

    _suite_head = field_validator("head", mode="before")(_head)
    _backbone = field_validator("backbone", mode="before")(parse_backbone)

    @model_validator(mode="after")
    def _unique(self) -> SuiteSpec:
        names = [t.name for t in self.tasks]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"task names must be unique: {dup}")
        return self

    @property
    def root(self) -> Path:
        """The folder relative paths of the file are taken from."""
        return self._root

    @property
    def source(self) -> str:
        """The built-in suite's name, or the absolute path of the file the suite was read from."""
        return self._source

    def resolve_paths(self, root: Path) -> SuiteSpec:
        """Keep the file's folder: relative paths are read from there."""
        self._root = root.resolve()
        return self

    def task(self, name: str) -> TaskSpec:
        for t in self.tasks:
            if t.name == name:
                return t
        raise ConfigError(f"suite {self.name!r} has no task {name!r}; tasks: {', '.join(t.name for t in self.tasks)}")

    def head_of(self, task: TaskSpec) -> Any:
        return task.head or self.head

    def backbone_hash(self) -> str:
        """Hash of everything that changes the backbone or its inputs (not the tasks)."""
        paths = [getattr(self.backbone, f, None) for f in ("hf", "checkpoint", "path")]
        return _hash({"backbone": backbone_fields(self.backbone), "root": self._root_if(paths), "seed": self.seed})

    def task_hash(self, task: TaskSpec) -> str:
        """Hash of everything that changes one task's head or fine-tuned checkpoint."""
        t = task.model_dump(mode="json", exclude={"cache_key", "items_sha256"})
        head = self.head_of(task)
        sources = list(task.data.values()) if isinstance(task.data, dict) else [task.data]
        paths = [getattr(x, "path", None) for x in [*sources, head]] + [task.finetuned]
        return _hash(
            {
                "b": self.backbone_hash(),
                "task": t,
                "root": self._root_if(paths),
                "head": head.model_dump(mode="json"),
                "ft": None if task.finetuned else self.finetune.model_dump(mode="json"),
            }
        )

    def _root_if(self, paths: list[str | None]) -> str:
        """The suite's folder if any of `paths` is relative to it (it then names different files)."""
        return str(self._root) if any(p is not None and not Path(p).expanduser().is_absolute() for p in paths) else ""

    def cache_name(self, task: TaskSpec) -> str:
        return f"{task.name}-{task.cache_key or self.task_hash(task)}"


def _hash(obj: object) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:12]


# ----------------------------------------------------------------------------- loading


def builtin_suites() -> list[str]:
    """Names of the suites shipped with taskvec."""
    folder = resources.files("taskvec.bench") / "suites"
    return sorted(p.name.removesuffix(".yaml") for p in folder.iterdir() if p.name.endswith(".yaml"))


def suite_path(name_or_path: str | Path) -> Path:
    """The YAML file of a built-in suite name, or the given file."""
    p = Path(name_or_path)
    if p.suffix in (".yaml", ".yml") or p.exists():
        if not p.is_file():
            raise ConfigError(f"{p}: no such suite file")
        return p
    builtin = resources.files("taskvec.bench") / "suites" / f"{name_or_path}.yaml"
    if not builtin.is_file():
        raise ConfigError(
            f"unknown suite {str(name_or_path)!r}: not a file, and not a built-in suite ({', '.join(builtin_suites())})"
        )
    return Path(str(builtin))


def load_suite(name_or_path: str | Path) -> SuiteSpec:
    """A suite from its YAML file, or a built-in suite by name."""
    path = suite_path(name_or_path)
    spec: SuiteSpec = load_yaml_config(path, SuiteSpec)
    builtin = Path(str(resources.files("taskvec.bench") / "suites")).resolve()
    spec._source = path.stem if path.resolve().parent == builtin else str(path.resolve())
    return spec


# ----------------------------------------------------------------------------- data


@dataclass
class TaskData:
    spec: TaskSpec
    classes: list[str]
    train: Split
    val: Split
    test: Split
    items_sha256: str = ""
    """sha256 of the raw items and labels of the three splits (see `items_digest`)."""


def items_digest(parts: dict[str, RawData]) -> str:
    """sha256 over the splits' raw items (image bytes with their shape, or UTF-8 texts), labels and
    class names, in split order: equal digests mean the same examples in the same splits."""
    h = hashlib.sha256()
    for s in SPLITS:
        p = parts[s]
        h.update(f"{s}:{len(p)}:{json.dumps(p.classes)}".encode())
        if isinstance(p.x, list):
            for t in p.x:
                b = t.encode()
                h.update(len(b).to_bytes(8, "little") + b)
        else:
            x = np.ascontiguousarray(p.x)
            h.update(f"{x.dtype.str}{x.shape}".encode() + x.tobytes())
        h.update(np.ascontiguousarray(p.y, dtype=np.int64).tobytes())
    return h.hexdigest()


def split_indices(
    y: np.ndarray, n_train: int, n_val: int, n_test: int, seed: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Disjoint random train/val/test indices from one seeded permutation."""
    need = n_train + n_val + n_test
    if need > len(y):
        raise ConfigError(f"split asks for {need} items but the data set has {len(y)}")
    perm = np.random.default_rng(seed).permutation(len(y))
    return perm[:n_train], perm[n_train : n_train + n_val], perm[n_train + n_val : need]


def raw_splits(suite: SuiteSpec, task: TaskSpec) -> dict[str, RawData]:
    """The task's raw train/val/test examples (the seeded cut of one source, or the given splits)."""
    if isinstance(task.data, dict):
        parts = {s: load_source(task.data[s], suite.root) for s in SPLITS}
        classes = list(parts["train"].classes)
        for s in ("val", "test"):  # a class missing from one split keeps its index: labels are matched by name
            classes += [c for c in parts[s].classes if c not in classes]
        index = {c: i for i, c in enumerate(classes)}
        for p in parts.values():
            p.y = np.asarray([index[p.classes[v]] for v in p.y], dtype=np.int64)
            p.classes = classes
        return parts
    raw = load_source(task.data, suite.root)
    assert task.split is not None
    seed = int(_hash({"seed": suite.seed, "task": task.name}), 16) % (2**32)
    counts = task.split.counts(len(raw))
    if min(counts) == 0:
        raise ConfigError(f"task {task.name!r}: split {counts} of {len(raw)} items leaves a part empty")
    idx = split_indices(raw.y, *counts, seed=seed)
    return {s: raw.take(i) for s, i in zip(SPLITS, idx, strict=True)}


def load_task(suite: SuiteSpec, task: TaskSpec, backbone: Backbone) -> TaskData:
    """Load a task's data and cut its splits, encoded for the suite's backbone."""
    raw = raw_splits(suite, task)
    digest = items_digest(raw)
    if task.items_sha256 is not None and digest != task.items_sha256:
        raise ConfigError(
            f"task {task.name!r}: the data set no longer gives the suite's items (items_sha256 "
            f"{task.items_sha256}, now {digest}); the installed data differs from the one the suite "
            "was pinned to"
        )
    text = isinstance(raw["train"].x, list)
    if text != (backbone.kind == "text"):
        raise ConfigError(
            f"task {task.name!r}: {'text' if text else 'image'} data, but the backbone takes {backbone.kind}"
        )
    splits = [Split(backbone.encode(raw[s].x), torch.from_numpy(raw[s].y).long()) for s in SPLITS]
    train, val, test = splits
    return TaskData(task, list(raw["train"].classes), train, val, test, items_sha256=digest)
