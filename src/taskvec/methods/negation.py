"""Task negation (forgetting, Ilharco et al., 2023): tau = -sum_t w_t tau_t."""

from __future__ import annotations

import torch

from taskvec.methods.registry import MergeMethod, MethodParams, SliceContext, register, weighted_sum


class NegationParams(MethodParams):
    pass


def merge(deltas: torch.Tensor, weights: torch.Tensor, params: MethodParams, ctx: SliceContext) -> torch.Tensor:
    return -weighted_sum(deltas, weights)


METHOD = register(MergeMethod("negation", "subtract task vectors to forget their tasks", NegationParams, merge))
