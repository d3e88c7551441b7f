"""Coefficients shared by all samples (aTLAS-style supervised, AdaMerging-style entropy): one
(T, B) matrix; B = 1 is task-level ("blocks: all")."""

from __future__ import annotations

from typing import Literal

import torch
from torch import nn

from taskvec.variational.methods import ComposerConfig, register_composer


class SharedCoefficients(nn.Module):
    """alpha (T, B), initialised to `init_coef`; the composed model merges theta0 + sum alpha*tau
    once per batch (torch.func.functional_call), so any backbone layer type works."""

    noise_channels = 0

    def __init__(self, num_tasks: int, num_blocks: int, init_coef: float = 0.3):
        super().__init__()
        self.alpha = nn.Parameter(torch.full((num_tasks, num_blocks), float(init_coef)))

    def forward(
        self, f0: torch.Tensor | None = None, noise: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        return self.alpha, torch.zeros((), dtype=self.alpha.dtype, device=self.alpha.device)

    @torch.no_grad()
    def coefficients(self, f0: torch.Tensor | None = None) -> torch.Tensor:
        return self.alpha.detach().clone()


class SharedConfig(ComposerConfig):
    """One alpha (T, B) for all samples; `blocks: all` makes it task-level (B = 1)."""

    method: Literal["shared"] = "shared"


def build_shared(cfg: SharedConfig, d: int, t: int, b: int) -> SharedCoefficients:
    return SharedCoefficients(t, b, cfg.init_coef)


register_composer(
    "shared",
    SharedConfig,
    build_shared,
    doc="one alpha for all samples: aTLAS (objective 'supervised') or AdaMerging ('entropy')",
    presets={
        "atlas_task": {"objective": "supervised", "blocks": "all"},
        "atlas_block": {"objective": "supervised", "blocks": "tensor"},
        "adamerging_task": {"objective": "entropy", "blocks": "all"},
        "adamerging_block": {"objective": "entropy", "blocks": "tensor"},
    },
)
