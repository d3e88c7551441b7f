"""Fine-tune the shared backbone of one task with its frozen head: a plain, resumable loop.

The backbone stays in eval mode while its weights train: BatchNorm keeps its ImageNet running
statistics and dropout/drop-connect stay off. Every fine-tuned model therefore shares the
pretrained BatchNorm statistics, task vectors hold no statistics (they are exactly zero), and a
composed model needs no re-estimation. The head is fitted on frozen pretrained features and never
trains, so it stays valid after composing.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import torch
import torch.nn.functional as F
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from torch import nn

from taskvec.bench.models import forward_features
from taskvec.bench.suite import FinetuneSpec, Split


def _atomic_save(obj: object, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def finetune(
    backbone: nn.Module,
    head: nn.Module,
    train: Split,
    spec: FinetuneSpec,
    *,
    seed: int,
    state_path: Path,
    description: str = "fine-tuning",
    progress: bool = True,
    save_every: int = 50,
) -> dict[str, torch.Tensor]:
    """Train `backbone` (in place) with cross-entropy through the frozen `head`; returns its state dict.

    Progress is saved to `state_path` every `save_every` steps; a rerun resumes from it.
    """
    head.requires_grad_(False)
    params = [p for p in backbone.parameters()]
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.AdamW(params, lr=spec.lr, weight_decay=spec.weight_decay)
    steps_per_epoch = math.ceil(len(train) / spec.batch_size)
    total = spec.epochs * steps_per_epoch
    warmup = max(1, int(spec.warmup_frac * total))

    def lr_at(step: int) -> float:  # linear warm-up, then cosine decay
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_at)
    step = 0
    if state_path.exists():
        state = torch.load(state_path, map_location="cpu", weights_only=False)
        backbone.load_state_dict(state["model"])
        opt.load_state_dict(state["opt"])
        sched.load_state_dict(state["sched"])
        step = state["step"]
    backbone.eval()  # BatchNorm statistics frozen, no dropout (see module docstring)
    columns = [TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TextColumn("loss {task.fields[loss]:.3f}"), TimeElapsedColumn(), TimeRemainingColumn()]
    with Progress(*columns, disable=not progress) as bar:
        task = bar.add_task(description, total=total, completed=step, loss=float("nan"))
        while step < total:
            epoch, i = divmod(step, steps_per_epoch)
            order = torch.randperm(len(train), generator=torch.Generator().manual_seed(seed * 1000 + epoch))
            idx = order[i * spec.batch_size : (i + 1) * spec.batch_size]
            x, y = train.batch(idx)
            loss = F.cross_entropy(head(forward_features(backbone, x)), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, spec.max_grad_norm)
            opt.step()
            sched.step()
            step += 1
            bar.update(task, advance=1, loss=loss.item())
            if step % save_every == 0 and step < total:
                _atomic_save({"model": backbone.state_dict(), "opt": opt.state_dict(), "sched": sched.state_dict(), "step": step}, state_path)
    for p in params:
        p.requires_grad_(False)
    return {k: v.detach().clone() for k, v in backbone.state_dict().items()}
