"""One-call training of the shared-coefficient baselines (the loop is taskvec.variational.train)."""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial
from typing import Literal

from torch import nn

from taskvec.variational.config import ComposeTrainConfig, TrainConfig, preset
from taskvec.variational.data import ComposeData
from taskvec.variational.engine import ForwardFn, TaskVectorLike, default_forward
from taskvec.variational.train import Composer, train_composer

_PRESETS = {"supervised": "atlas", "entropy": "adamerging"}


def train_shared(
    backbone: nn.Module,
    task_vectors: Sequence[TaskVectorLike],
    heads: Sequence[nn.Module],
    data: ComposeData,
    *,
    objective: Literal["supervised", "entropy"],
    level: str = "block",
    train: TrainConfig | None = None,
    forward_fn: ForwardFn = default_forward,
    **composer_options: object,
) -> Composer:
    """Coefficients shared by all samples, per task ('task') or per task and block ('block'), learned
    with objective 'supervised' (aTLAS: cross-entropy on labelled, validation data) or 'entropy'
    (AdaMerging: the prediction entropy on unlabeled, test inputs; `data.labels` may be None)."""
    if objective not in _PRESETS:
        raise ValueError(f"objective must be 'supervised' or 'entropy', not {objective!r}")
    if level not in ("task", "block"):
        raise ValueError(f"level must be 'task' or 'block', not {level!r}")
    composer = preset(f"{_PRESETS[objective]}_{level}", **composer_options)
    cfg = ComposeTrainConfig(composer=composer, train=train or TrainConfig())
    return train_composer(backbone, task_vectors, heads, data, cfg, forward_fn=forward_fn)


train_atlas = partial(train_shared, objective="supervised")
train_atlas.__doc__ = """aTLAS-style: `train_shared` with objective 'supervised', coefficients learned by
cross-entropy on labelled (validation) data."""

train_adamerging = partial(train_shared, objective="entropy")
train_adamerging.__doc__ = """AdaMerging-style: `train_shared` with objective 'entropy', coefficients learned by
minimising the prediction entropy on unlabeled (test) inputs; `data.labels` may be None."""
