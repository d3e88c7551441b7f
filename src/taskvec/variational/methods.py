"""The registry of coefficient models a composer can learn: a name, its config and a builder.

A builder takes the ComposerConfig and the sizes (feature dim D, tasks T, blocks B) and returns
the coefficient module: `forward(f0, noise) -> (alpha, kl)` for training, `coefficients(f0)` for
the deterministic test-time alpha ((N, T, B) per sample, or (T, B) shared). A new method is one
file that calls `register_composer` (plus its test); `ComposerConfig.method` then accepts it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import nn

from taskvec.registry import Kind, Registry

CoefBuilder = Callable[[Any, int, int, int], nn.Module]
COMPOSERS: Registry[CoefBuilder] = Registry("composer method", key="method")
OBJECTIVES: dict[str, tuple[str, ...]] = {}
"""The training objectives each method accepts ('supervised', 'entropy')."""


def register_composer(
    name: str, build: CoefBuilder, *, objectives: tuple[str, ...] = ("supervised", "entropy"), doc: str = ""
) -> Kind[CoefBuilder]:
    """Add a composer method; `build(config, feature_dim, num_tasks, num_blocks)` makes its module."""
    from taskvec.variational.config import ComposerConfig

    OBJECTIVES[name] = objectives
    return COMPOSERS.register(name, ComposerConfig, build, doc)


def build_coefficients(config: Any, feature_dim: int, num_tasks: int, num_blocks: int) -> nn.Module:
    """The coefficient module of `config.method`."""
    return COMPOSERS.get(config.method).build(config, feature_dim, num_tasks, num_blocks)
