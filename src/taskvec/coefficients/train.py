"""One-call training of the shared-coefficient baselines (the loop is taskvec.variational.train)."""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn

from taskvec.variational.config import ComposeTrainConfig, TrainConfig, preset
from taskvec.variational.data import ComposeData
from taskvec.variational.engine import ForwardFn, TaskVectorLike, default_forward
from taskvec.variational.train import Composer, train_composer


def _train(
    name: str,
    backbone: nn.Module,
    task_vectors: Sequence[TaskVectorLike],
    heads: Sequence[nn.Module],
    data: ComposeData,
    level: str,
    train: TrainConfig | None,
    forward_fn: ForwardFn,
    **kw: object,
) -> Composer:
    if level not in ("task", "block"):
        raise ValueError(f"level must be 'task' or 'block', not {level!r}")
    cfg = ComposeTrainConfig(composer=preset(f"{name}_{level}", **kw), train=train or TrainConfig())
    return train_composer(backbone, task_vectors, heads, data, cfg, forward_fn=forward_fn)


def train_atlas(
    backbone: nn.Module,
    task_vectors: Sequence[TaskVectorLike],
    heads: Sequence[nn.Module],
    data: ComposeData,
    *,
    level: str = "block",
    train: TrainConfig | None = None,
    forward_fn: ForwardFn = default_forward,
    **composer_options: object,
) -> Composer:
    """aTLAS-style: coefficients shared by all samples, per task ('task') or per task and block
    ('block'), learned by cross-entropy on labelled (validation) data."""
    return _train("atlas", backbone, task_vectors, heads, data, level, train, forward_fn, **composer_options)


def train_adamerging(
    backbone: nn.Module,
    task_vectors: Sequence[TaskVectorLike],
    heads: Sequence[nn.Module],
    data: ComposeData,
    *,
    level: str = "block",
    train: TrainConfig | None = None,
    forward_fn: ForwardFn = default_forward,
    **composer_options: object,
) -> Composer:
    """AdaMerging-style: shared coefficients learned by minimising the prediction entropy on
    unlabeled (test) inputs; `data.labels` may be None."""
    return _train("adamerging", backbone, task_vectors, heads, data, level, train, forward_fn, **composer_options)
