"""The worked examples of docs/extending.md run as written: each code block is executed as a module
of its own (registering its kind), the tests it defines are run, and each kind is then used."""

from __future__ import annotations

import re
import sys
import types
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from taskvec import TaskVector
from taskvec.bases import fit_bases
from taskvec.bases.config import BasesConfig
from taskvec.bases.fit import BASES
from taskvec.bench.backbones import BACKBONES, backbone_spec, load_backbone
from taskvec.bench.heads import HEADS, HeadContext, build_head
from taskvec.bench.sources import SOURCES, load_source
from taskvec.methods import METHODS, compose
from taskvec.variational import COMPOSERS, PRESETS, composer_config

DOC = Path(__file__).resolve().parents[1] / "docs" / "extending.md"


@pytest.fixture
def examples(monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    """Every python block of the page executed in order, each in a namespace of its own; the
    registries are restored after the test."""
    for registry in (METHODS, COMPOSERS, HEADS, SOURCES, BASES, BACKBONES):
        registry.load()
        for attr in ("_kinds", "_origin", "_presets"):
            monkeypatch.setattr(registry, attr, dict(getattr(registry, attr)))
    blocks = re.findall(r"```python\n(.*?)```", DOC.read_text(), flags=re.S)
    assert len(blocks) >= 8
    merged: dict[str, Any] = {}
    for i, code in enumerate(blocks):
        module = types.ModuleType(f"extending_example_{i}")
        monkeypatch.setitem(sys.modules, module.__name__, module)
        ns = module.__dict__
        exec(compile(code, f"{DOC}:block{i}", "exec"), ns)
        for name, obj in ns.items():
            if name.startswith("test_") and callable(obj):
                obj()  # the example's own test
        merged.update({k: v for k, v in ns.items() if not k.startswith("__")})
    return merged


def test_the_worked_examples_register_and_work(examples: dict[str, Any], tmp_path: Path) -> None:
    # merge method
    a, b = torch.tensor([2.0, -1.0]), torch.tensor([-3.0, 0.5])
    tvs = [TaskVector.from_tensors({"w": a}), TaskVector.from_tensors({"w": b})]
    torch.testing.assert_close(compose(tvs, "largest", [1.0, 1.0])["w"], torch.tensor([-3.0, -1.0]))

    # composer preset and kind
    assert PRESETS["atlas_half"] == {"method": "shared", "objective": "supervised", "blocks": "all", "init_coef": 0.5}
    assert "task_weights" in COMPOSERS and composer_config(method="task_weights").init_coef == 0.3

    # head
    cfg = HEADS.get_config({"kind": "fixed", "weight": [[1.0, 0.0], [0.0, 2.0]], "bias": [0.5, 0.0]})
    head = build_head(cfg, HeadContext(backbone=None, task=None, cache=tmp_path, root=tmp_path))
    torch.testing.assert_close(head(torch.tensor([[1.0, 1.0]])), torch.tensor([[1.5, 2.0]]))

    # backbone
    loaded = load_backbone(backbone_spec(kind="random_projection", pixels=4, width=3), tmp_path)
    images = np.arange(8, dtype=np.uint8).reshape(2, 2, 2)
    lin = loaded.module[1]
    ref = torch.from_numpy(images).float().reshape(2, 4) / 255 @ lin.weight.T + lin.bias
    torch.testing.assert_close(loaded.module(loaded.encode(images)), ref)
    assert loaded.kind == "images" and lin.out_features == 3

    # data source
    (tmp_path / "reviews").mkdir()
    (tmp_path / "reviews" / "bad.txt").write_text("awful\n\nboring\n")
    (tmp_path / "reviews" / "good.txt").write_text("great\n")
    raw = load_source(SOURCES.get_config({"kind": "txt_folder", "path": "reviews"}), tmp_path)
    assert raw.x == ["awful", "boring", "great"] and raw.classes == ["bad", "good"]
    assert np.array_equal(raw.y, [0, 0, 1])

    # bases method, in memory and from a config with nested options
    g = torch.Generator().manual_seed(0)
    vs = [
        TaskVector.from_tensors({"w": torch.randn(20, generator=g, dtype=torch.float64)}, name=f"t{i}")
        for i in range(4)
    ]
    fit = fit_bases(vs, method="first_tasks", m=2)
    assert float(fit.relative_errors()[:2].max()) < 1e-12
    assert BasesConfig(method={"kind": "first_tasks"}, tasks=[{"task_vector": "a"}]).method == "first_tasks"
