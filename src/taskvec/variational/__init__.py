"""Variational task vector composition (Zhang et al., 2025): sample-specific coefficients with a
Spike-and-Slab prior and gated sampling, plus the efficient per-sample composed forward."""

from taskvec.variational.blocks import BlockRule, BlockSpec, make_blocks
from taskvec.variational.engine import ComposedModel, default_forward

__all__ = ["BlockRule", "BlockSpec", "ComposedModel", "default_forward", "make_blocks"]
