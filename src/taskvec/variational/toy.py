"""A tiny, deterministic multi-task problem for tests, examples and smoke runs of the CLI.

Each task labels Gaussian inputs by a random hyperplane; a small MLP backbone is fine-tuned per
task (few Adam steps) with its own linear head, giving real task vectors. Runs in about a second.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from taskvec.variational.data import ComposeData


@dataclass
class ToyProblem:
    backbone: nn.Module
    task_vectors: list[dict[str, torch.Tensor]]
    heads: list[nn.Module]
    train: ComposeData
    test: ComposeData


def _task_data(task: int, n: int, dim: int, seed: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    w = torch.randn(dim, generator=torch.Generator().manual_seed(1000 + task), dtype=dtype)
    x = torch.randn(n, dim, generator=torch.Generator().manual_seed(seed), dtype=dtype)
    return x, (x @ w > 0).long()


def toy_problem(
    tasks: int = 2, dim: int = 10, hidden: int = 16, n: int = 128, dtype: torch.dtype = torch.float64, steps: int = 100
) -> ToyProblem:
    """`tasks` binary tasks, `n` train and `n` test samples per task; features f0 = pretrained output."""
    torch.manual_seed(0)
    backbone = nn.Sequential(nn.Linear(dim, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.LayerNorm(hidden)).to(
        dtype
    )
    base = {k: v.detach().clone() for k, v in backbone.state_dict().items()}
    tvs: list[dict[str, torch.Tensor]] = []
    heads: list[nn.Module] = []
    for t in range(tasks):
        model, head = copy.deepcopy(backbone), nn.Linear(hidden, 2).to(dtype)
        x, y = _task_data(t, 4 * n, dim, 10 + t, dtype)
        opt = torch.optim.Adam([*model.parameters(), *head.parameters()], lr=1e-2)
        for _ in range(steps):
            opt.zero_grad()
            F.cross_entropy(head(model(x)), y).backward()
            opt.step()
        tvs.append({k: (v - base[k]).detach() for k, v in model.state_dict().items()})
        heads.append(head.requires_grad_(False))

    def split(seed: int) -> ComposeData:
        xs, ys, ts = [], [], []
        for t in range(tasks):
            x, y = _task_data(t, n, dim, seed + t, dtype)
            xs.append(x)
            ys.append(y)
            ts.append(torch.full((n,), t))
        x = torch.cat(xs)
        with torch.no_grad():
            f0 = backbone(x)
        return ComposeData(x, f0, torch.cat(ts), torch.cat(ys))

    return ToyProblem(backbone.eval(), tvs, heads, split(100), split(200))
