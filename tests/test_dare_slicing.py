"""DARE masks depend only on absolute element positions: every path and slice size gives the same bits."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file
from torch import nn

from taskvec import TaskVector, compose
from taskvec.config import load_merge_config
from taskvec.core.taskvector import apply_streaming
from taskvec.io import open_checkpoint
from taskvec.merge import merge_checkpoints
from taskvec.methods.dare import MASK_BLOCK

N = (1 << 21) + 70_001  # above one streaming slice (2^21 elements), not a multiple of a mask block


class Big(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.zeros(N))
        self.b = nn.Parameter(torch.zeros(5))


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, torch.Tensor], list[Path]]:
    root = tmp_path_factory.mktemp("dare")
    g = torch.Generator().manual_seed(0)
    base = {"w": torch.randn(N, generator=g), "b": torch.randn(5, generator=g)}
    save_file(base, root / "base.safetensors")
    fts = []
    for i in range(2):
        p = root / f"ft{i}.safetensors"
        save_file({k: v + 0.1 * torch.randn(v.shape, generator=g) for k, v in base.items()}, p)
        fts.append(p)
    return root, base, fts


@pytest.mark.parametrize("method", ["dare", "dare_ties"])
def test_dare_same_bits_for_every_path_and_slice_size(setup, method: str) -> None:  # type: ignore[no-untyped-def]
    root, base, fts = setup
    tvs = [TaskVector.from_checkpoints(root / "base.safetensors", p) for p in fts]
    merged = compose(tvs, method, [0.7, 1.1], density=0.3, seed=5)
    whole = merged["w"].reshape(-1)
    # the mask really drops about 1 - density of each task's entries
    kept = float((whole != 0).double().mean())
    assert 0.3 < kept < 0.6  # union of two 30 % masks, about 51 %
    src = merged.source
    small = torch.cat([src.read_flat("w", s, s + 999) for s in range(0, 3 * 999 * 70, 999)])
    assert torch.equal(small, whole[: small.numel()])
    for size in (MASK_BLOCK - 1, MASK_BLOCK, (1 << 20) + 3, 1 << 21):
        parts = torch.cat([src.read_flat("w", s, min(s + size, N)) for s in range(0, N, size)])
        assert torch.equal(parts, whole), size
    assert torch.equal(
        src.read_flat("w", MASK_BLOCK - 5, 3 * MASK_BLOCK + 5), whole[MASK_BLOCK - 5 : 3 * MASK_BLOCK + 5]
    )
    # in memory: a module and a state dict
    module = Big()
    module.load_state_dict(base)
    got_module = merged.apply_to(module, 1.0)
    expect = base["w"] + whole
    assert torch.equal(got_module.state_dict()["w"], expect)
    assert torch.equal(merged.apply_to(dict(base), 1.0)["w"], expect)
    # streamed to disk with several slice sizes
    for chunk in (1 << 21, (1 << 20) + 7, 12_345):
        out = apply_streaming(
            open_checkpoint(root / "base.safetensors"),
            merged,
            1.0,
            root / f"out-{method}-{chunk}.safetensors",
            chunk_elems=chunk,
        )
        assert torch.equal(load_file(out)["w"], expect), chunk
    # the `taskvec merge` path, from a config
    cfg_path = root / f"{method}.yaml"
    cfg_path.write_text(
        yaml.safe_dump(
            {
                "method": method,
                "base": "base.safetensors",
                "params": {"density": 0.3, "seed": 5},
                "models": [{"finetuned": fts[0].name, "weight": 0.7}, {"finetuned": fts[1].name, "weight": 1.1}],
            }
        )
    )
    out = merge_checkpoints(load_merge_config(cfg_path), root / f"merged-{method}.safetensors")
    assert torch.equal(load_file(out)["w"], expect)


def test_dare_masks_differ_per_task_and_block(setup) -> None:  # type: ignore[no-untyped-def]
    from taskvec.methods.dare import slice_mask

    a = slice_mask(1, "w", 0, 0, 2 * MASK_BLOCK, N, 0.5)
    b = slice_mask(1, "w", 1, 0, 2 * MASK_BLOCK, N, 0.5)
    assert not torch.equal(a, b)
    assert not torch.equal(a[:MASK_BLOCK], a[MASK_BLOCK:])
    # the last, partial block is drawn at its own length
    tail = slice_mask(1, "w", 0, N - 10, N, N, 0.5)
    assert tail.shape == (10,)
