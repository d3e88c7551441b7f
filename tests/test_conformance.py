"""The contract every registered kind keeps, checked for each one in its registry: a kind added in
one file (or by another package) is tested here without being named.

- merge methods: merging a slice equals slicing the merge; a merge streamed from files equals one
  in memory; float32 agrees with the float64 merge; a bad option is an error naming it.
- composer kinds and presets: each builds on a toy problem and trains one step.
- data sources, heads and backbones: a config missing a required option, or with an unknown one,
  is refused with an error naming it.
"""

from __future__ import annotations

import copy
import math
from pathlib import Path

import pytest
import torch

from taskvec.bench.backbones import BACKBONES
from taskvec.bench.heads import HEADS
from taskvec.bench.sources import SOURCES
from taskvec.core import TaskVector
from taskvec.errors import ConfigError
from taskvec.methods import METHODS, compose, get_method
from taskvec.registry import Registry
from taskvec.variational import COMPOSERS, PRESETS, ComposeTrainConfig, TrainConfig, build_composer, preset
from taskvec.variational.train import train_composer

WEIGHTS = [1.0, 0.5, 0.8]


def _states(dtype: torch.dtype = torch.float64) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(11)
    shapes = {"a.weight": (13, 7), "a.bias": (13,), "b.weight": (5, 3, 3), "c": (1,)}
    return [{k: torch.randn(s, generator=g, dtype=torch.float64).to(dtype) for k, s in shapes.items()} for _ in WEIGHTS]


def _vectors(dtype: torch.dtype = torch.float32) -> list[TaskVector]:
    return [TaskVector.from_tensors(s, name=f"t{i}") for i, s in enumerate(_states(dtype))]


def _merged(tvs: list[TaskVector], name: str) -> dict[str, torch.Tensor]:
    return compose(tvs, name, WEIGHTS).to_state_dict()


# --------------------------------------------------------------------------- merge methods


def check_merge_method(name: str, tmp_path: Path) -> None:
    """Every contract of a merge method."""
    test_merging_a_slice_equals_slicing_the_merge(name)
    test_streamed_from_files_equals_in_memory(name, tmp_path)
    test_float32_agrees_with_the_float64_merge(name)
    test_bad_options_are_errors_naming_them(name)


@pytest.mark.parametrize("name", METHODS.names())
def test_merging_a_slice_equals_slicing_the_merge(name: str) -> None:
    merged = compose(_vectors(), name, WEIGHTS)
    for key in merged.keys():
        whole = merged.source.read_flat(key)
        n = whole.numel()
        for step in (1, 4, 7):
            parts = [merged.source.read_flat(key, s, min(s + step, n)) for s in range(0, n, step)]
            assert torch.equal(torch.cat(parts), whole), f"{name}: tensor {key!r} read in slices of {step}"


@pytest.mark.parametrize("name", METHODS.names())
def test_streamed_from_files_equals_in_memory(name: str, tmp_path: Path) -> None:
    tvs = _vectors()
    loaded = [TaskVector.load(tv.save(tmp_path / f"{tv.name}.safetensors")) for tv in tvs]
    in_memory, streamed = _merged(tvs, name), _merged(loaded, name)
    assert in_memory.keys() == streamed.keys()
    for k in in_memory:
        assert torch.equal(in_memory[k], streamed[k]), f"{name}: tensor {k!r}"


@pytest.mark.parametrize("name", METHODS.names())
def test_float32_agrees_with_the_float64_merge(name: str) -> None:
    ref, got = _merged(_vectors(torch.float64), name), _merged(_vectors(torch.float32), name)
    for k in ref:
        assert ref[k].dtype == torch.float64 and got[k].dtype == torch.float32
        torch.testing.assert_close(got[k].double(), ref[k], rtol=1e-5, atol=1e-5, msg=f"{name}: tensor {k!r}")


@pytest.mark.parametrize("name", METHODS.names())
def test_bad_options_are_errors_naming_them(name: str) -> None:
    tvs = _vectors()
    with pytest.raises(ConfigError, match=rf"{name}.*nonsense"):
        compose(tvs, name, WEIGHTS, nonsense=1)
    for field in get_method(name).params.model_fields:
        with pytest.raises(ConfigError, match=rf"{name}.*{field}"):
            compose(tvs, name, WEIGHTS, **{field: math.nan})


# --------------------------------------------------------------------------- composers


@pytest.fixture(scope="module")
def toy():  # type: ignore[no-untyped-def]
    from taskvec.variational.toy import toy_problem

    return toy_problem(n=64)


