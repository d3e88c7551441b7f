"""A task's split ready for a backbone: encoded inputs and labels (no I/O, no configuration)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from taskvec.bench.backbones import Inputs


@dataclass
class Split:
    """Model-ready inputs (an image tensor, or token ids + mask) and labels."""

    x: Inputs
    y: torch.Tensor

    def __len__(self) -> int:
        return int(self.y.shape[0])

    def take(self, idx: torch.Tensor) -> Split:
        """The rows `idx` as a split of their own."""
        x = {k: v[idx] for k, v in self.x.items()} if isinstance(self.x, dict) else self.x[idx]
        return Split(x, self.y[idx])

    def batch(self, idx: torch.Tensor | slice) -> tuple[Inputs, torch.Tensor]:
        if isinstance(self.x, dict):
            x = {k: v[idx] for k, v in self.x.items()}
            n = int(x["attention_mask"].sum(1).max())  # trim padding to the longest item in the batch
            return {k: v[:, :n] for k, v in x.items()}, self.y[idx]
        return self.x[idx], self.y[idx]
