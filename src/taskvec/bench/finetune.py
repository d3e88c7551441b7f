"""Fine-tune the shared backbone of one task with its frozen head: a plain, resumable loop.

The backbone stays in eval mode while its weights train: BatchNorm keeps its ImageNet running
statistics and dropout/drop-connect stay off. Every fine-tuned model therefore shares the
pretrained BatchNorm statistics, task vectors hold no statistics (they are exactly zero), and a
composed model needs no re-estimation. The head is fitted on frozen pretrained features and never
trains, so it stays valid after composing.
"""

from __future__ import annotations

import math
import pickle
from pathlib import Path

import torch
import torch.nn.functional as F
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from torch import nn

from taskvec.bench.models import forward_features
from taskvec.bench.suite import FinetuneSpec, Split
from taskvec.errors import CheckpointError
from taskvec.io.atomic import atomic_path


def save_state(state: dict[str, object], path: Path) -> None:
    """Save resume state (tensors, numbers, strings, lists and dicts only), atomically."""
    # the cache is taskvec's own, read and rewritten by the same run
    with atomic_path(path, overwrite=True, owned=lambda p: None, against_read=False) as tmp:
        torch.save(state, tmp)


def load_state(path: Path) -> dict[str, object]:
    """Resume state saved by `save_state`; refuses (without running it) anything but plain data."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError):
        raise CheckpointError(
            f"{path}: not a plain resume state (it holds objects other than tensors and plain "
            "data, or is damaged), refused without loading it; delete it to restart this fine-tuning"
        ) from None
    if not isinstance(state, dict) or not {"model", "opt", "sched", "step"} <= set(state):
        raise CheckpointError(f"{path}: not a resume state of taskvec's fine-tuning; delete it to restart")
    return state


BUCKET = 16
"""Batches per bucket of similar-length texts (see `epoch_batches`)."""


def epoch_batches(train: Split, batch_size: int, seed: int) -> list[torch.Tensor]:
    """One epoch's batches of row indices, from one seeded permutation: for texts, each run of
    `BUCKET` batches is sorted by length before it is cut (a batch is padded to its own longest
    text) and the batches are then shuffled, so every epoch still sees every item once."""
    g = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(train), generator=g)
    if not (isinstance(train.x, dict) and "attention_mask" in train.x):
        return list(order.split(batch_size))
    lengths = train.x["attention_mask"].sum(1)
    batches: list[torch.Tensor] = []
    for chunk in order.split(batch_size * BUCKET):
        chunk = chunk[torch.argsort(lengths[chunk], stable=True)]
        batches += list(chunk.split(batch_size))
    return [batches[j] for j in torch.randperm(len(batches), generator=g).tolist()]


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
        state = load_state(state_path)
        try:
            backbone.load_state_dict(state["model"])  # type: ignore[arg-type]
            opt.load_state_dict(state["opt"])  # type: ignore[arg-type]
            sched.load_state_dict(state["sched"])  # type: ignore[arg-type]
            step = int(state["step"])  # type: ignore[call-overload]
        except (RuntimeError, ValueError, KeyError, TypeError, IndexError) as e:
            raise CheckpointError(
                f"{state_path}: resume state does not match this fine-tuning (another backbone or recipe: "
                f"{' '.join(str(e).split())[:200]}); delete it to restart this fine-tuning"
            ) from None
        if not 0 <= step <= total:
            raise CheckpointError(
                f"{state_path}: resume state is at step {step} of a {total}-step fine-tuning; delete it to restart"
            )
    backbone.eval()  # BatchNorm statistics frozen, no dropout (see module docstring)
    columns = [
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("loss {task.fields[loss]:.3f}"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
    ]
    with Progress(*columns, disable=not progress) as bar:
        task = bar.add_task(description, total=total, completed=step, loss=float("nan"))
        batches: list[torch.Tensor] = []
        while step < total:
            epoch, i = divmod(step, steps_per_epoch)
            if i == 0 or not batches:
                batches = epoch_batches(train, spec.batch_size, seed * 1000 + epoch)
            x, y = train.batch(batches[i])
            loss = F.cross_entropy(head(forward_features(backbone, x)), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, spec.max_grad_norm)
            opt.step()
            sched.step()
            step += 1
            bar.update(task, advance=1, loss=loss.item())
            if step % save_every == 0 and step < total:
                save_state(
                    {
                        "model": backbone.state_dict(),
                        "opt": opt.state_dict(),
                        "sched": sched.state_dict(),
                        "step": step,
                    },
                    state_path,
                )
    for p in params:
        p.requires_grad_(False)
    return {k: v.detach().clone() for k, v in backbone.state_dict().items()}
