"""Composers and bases methods come from registries: a new kind registered in one place is
accepted by the configs and used by the builders, with no other code edited."""

from __future__ import annotations

import copy
from typing import Literal

import pytest
import torch
from pydantic import ValidationError
from torch import nn

from taskvec import TaskVector
from taskvec.bases.config import BasesConfig
from taskvec.bases.fit import BASES, PcaOptions, fit_bases, linear_fit
from taskvec.errors import ConfigError
from taskvec.variational import (
    COMPOSERS,
    ComposerConfig,
    build_composer,
    composer_config,
    preset,
    register_composer,
)
from taskvec.variational.toy import toy_problem


@pytest.fixture(autouse=True)
def _registries_restored(monkeypatch: pytest.MonkeyPatch) -> None:
    """Kinds a test registers are gone after it: tests of other files (in this process, in any
    order) see only the built-in ones."""
    for registry in (COMPOSERS, BASES):
        registry.load()
        for attr in ("_kinds", "_origin", "_presets"):
            monkeypatch.setattr(registry, attr, dict(getattr(registry, attr)))


class TaskWeights(nn.Module):
    """One coefficient per task, the same for every block and sample."""

    noise_channels = 0

    def __init__(self, t: int, b: int, init: float):
        super().__init__()
        self.w = nn.Parameter(torch.full((t, 1), init))
        self.b = b

    def forward(self, f0=None, noise=None):  # type: ignore[no-untyped-def]
        return self.w.expand(-1, self.b), torch.zeros((), dtype=self.w.dtype)

    def coefficients(self, f0=None):  # type: ignore[no-untyped-def]
        return self.w.detach().expand(-1, self.b).clone()


class TaskWeightsConfig(ComposerConfig):
    """Trained with the supervised objective only."""

    method: Literal["task_weights"] = "task_weights"
    objective: Literal["supervised"] = "supervised"


def test_a_registered_composer_is_accepted_and_built() -> None:
    if "task_weights" not in COMPOSERS:
        register_composer(
            "task_weights",
            TaskWeightsConfig,
            lambda cfg, d, t, b: TaskWeights(t, b, cfg.init_coef),
            presets={"task_weights_half": {"init_coef": 0.5}},
        )
    with pytest.raises(ValidationError, match="(?s)objective.*'supervised'"):
        composer_config(method="task_weights", objective="entropy")
    with pytest.raises(ConfigError, match="unknown composer method 'nope'"):
        composer_config(method="nope")
    assert preset("task_weights_half") == TaskWeightsConfig(init_coef=0.5)
    toy = toy_problem()
    c = build_composer(
        copy.deepcopy(toy.backbone),
        toy.task_vectors,
        toy.heads,
        16,
        composer_config(method="task_weights", init_coef=0.4, blocks="tensor"),
    )
    assert isinstance(c.coef, TaskWeights) and c.coef.w.dtype == torch.float64
    with torch.no_grad():
        c.coef.w.fill_(0.4)  # exactly 0.4 in float64 (it was initialised in float32)
    merged = TaskVector.sum([TaskVector.from_tensors(t) for t in toy.task_vectors], [0.4, 0.4]).apply_to(toy.backbone)
    x = toy.test.inputs
    torch.testing.assert_close(c.model(x, c.coefficients(None)), merged(x), atol=1e-12, rtol=1e-12)


def _vectors(t: int = 4, n: int = 30) -> list[TaskVector]:
    g = torch.Generator().manual_seed(0)
    return [
        TaskVector.from_tensors({"w": torch.randn(n, generator=g, dtype=torch.float64)}, name=f"t{i}") for i in range(t)
    ]


def test_a_registered_bases_method_is_accepted_and_fitted() -> None:
    def first_tasks(opts, g, names, m, aff, info):  # type: ignore[no-untyped-def]
        """Bases = the first M task vectors themselves."""
        return linear_fit(opts.method, g, names, torch.eye(g.shape[0], m, dtype=torch.float64), info)

    if "first_tasks" not in BASES:
        BASES.register("first_tasks", PcaOptions, first_tasks)
    tvs = _vectors()
    fit = fit_bases(tvs, method="first_tasks", m=2)
    # tasks 0 and 1 are bases, so they are reconstructed exactly; the others by least squares on them
    assert float(fit.relative_errors()[:2].max()) < 1e-12
    v = torch.stack([tv["w"] for tv in tvs])
    d = torch.linalg.lstsq(v[:2].T, v[2:].T).solution
    ref = (v[2:] - (v[:2].T @ d).T).norm(dim=1) / v[2:].norm(dim=1)
    torch.testing.assert_close(fit.relative_errors()[2:], ref, atol=1e-10, rtol=1e-8)
    cfg = BasesConfig(method="first_tasks", tasks=[{"task_vector": "a.safetensors"}])
    assert cfg.options() == {"affinity": "clip", "max_m": None}
    with pytest.raises(ValueError, match="unknown bases method 'nope'"):
        BasesConfig(method="nope", tasks=[{"task_vector": "a.safetensors"}])
    with pytest.raises(ConfigError, match="unknown option"):
        fit_bases(tvs, method="pca", m=2, nonsense=1)
