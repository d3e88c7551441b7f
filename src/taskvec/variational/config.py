"""Pydantic configs of composer training (YAML via taskvec.config.load_yaml_config).

Each composer kind has its own config (a `ComposerConfig` subclass, see
taskvec.variational.methods); `PRESETS` names the standard variants of all kinds, as each kind
registers them. `ComposeTrainConfig` = composer + train.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal

from pydantic import Field, SerializeAsAny, field_validator

from taskvec.config import DtypeName, Strict
from taskvec.variational.methods import COMPOSERS, ComposerConfig, Strategy, composer_config

__all__ = [
    "PRESETS",
    "ComposeTrainConfig",
    "ComposerConfig",
    "GateConfig",
    "PosteriorConfig",
    "PriorConfig",
    "Strategy",
    "TrainConfig",
    "preset",
]


class PriorConfig(Strict):
    """p(gamma, beta) = Bern(pi) N(0, slab_sigma^2); 'gaussian' drops the spike, 'none' drops the KL term."""

    kind: Literal["spike_slab", "gaussian", "none"] = "spike_slab"
    pi: float = Field(default=0.5, gt=0.0, lt=1.0, description="prior inclusion probability")
    slab_sigma: float = Field(default=1.0, gt=0.0, description="prior std of the slab")


class GateConfig(Strict):
    """Gate per coefficient: importance (rho >= min_rho and rho*|mu| >= min_importance) and
    uncertainty (sigma/|mu| <= max_uncertainty); 'none' keeps every coefficient."""

    kind: Literal["both", "importance", "uncertainty", "none"] = "both"
    min_rho: float = Field(default=0.5, gt=0.0, lt=1.0)
    min_importance: float = Field(default=0.01, gt=0.0)
    max_uncertainty: float = Field(default=1.0, gt=0.0)
    temperature: float = Field(default=0.1, gt=0.0, description="of the sigmoid surrogate in log-margin units")
    straight_through: bool = Field(default=True, description="hard gate forward, surrogate gradient backward")


class PosteriorConfig(Strict):
    """The amortized network f0(x) -> (mu, log sigma^2, logit) and its initial outputs."""

    hidden: int = Field(default=128, ge=1)
    init_sigma: float = Field(default=0.05, gt=0.0)
    init_rho: float = Field(default=0.9, gt=0.0, lt=1.0)
    feature_norm: bool = True
    dropout: float = Field(
        default=0.0,
        ge=0.0,
        lt=1.0,
        description="dropout on the hidden layer while training "
        "(regularizes the input dependence on small training sets)",
    )


class TrainConfig(Strict):
    """How it is learned. batch_size is global (split over DDP ranks)."""

    epochs: int = Field(default=10, ge=1)
    batch_size: int = Field(default=64, ge=1)
    lr: float = Field(default=1e-3, gt=0.0)
    bias_lr: float | None = Field(
        default=None,
        gt=0.0,
        description="learning rate of the amortized network's output "
        "biases, the input-independent part of every coefficient (None: lr)",
    )
    weight_decay: float = Field(
        default=0.0,
        ge=0.0,
        description="AdamW decay of the coefficient network's weight "
        "matrices only (its input dependence), never of biases or shared coefficients",
    )
    grad_clip: float | None = Field(default=1.0, gt=0.0)
    seed: int = 0
    train_samples: int = Field(default=1, ge=1, description="Monte-Carlo samples of alpha per input in the ELBO")
    eval_mode: Literal["deterministic", "mc"] = "deterministic"
    eval_samples: int = Field(default=8, ge=1, description="samples averaged by eval_mode 'mc'")
    eval_batch_size: int = Field(default=256, ge=1)
    device: Literal["auto", "cpu", "cuda"] = "auto"
    dtype: DtypeName = "float32"
    progress: bool = True


class ComposeTrainConfig(Strict):
    """`taskvec compose train` config; `composer` is the options of one composer kind (`method`)."""

    composer: SerializeAsAny[ComposerConfig] = Field(default_factory=composer_config)
    train: TrainConfig = Field(default_factory=TrainConfig)

    @field_validator("composer", mode="before")
    @classmethod
    def _kind(cls, v: Any) -> Any:
        return COMPOSERS.parse({"method": "variational", **v}) if isinstance(v, Mapping) else v


PRESETS: Mapping[str, Mapping[str, Any]] = COMPOSERS.presets
"""Every composer preset by name, as `{method: kind, **options}` (registered with each kind)."""


def preset(name: str, **overrides: object) -> ComposerConfig:
    """A named composer config (see PRESETS), with top-level options overridden."""
    if name not in PRESETS:
        raise KeyError(f"unknown composer preset {name!r}; known: {', '.join(PRESETS)}")
    return composer_config(PRESETS[name], **overrides)
