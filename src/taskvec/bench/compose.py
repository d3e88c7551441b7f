"""Learned compositions on a real suite: the variational composer and its learned-coefficient
baselines, trained on the validation splits (labels) or on unlabeled test inputs (AdaMerging's
entropy objective), scored on the test splits."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from pydantic import Field

from taskvec.bench.models import forward_features
from taskvec.bench.run import Prepared, prepare
from taskvec.bench.suites import get_suite
from taskvec.config import Strict, load_yaml_config
from taskvec.variational import (
    ComposeData,
    Composer,
    ComposerConfig,
    ComposeTrainConfig,
    EvalResult,
    TrainConfig,
    compute_features,
    evaluate_composer,
    load_composer,
    preset,
    save_composer,
    train_composer,
)

BN_STATS = ["*running_mean", "*running_var"]
"""Not composed on the suites: BatchNorm statistics stay at the pretrained values during fine-tuning,
so every task vector is zero there and a coefficient on them would learn nothing."""


def suite_composer(name: str, **overrides: Any) -> ComposerConfig:
    """Preset `name` with overrides; BatchNorm statistics excluded unless `exclude` is given."""
    overrides.setdefault("exclude", BN_STATS)
    return preset(name, **overrides)


class ComposeRunConfig(Strict):
    """`taskvec compose train` config: a suite, a composer preset with overrides, and training options.

        suite: tiny
        preset: variational        # see taskvec.variational.PRESETS
        composer: {kl_weight: 0.0001}
        train: {epochs: 5, batch_size: 64, lr: 0.001}
    """

    suite: str
    preset: str = "variational"
    composer: dict[str, Any] = Field(default_factory=dict)
    train: TrainConfig = Field(default_factory=TrainConfig)
    cache: str | None = None

    def train_config(self) -> ComposeTrainConfig:
        return ComposeTrainConfig(composer=suite_composer(self.preset, **self.composer), train=self.train)


def suite_data(prep: Prepared, split: str, labels: bool = True) -> ComposeData:
    """All tasks' `split` stacked: inputs, frozen pretrained features f0(x), task index, labels."""
    names = list(prep.tasks)
    parts = [getattr(prep.tasks[t], split) for t in names]
    if isinstance(parts[0].x, dict):
        inputs: Any = {k: torch.cat([p.x[k] for p in parts]) for k in parts[0].x}  # type: ignore[index]
    else:
        inputs = torch.cat([p.x for p in parts])  # type: ignore[misc]
    prep.backbone.load_state_dict(prep.pretrained)
    feats = compute_features(prep.backbone, inputs, forward_fn=forward_features)
    tasks = torch.cat([torch.full((len(p),), i, dtype=torch.long) for i, p in enumerate(parts)])
    y = torch.cat([p.y for p in parts]) if labels else None
    return ComposeData(inputs, feats, tasks, y)


def task_parts(prep: Prepared) -> tuple[list[Any], list[torch.nn.Module]]:
    """The suite's task vectors and frozen heads, in task order."""
    names = list(prep.tasks)
    return [prep.task_vector(t) for t in names], [prep.heads[t] for t in names]


def train_on_suite(cfg: ComposeRunConfig, out: Path, *, overwrite: bool = False) -> tuple[Composer, EvalResult, Prepared]:
    """Train the configured composer on the suite and save it; returns it with its test result."""
    prep = prepare(get_suite(cfg.suite), Path(cfg.cache) if cfg.cache else None)
    tcfg = cfg.train_config()
    entropy = tcfg.composer.objective == "entropy"
    data = suite_data(prep, "test", labels=False) if entropy else suite_data(prep, "val")
    tvs, heads = task_parts(prep)
    composer = train_composer(prep.backbone, tvs, heads, data, tcfg, forward_fn=forward_features, task_names=list(prep.tasks))
    save_composer(composer, out, overwrite=overwrite)
    return composer, evaluate_on_suite(composer, prep, tcfg.train.eval_mode, tcfg.train.eval_samples), prep


def evaluate_on_suite(composer: Composer, prep: Prepared, mode: str = "deterministic", samples: int = 8) -> EvalResult:
    return evaluate_composer(composer, suite_data(prep, "test"), mode=mode, samples=samples)


def load_on_suite(path: Path, suite: str, cache: Path | None = None) -> tuple[Composer, Prepared]:
    prep = prepare(get_suite(suite), cache)
    tvs, heads = task_parts(prep)
    return load_composer(path, prep.backbone, tvs, heads, forward_fn=forward_features), prep


def load_run_config(path: str | Path) -> ComposeRunConfig:
    return load_yaml_config(path, ComposeRunConfig)