def _one_step(toy, composer):  # type: ignore[no-untyped-def]
    cfg = ComposeTrainConfig(
        composer=composer, train=TrainConfig(epochs=1, batch_size=32, progress=False, dtype="float64")
    )
    torch.manual_seed(0)
    before = build_composer(copy.deepcopy(toy.backbone), toy.task_vectors, toy.heads, 16, cfg.composer)
    torch.manual_seed(0)
    after = train_composer(copy.deepcopy(toy.backbone), toy.task_vectors, toy.heads, toy.train, cfg, max_steps=1)
    assert len(after.history) == 1 and math.isfinite(after.history[0]["loss"])
    alpha = after.coefficients(toy.test.features)
    assert torch.isfinite(alpha).all() and alpha.shape[-2] == len(toy.task_vectors)
    moved = [
        not torch.equal(a.double(), b.double())
        for a, b in zip(before.coef.state_dict().values(), after.coef.state_dict().values(), strict=True)
    ]
    assert any(moved), "one optimizer step changed no coefficient parameter"


@pytest.mark.parametrize("name", COMPOSERS.names())
def test_every_composer_kind_builds_and_trains_one_step(toy, name: str) -> None:  # type: ignore[no-untyped-def]
    _one_step(toy, COMPOSERS.get(name).config(method=name))


@pytest.mark.parametrize("name", list(PRESETS))
def test_every_composer_preset_builds_and_trains_one_step(toy, name: str) -> None:  # type: ignore[no-untyped-def]
    cfg = preset(name)
    assert cfg.method == PRESETS[name]["method"] and isinstance(cfg, COMPOSERS.get(cfg.method).config)
    _one_step(toy, cfg)


def test_composer_options_of_another_kind_are_refused() -> None:
    with pytest.raises(ValueError, match="kl_weight"):
        preset("atlas_task", kl_weight=0.1)  # only the variational kind has a KL term


# --------------------------------------------------------------------------- data sources, heads, backbones


def _kinds(registry: Registry) -> list[tuple[Registry, str]]:  # type: ignore[type-arg]
    return [(registry, name) for name in registry.names()]


# Options a kind needs beside its required ones (a rule between options rather than a required field).
COMPANIONS: dict[tuple[str, str], dict[str, object]] = {("backbone kind", "factory"): {"images": {"size": 8}}}


@pytest.mark.parametrize(
    ("registry", "name"), _kinds(SOURCES) + _kinds(HEADS) + _kinds(BACKBONES), ids=lambda x: getattr(x, "what", x)
)
def test_configs_refuse_unknown_and_missing_options(registry: Registry, name: str) -> None:  # type: ignore[type-arg]
    check_config(registry, name)


def check_config(registry: Registry, name: str) -> None:  # type: ignore[type-arg]
    config = registry.get(name).config
    required = [f for f, info in config.model_fields.items() if info.is_required() and f != registry.key]
    filled = {f: _example(config.model_fields[f].annotation) for f in required}
    filled.update(COMPANIONS.get((registry.what, name), {}))
    ok = registry.get_config({registry.key: name, **filled})
    assert type(ok) is config
    with pytest.raises(ConfigError, match="nonsense"):
        registry.get_config({registry.key: name, **filled, "nonsense": 1})
    for f in required:
        with pytest.raises(ConfigError, match=f):
            registry.get_config({registry.key: name, **{k: v for k, v in filled.items() if k != f}})
    with pytest.raises(ConfigError, match=f"unknown {registry.what} 'nope'"):
        registry.get_config({registry.key: "nope"})


def _example(annotation: object) -> object:
    """A valid value of a required option (they are paths, names and module:function strings)."""
    text = str(annotation)
    assert "str" in text, f"add an example value for a required option of type {text}"
    return "some/path"


# --------------------------------------------------------------------------- kinds of another package

PLUGIN = """
from typing import Literal

import torch
from pydantic import Field
from torch import nn

from taskvec.config import Strict
from taskvec.methods.registry import MergeMethod, MethodParams
from taskvec.registry import Kind
from taskvec.variational.methods import COMPOSERS


class LargestParams(MethodParams):
    scale: float = Field(1.0, gt=0)


def merge_largest(deltas, weights, params, ctx):
    \"\"\"Per entry, the weighted delta of largest magnitude.\"\"\"
    w = weights.to(deltas.dtype)[:, None] * deltas
    return params.scale * w.gather(0, w.abs().argmax(0, keepdim=True)).squeeze(0)


METHOD = MergeMethod("largest", "the weighted entry of largest magnitude", LargestParams, merge_largest)


class FixedHead(Strict):
    \"\"\"A linear head given in the suite file.\"\"\"

    kind: Literal["fixed"]
    weight: list[list[float]]
    bias: list[float] | None = None


def build_fixed(cfg, ctx):
    w = torch.tensor(cfg.weight)
    head = nn.Linear(w.shape[1], w.shape[0])
    with torch.no_grad():
        head.weight.copy_(w)
        head.bias.copy_(torch.tensor(cfg.bias) if cfg.bias is not None else torch.zeros(w.shape[0]))
    return head


HEAD = Kind("fixed", FixedHead, build_fixed, "a linear head given in the suite file")


class RandomFeatures(Strict):
    \"\"\"A seeded random linear map of flattened images.\"\"\"

    kind: Literal["random_features"]
    width: int = Field(4, ge=1)
    pixels: int


def build_random_features(cfg, root):
    from taskvec.bench.backbones import Backbone

    torch.manual_seed(0)
    module = nn.Sequential(nn.Flatten(), nn.Linear(cfg.pixels, cfg.width))
    return Backbone(module.eval(), lambda x: torch.as_tensor(x, dtype=torch.float32) / 255, "images")


BACKBONE = Kind("random_features", RandomFeatures, build_random_features, "a seeded random linear map")


def presets():
    COMPOSERS.add_preset("atlas_half", "shared", {"objective": "supervised", "blocks": "all", "init_coef": 0.5})
"""

