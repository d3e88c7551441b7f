"""Learned coefficients shared by all samples (aTLAS- and AdaMerging-style)."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from taskvec import TaskVector
from taskvec.coefficients import SharedCoefficients, train_adamerging, train_atlas
from taskvec.variational import (
    ComposeData,
    TrainConfig,
    build_composer,
    evaluate_composer,
    preset,
)
from taskvec.variational.toy import toy_problem

TRAIN = TrainConfig(epochs=6, batch_size=32, lr=2e-2, progress=False, dtype="float64")

pytestmark = pytest.mark.usefixtures("one_thread")


def _entropy(composer, data: ComposeData) -> float:
    total = 0.0
    with torch.no_grad():
        alpha = composer.coefficients(None)
        for _, _, logits in composer.logits(data.inputs, alpha, data.tasks):
            logp = F.log_softmax(logits, -1)
            total -= float((logp.exp() * logp).sum())
    return total / len(data)


def test_shared_forward_is_task_arithmetic() -> None:
    toy = toy_problem()
    c = build_composer(copy.deepcopy(toy.backbone), toy.task_vectors, toy.heads, 16, preset("atlas_task"))
    assert isinstance(c.coef, SharedCoefficients) and c.coef.alpha.shape == (2, 1)
    with torch.no_grad():
        c.coef.alpha.copy_(torch.tensor([[0.7], [-0.2]], dtype=torch.float64))
    merged = TaskVector.sum([TaskVector.from_tensors(t) for t in toy.task_vectors], [0.7, -0.2]).apply_to(toy.backbone)
    x = toy.test.inputs
    torch.testing.assert_close(c.model(x, c.coefficients(None)), merged(x), atol=1e-12, rtol=1e-12)


def test_atlas_learns_from_labels() -> None:
    toy = toy_problem()
    before = evaluate_composer(
        build_composer(copy.deepcopy(toy.backbone), toy.task_vectors, toy.heads, 16, preset("atlas_block")), toy.test
    ).mean_accuracy
    for level, blocks in (("task", 1), ("block", 6)):
        c = train_atlas(copy.deepcopy(toy.backbone), toy.task_vectors, toy.heads, toy.train, level=level, train=TRAIN)
        assert c.coef.alpha.shape == (2, blocks)
        assert c.history[-1]["loss"] < c.history[0]["loss"]
    assert evaluate_composer(c, toy.test).mean_accuracy >= before


def test_adamerging_minimises_entropy_without_labels() -> None:
    toy = toy_problem()
    unlabeled = ComposeData(toy.test.inputs, toy.test.features, toy.test.tasks, None)
    start = build_composer(copy.deepcopy(toy.backbone), toy.task_vectors, toy.heads, 16, preset("adamerging_block"))
    c = train_adamerging(copy.deepcopy(toy.backbone), toy.task_vectors, toy.heads, unlabeled, train=TRAIN)
    assert _entropy(c, unlabeled) < _entropy(start, unlabeled)
    assert not torch.equal(c.coef.alpha, start.coef.alpha.to(c.coef.alpha))
