"""Pydantic configs of composer training (YAML via taskvec.config.load_yaml_config).

One `ComposerConfig` covers the variational model, its ablations and the learned-coefficient
baselines; `PRESETS` names the standard variants. `ComposeTrainConfig` = composer + train.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from taskvec.config import DtypeName, Strict

Strategy = Literal["auto", "linear", "batched"]


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


class ComposerConfig(Strict):
    """What is learned. method: 'variational' (the paper), 'sample_specific' (deterministic alpha(x),
    no prior or gate) or 'shared' (one alpha for all samples: aTLAS with objective 'supervised',
    AdaMerging with 'entropy'). blocks: 'tensor', 'module', 'all' (task-level), globs or a map."""

    method: str = Field(
        default="variational", description="a registered composer method (taskvec.variational.COMPOSERS)"
    )
    objective: Literal["supervised", "entropy"] = "supervised"
    blocks: str | list[str] | dict[str, list[str]] = "tensor"
    include: list[str] | None = None
    exclude: list[str] = Field(default_factory=list)
    strategy: Strategy | dict[str, Strategy] = "auto"
    init_coef: float = Field(default=0.3, description="initial coefficient of every task vector and block")
    prior: PriorConfig = Field(default_factory=PriorConfig)
    gate: GateConfig = Field(default_factory=GateConfig)
    posterior: PosteriorConfig = Field(default_factory=PosteriorConfig)
    concrete_temperature: float = Field(default=0.5, gt=0.0)
    hard_concrete: bool = False
    kl_weight: float = Field(
        default=1e-4,
        ge=0.0,
        description="lambda_KL; the KL is summed over the T*B coefficients, so a larger value gates out more of them",
    )

    @model_validator(mode="after")
    def _consistent(self) -> ComposerConfig:
        if isinstance(self.blocks, str) and self.blocks not in ("tensor", "module", "all"):
            raise ValueError("blocks: use 'tensor', 'module', 'all', a list of globs or a {name: [globs]} map")
        import taskvec.variational  # noqa: F401 (registers the built-in methods)
        from taskvec.variational.methods import COMPOSERS, OBJECTIVES

        if self.method not in COMPOSERS:
            raise ValueError(f"method: unknown composer method {self.method!r}; known: {', '.join(COMPOSERS.names())}")
        if self.objective not in OBJECTIVES[self.method]:
            wanted = " or ".join(map(repr, OBJECTIVES[self.method]))
            raise ValueError(f"the {self.method} composer is trained with objective {wanted}")
        return self


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
    """`taskvec compose train` config."""

    composer: ComposerConfig = Field(default_factory=ComposerConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)


PRESETS: dict[str, dict[str, object]] = {
    "variational": {},
    "variational_no_prior": {"prior": {"kind": "none"}},
    "variational_no_spike": {"prior": {"kind": "gaussian"}},
    "variational_no_gate": {"gate": {"kind": "none"}},
    "variational_gate_importance": {"gate": {"kind": "importance"}},
    "variational_gate_uncertainty": {"gate": {"kind": "uncertainty"}},
    "sample_specific": {"method": "sample_specific"},
    "atlas_task": {"method": "shared", "objective": "supervised", "blocks": "all"},
    "atlas_block": {"method": "shared", "objective": "supervised", "blocks": "tensor"},
    "adamerging_task": {"method": "shared", "objective": "entropy", "blocks": "all"},
    "adamerging_block": {"method": "shared", "objective": "entropy", "blocks": "tensor"},
}


def preset(name: str, **overrides: object) -> ComposerConfig:
    """A named ComposerConfig (see PRESETS), with top-level fields overridden."""
    if name not in PRESETS:
        raise KeyError(f"unknown composer preset {name!r}; known: {', '.join(PRESETS)}")
    return ComposerConfig.model_validate({**PRESETS[name], **overrides})
