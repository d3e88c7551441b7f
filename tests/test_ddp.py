"""Two CPU processes (gloo, DistributedDataParallel) take the same training step as one process
on the same global batch: identical averaged gradients and updated coefficients (float64)."""

from __future__ import annotations

import copy
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from taskvec.variational import TrainConfig, build_composer, fit, preset
from taskvec.variational.toy import toy_problem


def _run(name: str, batch_size: int, steps: int) -> dict[str, torch.Tensor]:
    """One process's view after `steps` steps: gradients of the last step and the parameters."""
    torch.set_num_threads(1)
    toy = toy_problem(n=32, steps=20)
    composer = build_composer(copy.deepcopy(toy.backbone), toy.task_vectors, toy.heads, 16, preset(name))
    cfg = TrainConfig(epochs=1, batch_size=batch_size, lr=1e-2, progress=False, dtype="float64", seed=3)
    fit(composer, toy.train, cfg, max_steps=steps)
    out = {}
    for k, p in composer.coef.named_parameters():
        out[f"grad/{k}"] = p.grad.detach().clone()
        out[f"param/{k}"] = p.detach().clone()
    return out


CASES = [("variational", 32, 1), ("variational", 31, 2), ("atlas_block", 32, 1), ("sample_specific", 17, 1)]
"""(preset, global batch size, steps): odd batch sizes split unevenly over the two ranks."""


def _worker(rank: int, world: int, init: str, out: str) -> None:
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    try:
        torch.save([_run(*case) for case in CASES], f"{out}.{rank}")
    finally:
        dist.destroy_process_group()


def test_two_process_steps_equal_single_process(tmp_path: Path) -> None:
    out = str(tmp_path / "result")
    mp.start_processes(_worker, args=(2, f"file://{tmp_path / 'init'}", out), nprocs=2, join=True, start_method="spawn")
    ranks = [torch.load(f"{out}.{r}", weights_only=True) for r in range(2)]
    n = torch.get_num_threads()
    try:
        singles = [_run(*case) for case in CASES]
    finally:
        torch.set_num_threads(n)
    for case, single, r0, r1 in zip(CASES, singles, *ranks, strict=False):
        assert set(single) == set(r0), case
        for k, v in single.items():
            torch.testing.assert_close(r0[k], r1[k], atol=0, rtol=0)  # the ranks agree exactly
            torch.testing.assert_close(r0[k], v, atol=1e-13, rtol=1e-11, msg=f"{case} {k}")  # = one process
        assert any(torch.count_nonzero(v) for k, v in single.items() if k.startswith("grad/")), case
