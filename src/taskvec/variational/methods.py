"""The registry of composer kinds: the coefficient models a composer can learn.

A kind is a name, its own config (a subclass of `ComposerConfig`: the options every composer has,
plus its own), a builder and its named presets, registered in one call in the kind's own file:

    register_composer("shared", SharedConfig, build_shared, presets={"atlas_task": {"blocks": "all"}})

The builder takes the config and the sizes (feature dim D, tasks T, blocks B) and returns the
coefficient module: `forward(f0, noise) -> (alpha, kl)` for training, `coefficients(f0)` for the
deterministic test-time alpha ((N, T, B) per sample, or (T, B) shared). The objectives a kind is
trained with are the values its config's `objective` field accepts. Built-in kinds are the modules
of this folder; other packages add kinds through the entry-point group `taskvec.composers`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, Literal

from pydantic import Field, model_validator
from torch import nn

from taskvec.config import Strict
from taskvec.registry import Kind, Registry

Strategy = Literal["auto", "linear", "batched"]


class ComposerConfig(Strict):
    """What is learned; the options every composer kind has. `method` names the kind
    (COMPOSERS: 'variational', 'sample_specific', 'shared', ...), whose config adds its own options.
    blocks: 'tensor', 'module', 'all' (task-level), globs or a map."""

    method: str = Field(default="variational", description="a registered composer kind (taskvec.variational.COMPOSERS)")
    objective: Literal["supervised", "entropy"] = "supervised"
    blocks: str | list[str] | dict[str, list[str]] = "tensor"
    include: list[str] | None = None
    exclude: list[str] = Field(default_factory=list)
    strategy: Strategy | dict[str, Strategy] = "auto"
    init_coef: float = Field(default=0.3, description="initial coefficient of every task vector and block")

    @model_validator(mode="after")
    def _blocks(self) -> ComposerConfig:
        if isinstance(self.blocks, str) and self.blocks not in ("tensor", "module", "all"):
            raise ValueError("blocks: use 'tensor', 'module', 'all', a list of globs or a {name: [globs]} map")
        return self

    def kl_scale(self) -> float:
        """The weight of the KL term in the training loss (0: the kind has no prior)."""
        return 0.0


CoefBuilder = Callable[[Any, int, int, int], nn.Module]
COMPOSERS: Registry[CoefBuilder] = Registry(
    "composer method", key="method", group="taskvec.composers", package=__name__.rpartition(".")[0]
)
"""Composer kinds by name: their config, builder and presets (`COMPOSERS.presets`)."""


def register_composer(name: str, config: type[ComposerConfig], build: CoefBuilder, **kwargs: Any) -> Kind[CoefBuilder]:
    """Add a composer kind: `config` its options (a ComposerConfig subclass whose `method` is
    `name`), `build(config, feature_dim, num_tasks, num_blocks)` its module; `doc` and `presets`
    (named option sets of it, e.g. ablations) as for `Registry.register`."""
    if not issubclass(config, ComposerConfig):
        raise TypeError(f"composer {name!r}: its config must subclass ComposerConfig")
    return COMPOSERS.register(name, config, build, **kwargs)


def composer_config(options: Mapping[str, Any] | None = None, /, **overrides: Any) -> ComposerConfig:
    """The config of the composer kind `method` (default 'variational') from its options: a pydantic
    ValidationError names a bad option, a ConfigError an unknown kind."""
    values = {"method": "variational", **(options or {}), **overrides}
    cfg = COMPOSERS.get(str(values["method"])).config(**values)
    assert isinstance(cfg, ComposerConfig)
    return cfg


def build_coefficients(config: ComposerConfig, feature_dim: int, num_tasks: int, num_blocks: int) -> nn.Module:
    """The coefficient module of `config.method`."""
    kind = COMPOSERS.get(config.method)
    if not isinstance(config, kind.config):
        config = composer_config(config.model_dump())
    return kind.build(config, feature_dim, num_tasks, num_blocks)
