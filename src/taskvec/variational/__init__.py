"""Variational task vector composition (Zhang, Du, Zhen, Shao 2025, arXiv 2509.18208).

Sample-specific coefficients alpha(x) in R^{T x B} from frozen features f0(x), with a
Spike-and-Slab prior and gated sampling; the learned-coefficient baselines (taskvec.coefficients)
share the same composed forward, loop and I/O. See docs/variational.md.
"""

from taskvec.variational.blocks import BlockRule, BlockSpec, make_blocks
from taskvec.variational.checkpoint import load_composer, read_composer_info, save_composer
from taskvec.variational.config import (
    PRESETS,
    ComposerConfig,
    ComposeTrainConfig,
    GateConfig,
    PosteriorConfig,
    PriorConfig,
    TrainConfig,
    preset,
)
from taskvec.variational.data import ComposeData, compute_features, holdout_split
from taskvec.variational.engine import ComposedModel, default_forward
from taskvec.variational.methods import COMPOSERS, composer_config, register_composer
from taskvec.variational.posterior import (
    DeterministicCoefficients,
    SampleSpecificConfig,
    VariationalCoefficients,
    VariationalConfig,
)
from taskvec.variational.shared import SharedCoefficients, SharedConfig
from taskvec.variational.train import (
    Composer,
    EvalResult,
    build_composer,
    evaluate_composer,
    fit,
    train_composer,
)

__all__ = [
    "COMPOSERS",
    "PRESETS",
    "BlockRule",
    "BlockSpec",
    "ComposeData",
    "ComposeTrainConfig",
    "ComposedModel",
    "Composer",
    "ComposerConfig",
    "DeterministicCoefficients",
    "EvalResult",
    "GateConfig",
    "PosteriorConfig",
    "PriorConfig",
    "SampleSpecificConfig",
    "SharedCoefficients",
    "SharedConfig",
    "TrainConfig",
    "VariationalCoefficients",
    "VariationalConfig",
    "build_composer",
    "composer_config",
    "compute_features",
    "default_forward",
    "evaluate_composer",
    "fit",
    "holdout_split",
    "load_composer",
    "make_blocks",
    "preset",
    "read_composer_info",
    "register_composer",
    "save_composer",
    "train_composer",
]
