"""Learned compositions on a prepared suite: the composer presets with the suite's settings, the
stacked splits they learn from (with frozen pretrained features), and one training run scored on
the test splits."""

from __future__ import annotations

import time
from typing import Any

import torch

from taskvec.bench.models import forward_features
from taskvec.bench.prepare import Prepared
from taskvec.progress import bar
from taskvec.variational import (
    ComposeData,
    ComposerConfig,
    ComposeTrainConfig,
    TrainConfig,
    compute_features,
    evaluate_composer,
    preset,
    train_composer,
)

BN_STATS = ["*running_mean", "*running_var"]
"""Not composed by default: when BatchNorm statistics stay at the pretrained values during
fine-tuning, every task vector is zero there and a coefficient on them would learn nothing."""


def suite_composer(name: str, **overrides: Any) -> ComposerConfig:
    """Preset `name` with overrides; BatchNorm statistics excluded unless `exclude` is given."""
    overrides.setdefault("exclude", BN_STATS)
    return preset(name, **overrides)


def stack_data(
    prep: Prepared, parts: list[Any], tasks: torch.Tensor, labels: torch.Tensor | None, *, progress: bool = False
) -> ComposeData:
    """Splits (or encoded inputs) stacked, with frozen pretrained features f0(x) (a progress bar
    while they are computed when `progress`)."""
    if isinstance(parts[0], dict):
        inputs: Any = {k: torch.cat([p[k] for p in parts]) for k in parts[0]}
    else:
        inputs = torch.cat(parts)
    prep.backbone.load_state_dict(prep.pretrained)
    with bar("pretrained features f0(x)", len(tasks), enabled=progress, transient=True) as advance:
        feats = compute_features(prep.backbone, inputs, forward_fn=forward_features, advance=advance)
    return ComposeData(inputs, feats, tasks, labels)


def suite_data(
    prep: Prepared, split: str, labels: bool = True, tasks: list[str] | None = None, *, progress: bool = False
) -> ComposeData:
    """The `split` of every task (or of `tasks`) stacked: inputs, f0(x), task index, labels."""
    names = list(prep.tasks)
    chosen = tasks or names
    parts = [getattr(prep.tasks[t], split) for t in chosen]
    index = torch.cat(
        [torch.full((len(p),), names.index(t), dtype=torch.long) for t, p in zip(chosen, parts, strict=True)]
    )
    y = torch.cat([p.y for p in parts]) if labels else None
    return stack_data(prep, [p.x for p in parts], index, y, progress=progress)


def task_parts(prep: Prepared) -> tuple[list[Any], list[torch.nn.Module]]:
    """The suite's task vectors and frozen heads, in task order."""
    names = list(prep.tasks)
    return [prep.task_vector(t) for t in names], [prep.heads[t] for t in names]


def learned_config(prep: Prepared, name: str, seed: int, init_coef: float | None, progress: bool) -> ComposeTrainConfig:
    """Preset `name` with the suite's `compose` settings (every preset's, then its own)."""
    spec = prep.suite.compose
    own = spec.presets.get(name)
    over: dict[str, Any] = dict(own.composer) if own else {}
    if init_coef is not None:
        over.setdefault("init_coef", init_coef)
    train = {**spec.train_options(name), "seed": seed, "progress": progress}
    return ComposeTrainConfig(composer=suite_composer(name, **over), train=TrainConfig(**train))


def training_data(cfg: ComposeTrainConfig, val: ComposeData, test: ComposeData) -> ComposeData:
    """What a composer learns from: the labelled validation splits, or for an entropy objective
    (AdaMerging) the test inputs without their labels."""
    if cfg.composer.objective == "entropy":
        return ComposeData(test.inputs, test.features, test.tasks)
    return val


def run_learned(
    prep: Prepared,
    name: str,
    seed: int,
    val: ComposeData,
    test: ComposeData,
    *,
    init_coef: float | None = None,
    progress: bool = True,
    config: ComposeTrainConfig | None = None,
    task_vectors: tuple[list[Any], list[str]] | None = None,
    details: bool = False,
    mc: int = 0,
) -> dict[str, Any]:
    """Train preset `name` on the validation splits (or, for an entropy objective, on the unlabeled
    test inputs, as AdaMerging does) and score it on the test splits.

    `config` replaces the suite's settings for the preset (then `init_coef` and `progress` are
    unused); `task_vectors` (vectors, names) replaces the suite's task vectors, e.g. with a bank's
    bases, while the heads stay the suite's. With `details` the result also holds the evaluation
    time, the mean test-time coefficients per (test task, task vector, block), the block names and
    the training history; with `mc` > 0 a variational composer is also scored with that many
    posterior samples ("test_mc")."""
    cfg = config or learned_config(prep, name, seed, init_coef, progress)
    data = training_data(cfg, val, test)
    tvs, heads = task_parts(prep)
    tv_names = list(prep.tasks)
    if task_vectors is not None:
        tvs, tv_names = task_vectors
    prep.backbone.load_state_dict(prep.pretrained)
    t0 = time.perf_counter()
    comp = train_composer(prep.backbone, tvs, heads, data, cfg, forward_fn=forward_features, task_names=tv_names)
    seconds = time.perf_counter() - t0
    t0 = time.perf_counter()
    res = evaluate_composer(comp, test, batch_size=cfg.train.eval_batch_size)
    eval_seconds = time.perf_counter() - t0
    names = list(prep.tasks)
    out: dict[str, Any] = {
        "preset": name,
        "seed": seed,
        "test": {names[i]: a for i, a in res.accuracy.items()},
        "kept": {names[i]: a for i, a in res.active.items()},
        "seconds": seconds,
        "config": cfg.model_dump(mode="json"),
    }
    if details:
        out |= {
            "eval_seconds": eval_seconds,
            "coef_mean": res.coef_mean.tolist(),
            "blocks": list(comp.model.blocks.names),
            "history": comp.history,
        }
    if mc and cfg.composer.method == "variational":
        mc_res = evaluate_composer(comp, test, mode="mc", samples=mc, batch_size=cfg.train.eval_batch_size)
        out["test_mc"] = {names[i]: a for i, a in mc_res.accuracy.items()}
    prep.backbone.float().load_state_dict(prep.pretrained)
    return out
