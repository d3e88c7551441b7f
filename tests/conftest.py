"""Shared fixtures: small random checkpoints written in every supported format."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

if os.environ.get("PYTEST_XDIST_WORKER_COUNT"):
    # pytest-xdist runs one worker per core: more torch threads per worker would only contend with
    # the other workers. Subprocesses the tests start (OMP_NUM_THREADS) get the same share.
    _share = max(1, (os.cpu_count() or 1) // int(os.environ["PYTEST_XDIST_WORKER_COUNT"]))
    torch.set_num_threads(_share)
    os.environ.setdefault("OMP_NUM_THREADS", str(_share))


def random_state(seed: int, dtype: torch.dtype = torch.float64) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "embed.weight": torch.randn(50, 8, generator=g, dtype=dtype),
        "layers.0.attn.weight": torch.randn(8, 8, generator=g, dtype=dtype),
        "layers.0.attn.bias": torch.randn(8, generator=g, dtype=dtype),
        "layers.1.mlp.weight": torch.randn(16, 8, generator=g, dtype=dtype),
        "head.weight": torch.randn(3, 8, generator=g, dtype=dtype),
        "bn.num_batches_tracked": torch.tensor(7, dtype=torch.int64),
    }


def finetune(base: dict[str, torch.Tensor], seed: int, scale: float = 0.05) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1000 + seed)
    return {
        k: (v + scale * torch.randn(v.shape, generator=g, dtype=v.dtype)) if v.is_floating_point() else v.clone()
        for k, v in base.items()
    }


@pytest.fixture
def base64() -> dict[str, torch.Tensor]:
    return random_state(0)


@pytest.fixture
def finetuned64(base64: dict[str, torch.Tensor]) -> list[dict[str, torch.Tensor]]:
    return [finetune(base64, i) for i in range(3)]


@pytest.fixture
def files(
    tmp_path: Path, base64: dict[str, torch.Tensor], finetuned64: list[dict[str, torch.Tensor]]
) -> dict[str, Path]:
    """base and three fine-tuned models as float32 safetensors files."""
    paths = {"base": tmp_path / "base.safetensors"}
    save_file({k: v.float() if v.is_floating_point() else v for k, v in base64.items()}, paths["base"])
    for i, ft in enumerate(finetuned64):
        paths[f"ft{i}"] = tmp_path / f"ft{i}.safetensors"
        save_file({k: v.float() if v.is_floating_point() else v for k, v in ft.items()}, paths[f"ft{i}"])
    return paths


@pytest.fixture(scope="module")
def one_thread():  # type: ignore[no-untyped-def]
    """Tiny ops on shared, loaded CPUs run far faster on one thread than two."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """End-to-end suite tests (the longest files) first: with one worker per core, the longest file
    then starts at once and the other workers share the rest meanwhile."""
    items.sort(key=lambda item: item.get_closest_marker("suite") is None)