ENTRY_POINTS = """
[taskvec.merge_methods]
largest = tvconform:METHOD

[taskvec.heads]
fixed = tvconform:HEAD

[taskvec.backbones]
random_features = tvconform:BACKBONE

[taskvec.composers]
atlas_half = tvconform:presets
"""


@pytest.fixture
def plugin(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):  # type: ignore[no-untyped-def]
    """An installed distribution, as pip leaves it, adding a merge method, a head, a backbone and
    a composer preset through entry points; the registries are restored after."""
    import sys

    for registry in (METHODS, HEADS, BACKBONES, COMPOSERS):
        registry.load()
        for attr in ("_kinds", "_origin", "_presets"):
            monkeypatch.setattr(registry, attr, dict(getattr(registry, attr)))
    site = tmp_path / "site"
    info = site / "tvconform-1.0.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: tvconform\nVersion: 1.0\n")
    (info / "entry_points.txt").write_text(ENTRY_POINTS)
    (site / "tvconform.py").write_text(PLUGIN)
    monkeypatch.syspath_prepend(str(site))
    yield site
    sys.modules.pop("tvconform", None)


def test_kinds_of_another_package_are_found_and_keep_the_contract(plugin: Path, tmp_path: Path, toy) -> None:  # type: ignore[no-untyped-def]
    from taskvec.bench.heads import HeadContext, build_head

    # the merge method: listed, from its package, the same contract as the built-in ones, right values
    assert "largest" in METHODS.names() and METHODS.source("largest") == "tvconform"
    check_merge_method("largest", tmp_path)
    tvs = _vectors(torch.float64)
    got = compose(tvs, "largest", WEIGHTS, scale=2.0).to_state_dict()
    for k in got:
        stack = torch.stack([w * tv[k] for w, tv in zip(WEIGHTS, tvs, strict=True)])
        ref = 2.0 * stack.gather(0, stack.abs().argmax(0, keepdim=True)).squeeze(0)
        torch.testing.assert_close(got[k], ref, rtol=0, atol=0)

    # the head: its config is validated like the built-in ones', and it builds
    assert "fixed" in HEADS.names() and HEADS.source("fixed") == "tvconform"
    with pytest.raises(ConfigError, match="nonsense"):
        HEADS.get_config({"kind": "fixed", "weight": [[1.0]], "nonsense": 1})
    cfg = HEADS.get_config({"kind": "fixed", "weight": [[1.0, 0.0], [0.5, 2.0]], "bias": [0.0, 1.0]})
    head = build_head(cfg, HeadContext(backbone=None, task=None, cache=tmp_path, root=tmp_path))
    x = torch.tensor([[1.0, 2.0]])
    torch.testing.assert_close(head(x), torch.tensor([[1.0, 5.5]]))
    assert not any(p.requires_grad for p in head.parameters())

    # the backbone: validated in a suite like the built-in ones, and it builds
    from taskvec.bench.backbones import load_backbone
    from taskvec.bench.suite import SuiteSpec

    assert "random_features" in BACKBONES.names() and BACKBONES.source("random_features") == "tvconform"
    split = {"train": 1, "val": 1, "test": 1}
    suite = {"name": "s", "tasks": [{"name": "t", "data": {"kind": "npz", "path": "d.npz"}, "split": split}]}
    with pytest.raises(ValueError, match="nonsense"):
        SuiteSpec(**suite, backbone={"kind": "random_features", "pixels": 4, "nonsense": 1})
    spec = SuiteSpec(**suite, backbone={"kind": "random_features", "pixels": 4, "width": 3})
    loaded = load_backbone(spec.backbone, tmp_path)
    images = torch.arange(8, dtype=torch.uint8).view(2, 2, 2)
    lin = loaded.module[1]
    ref = (images.float() / 255).view(2, 4) @ lin.weight.T + lin.bias
    torch.testing.assert_close(loaded.module(loaded.encode(images)), ref)

    # the composer preset: a preset of the 'shared' kind, which builds and trains like the others
    assert "atlas_half" in PRESETS and COMPOSERS.source("atlas_half") == "tvconform"
    cfg_c = preset("atlas_half")
    assert cfg_c.method == "shared" and cfg_c.init_coef == 0.5 and cfg_c.blocks == "all"
    _one_step(toy, cfg_c)
