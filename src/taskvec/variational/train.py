"""Training and evaluation of composers: one readable loop for every method.

    composer = train_composer(backbone, task_vectors, heads, train_data, config)   # learn
    result = evaluate_composer(composer, test_data)                                 # accuracy per task

Runs on CPU, one GPU, or several GPUs under `torchrun` (DistributedDataParallel on the small
coefficient network; the frozen backbone and task vectors are replicated, not wrapped). The
global batch is split over ranks and each rank's loss is scaled so that DDP's gradient average is
the gradient of the mean loss over the global batch, whatever the split.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, cast

import torch
import torch.distributed as dist
import torch.nn.functional as F
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from taskvec.config import DTYPES
from taskvec.errors import ConfigError, NonFiniteError
from taskvec.variational.config import ComposerConfig, ComposeTrainConfig, TrainConfig
from taskvec.variational.data import ComposeData, length_order, sample_noise
from taskvec.variational.engine import (
    ComposedModel,
    ForwardFn,
    TaskVectorLike,
    default_forward,
)
from taskvec.variational.methods import build_coefficients
from taskvec.variational.posterior import CoefficientNet


class CoefficientModel(Protocol):
    """What training and evaluation use of a coefficient module (an nn.Module built by a method)."""

    def coefficients(self, f0: torch.Tensor) -> torch.Tensor: ...

    def sample(self, f0: torch.Tensor, noise: torch.Tensor) -> torch.Tensor: ...


class Composer(nn.Module):
    """A composed backbone, frozen per-task heads and the learned coefficient model."""

    def __init__(
        self,
        model: ComposedModel,
        heads: Sequence[nn.Module],
        coef: nn.Module,
        config: ComposerConfig,
        feature_dim: int,
    ):
        super().__init__()
        self.model, self.heads, self.coef = model, nn.ModuleList(heads), coef
        self.config, self.feature_dim = config, feature_dim
        self.history: list[dict[str, float]] = []
        for p in self.heads.parameters():
            p.requires_grad_(False)

    def coefficients(self, features: torch.Tensor) -> torch.Tensor:
        """Deterministic test-time coefficients: (N, T, B), or (T, B) for shared coefficients."""
        return cast(CoefficientModel, self.coef).coefficients(features)

    def logits(
        self, inputs: Any, alpha: torch.Tensor, tasks: torch.Tensor
    ) -> list[tuple[int, torch.Tensor, torch.Tensor]]:
        """(task, sample positions, logits of that task's head) for each task present in the batch."""
        feats = self.model(inputs, alpha)
        return [(t, idx, self.heads[t](feats[idx])) for t, idx in _groups(tasks)]


def _groups(tasks: torch.Tensor) -> list[tuple[int, torch.Tensor]]:
    return [(int(t), (tasks == t).nonzero().squeeze(1)) for t in torch.unique(tasks).tolist()]


def build_composer(
    backbone: nn.Module,
    task_vectors: Sequence[TaskVectorLike],
    heads: Sequence[nn.Module],
    feature_dim: int,
    config: ComposerConfig,
    *,
    forward_fn: ForwardFn = default_forward,
    task_names: Sequence[str] | None = None,
    blocks: Any = None,
    seed: int = 0,
) -> Composer:
    """Untrained composer; the backbone is put in eval mode and frozen (it is not copied). The
    coefficient network's initial weights are a function of `seed` alone: they are drawn from
    torch's generator seeded with it, and the caller's random state is left as it was."""
    backbone.eval()
    model = ComposedModel(
        backbone,
        task_vectors,
        blocks=blocks if blocks is not None else config.blocks,
        include=config.include,
        exclude=config.exclude or None,
        strategy=config.strategy,
        forward_fn=forward_fn,
        task_names=task_names,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        coef = build_coefficients(config, feature_dim, model.num_tasks, model.num_blocks)
    ref = next(iter(backbone.parameters()))
    return Composer(model, heads, coef.to(device=ref.device, dtype=ref.dtype), config, feature_dim).to(ref.device)


# --------------------------------------------------------------------------- distributed


def dist_setup(device: str = "auto") -> tuple[int, int, torch.device]:
    """(rank, world size, device). Under torchrun (WORLD_SIZE > 1) initialises the process group
    (nccl on GPUs, gloo on CPU) unless the caller already did."""
    use_cuda = torch.cuda.is_available() and device != "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("train.device is 'cuda' but no GPU is available")
    if not dist.is_initialized() and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        dist.init_process_group("nccl" if use_cuda else "gloo")
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    if use_cuda:
        local = int(os.environ.get("LOCAL_RANK", rank % max(torch.cuda.device_count(), 1)))
        torch.cuda.set_device(local)
        return rank, world, torch.device("cuda", local)
    return rank, world, torch.device("cpu")


BUCKET = 16
"""Batches per bucket of similar-length texts (see `global_batches`)."""


def global_batches(
    n: int, batch_size: int, epoch: int, seed: int, lengths: torch.Tensor | None = None
) -> list[torch.Tensor]:
    """Shuffled data indices cut into global batches (same on every rank: seeded by seed, epoch).

    With `lengths` (tokens per text), each run of `BUCKET` batches of the permutation is sorted by
    length before it is cut, and the batches are shuffled: a batch is padded to its own longest text."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    perm = torch.randperm(n, generator=g)
    if lengths is None:
        return list(perm.split(batch_size))
    batches: list[torch.Tensor] = []
    for chunk in perm.split(batch_size * BUCKET):
        batches += list(chunk[torch.argsort(lengths[chunk], stable=True)].split(batch_size))
    return [batches[j] for j in torch.randperm(len(batches), generator=g).tolist()]


# --------------------------------------------------------------------------- one step


@dataclass
class StepStats:
    data: float  # summed data term (cross-entropy or entropy) over local samples
    kl: float  # summed KL over local samples
    n: int


def train_step(
    composer: Composer,
    coef: nn.Module,
    batch: ComposeData,
    noise: torch.Tensor | None,
    n_global: int,
    world: int = 1,
) -> StepStats:
    """Forward and backward of one local batch. `coef` is composer.coef or its DDP wrapper. The
    loss is sum_local(data + lambda_KL * KL) * world / n_global, so that the DDP mean over ranks of
    the gradients is the gradient of the mean loss over the global batch."""
    cfg = composer.config
    alpha, kl = coef(batch.features, noise)
    draws = [alpha] if alpha.dim() == 2 else list(alpha.unbind(0))
    data = alpha.new_zeros(())
    for a in draws:
        for _, idx, logits in composer.logits(batch.inputs, a, batch.tasks):
            if cfg.objective == "supervised":
                if batch.labels is None:
                    raise ConfigError("objective 'supervised' needs labelled data (ComposeData.labels)")
                data = data + F.cross_entropy(logits, batch.labels[idx], reduction="sum")
            else:
                logp = F.log_softmax(logits, dim=-1)
                data = data - (logp.exp() * logp).sum()
    data = data / len(draws)
    kl_sum = kl.sum() if kl.dim() else kl * 0
    loss = (data + cfg.kl_scale() * kl_sum) * (world / n_global)
    loss.backward()
    return StepStats(float(data.detach()), float(kl_sum.detach()), len(batch))


# --------------------------------------------------------------------------- the loop


def _progress(enabled: bool) -> Progress:
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[info]}"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        disable=not enabled,
        transient=False,
    )


def param_groups(coef: nn.Module, config: TrainConfig) -> list[dict[str, object]]:
    """AdamW groups: output biases of coefficient networks (the shared part of every coefficient) at
    `bias_lr`; weight matrices of linear layers (the input dependence) with `weight_decay`; the rest
    (hidden biases, shared coefficients) at `lr` without decay."""
    biases = {id(m.out.bias) for m in coef.modules() if isinstance(m, CoefficientNet)}
    weights = {id(m.weight) for m in coef.modules() if isinstance(m, nn.Linear)}
    groups: dict[str, dict[str, object]] = {
        "bias": {"params": [], "lr": config.bias_lr or config.lr, "weight_decay": 0.0},
        "weight": {"params": [], "lr": config.lr, "weight_decay": config.weight_decay},
        "other": {"params": [], "lr": config.lr, "weight_decay": 0.0},
    }
    for p in coef.parameters():
        if p.requires_grad:
            key = "bias" if id(p) in biases else "weight" if id(p) in weights else "other"
            groups[key]["params"].append(p)  # type: ignore[attr-defined]
    return [g for g in groups.values() if g["params"]]


def fit(
    composer: Composer,
    data: ComposeData,
    config: TrainConfig,
    *,
    val_data: ComposeData | None = None,
    max_steps: int | None = None,
) -> Composer:
    """Train composer.coef in place (AdamW, gradient clipping); history goes to composer.history."""
    rank, world, device = dist_setup(config.device)
    dtype = DTYPES[config.dtype]
    composer.to(device=device, dtype=dtype)
    composer.model.backbone.eval()
    composer.heads.eval()
    torch.manual_seed(config.seed)
    params = [p for p in composer.coef.parameters() if p.requires_grad]
    coef: nn.Module = composer.coef
    if world > 1:
        coef = DistributedDataParallel(
            composer.coef, device_ids=[device.index] if device.type == "cuda" else None, broadcast_buffers=False
        )
    opt = torch.optim.AdamW(param_groups(composer.coef, config), lr=config.lr)
    channels = getattr(composer.coef, "noise_channels", 0)
    shape = (composer.model.num_tasks, composer.model.num_blocks)
    steps_per_epoch = math.ceil(len(data) / config.batch_size)
    mask = data.inputs.get("attention_mask") if isinstance(data.inputs, Mapping) else None
    lengths = mask.sum(1) if isinstance(mask, torch.Tensor) else None  # texts: batches of similar length
    total = config.epochs * steps_per_epoch if max_steps is None else min(max_steps, config.epochs * steps_per_epoch)
    step = 0
    with _progress(config.progress and rank == 0) as bar:
        epochs = bar.add_task(f"training {composer.config.method}: epochs", total=config.epochs, info="")
        job = bar.add_task("  steps", total=total, info="")
        for epoch in range(config.epochs):
            composer.coef.train()  # dropout on (evaluation switches it off)
            sums = {"data": 0.0, "kl": 0.0, "n": 0}
            for gbatch in global_batches(len(data), config.batch_size, epoch, config.seed, lengths):
                if step >= total:
                    break
                if len(gbatch) < world:
                    continue  # a last batch smaller than the number of ranks is skipped
                local = gbatch.tensor_split(world)[rank]
                batch = data.batch(local, device, dtype)
                noise = sample_noise(local, epoch, config.seed, config.train_samples, channels, shape, dtype, device)
                opt.zero_grad(set_to_none=True)
                stats = train_step(composer, coef, batch, noise, len(gbatch), world)
                if config.grad_clip is not None:
                    torch.nn.utils.clip_grad_norm_(params, config.grad_clip)
                opt.step()
                step += 1
                sums["data"] += stats.data
                sums["kl"] += stats.kl
                sums["n"] += stats.n
                bar.update(
                    job,
                    advance=1,
                    info=f"epoch {epoch + 1}/{config.epochs} "
                    f"loss {stats.data / max(stats.n, 1):.4f} kl {stats.kl / max(stats.n, 1):.2f}",
                )
            record = _reduce(sums, device, world)
            if val_data is not None:
                record["val_accuracy"] = evaluate_composer(
                    composer,
                    val_data,
                    mode=config.eval_mode,
                    samples=config.eval_samples,
                    batch_size=config.eval_batch_size,
                ).mean_accuracy
            record["epoch"] = epoch + 1
            composer.history.append(record)
            bar.update(epochs, advance=1, info=f"loss {record['loss']:.4f}")
            if step >= total:
                break
    return composer


def _reduce(sums: dict[str, float], device: torch.device, world: int) -> dict[str, float]:
    t = torch.tensor([sums["data"], sums["kl"], sums["n"]], dtype=torch.float64, device=device)
    if world > 1:
        dist.all_reduce(t)
    n = max(float(t[2]), 1.0)
    return {"loss": float(t[0]) / n, "kl": float(t[1]) / n}


def train_composer(
    backbone: nn.Module,
    task_vectors: Sequence[TaskVectorLike],
    heads: Sequence[nn.Module],
    data: ComposeData,
    config: ComposeTrainConfig | None = None,
    *,
    val_data: ComposeData | None = None,
    forward_fn: ForwardFn = default_forward,
    task_names: Sequence[str] | None = None,
    max_steps: int | None = None,
) -> Composer:
    """Build and train a composer in one call (see ComposeTrainConfig for every option).

    backbone: the pretrained model theta0 (frozen, put in eval mode, moved to the train device and
    dtype in place); task_vectors: TaskVector objects or {name: tensor} deltas; heads: one frozen
    classifier per task index of `data.tasks`; data.features: f0(x) from the pretrained backbone."""
    config = config or ComposeTrainConfig()
    dtype = DTYPES[config.train.dtype]
    backbone.to(dtype=dtype)
    composer = build_composer(
        backbone,
        task_vectors,
        [h.to(dtype=dtype) for h in heads],
        data.features.shape[1],
        config.composer,
        forward_fn=forward_fn,
        task_names=task_names,
        seed=config.train.seed,  # the network's initial weights: a function of the seed alone
    )
    return fit(composer, data, config.train, val_data=val_data, max_steps=max_steps)


# --------------------------------------------------------------------------- evaluation


@dataclass
class EvalResult:
    """Accuracy per task index, their mean, per-sample predictions, and the mean test-time
    coefficients per task (n_tasks, T, B) with the fraction of nonzero (selected) coefficients."""

    accuracy: dict[int, float]
    predictions: torch.Tensor
    coef_mean: torch.Tensor
    active: dict[int, float] = field(default_factory=dict)

    @property
    def mean_accuracy(self) -> float:
        return sum(self.accuracy.values()) / max(len(self.accuracy), 1)


@torch.no_grad()
def evaluate_composer(
    composer: Composer,
    data: ComposeData,
    *,
    mode: str = "deterministic",
    samples: int = 8,
    batch_size: int = 256,
    seed: int = 0,
    coefficients: torch.Tensor | None = None,
) -> EvalResult:
    """Predictions with each sample's task head. mode 'deterministic': alpha*(x) = gate * mu, one
    forward; 'mc': average of the heads' probabilities over `samples` posterior draws.
    `coefficients`, per sample (N, T, B) or shared (T, B), are used instead of the composer's own
    (deterministic mode only): scores hand-set or externally computed coefficients."""
    if mode not in ("deterministic", "mc"):
        raise ConfigError(f"evaluation mode must be 'deterministic' or 'mc', not {mode!r}")
    if coefficients is not None and mode != "deterministic":
        raise ConfigError("evaluate_composer: given `coefficients` are scored in mode 'deterministic' only")
    ref = next(iter(composer.coef.parameters()))
    device, dtype = ref.device, ref.dtype
    composer.eval()
    n, t, b = len(data), composer.model.num_tasks, composer.model.num_blocks
    preds = torch.empty(n, dtype=torch.long)
    n_heads = len(composer.heads)
    coef_sum = torch.zeros(n_heads, t, b, dtype=torch.float64)
    active = torch.zeros(n_heads, dtype=torch.float64)
    count = torch.zeros(n_heads, dtype=torch.float64)
    channels = getattr(composer.coef, "noise_channels", 0)
    if coefficients is not None and tuple(coefficients.shape) not in ((t, b), (n, t, b)):
        raise ConfigError(
            f"evaluate_composer: coefficients of shape {tuple(coefficients.shape)}; expected "
            f"({t}, {b}) shared or ({n}, {t}, {b}) per sample (tasks, blocks, samples of the data)"
        )
    for index in length_order(data.inputs).split(batch_size):  # texts of similar length together
        batch = data.batch(index, device, dtype)
        if coefficients is None:
            alpha = composer.coefficients(batch.features)
        else:
            alpha = (coefficients if coefficients.dim() == 2 else coefficients[index]).to(device, dtype)
        if mode == "mc" and channels:
            noise = sample_noise(index, -1, seed, samples, channels, (t, b), dtype, device)
            assert noise is not None  # channels > 0
            draws = list(cast(CoefficientModel, composer.coef).sample(batch.features, noise).unbind(0))
        else:
            draws = [alpha]
        for a in draws:
            if not bool(torch.isfinite(a).all()):
                bad = int((~torch.isfinite(a)).reshape(len(index), -1).any(1).sum()) if a.dim() == 3 else len(index)
                raise NonFiniteError(
                    f"composition coefficients are NaN or infinite for {bad} of the samples "
                    f"{int(index[0])}..{int(index[-1])}; the composer diverged or its saved weights are corrupt"
                )
        probs: dict[int, torch.Tensor] = {}
        for a in draws:
            for task, _idx, logits in composer.logits(batch.inputs, a, batch.tasks):
                p = logits.softmax(-1)
                probs[task] = probs[task] + p if task in probs else p
        for task, idx in _groups(batch.tasks):
            preds[index[idx.cpu()]] = probs[task].argmax(-1).cpu()
            a = alpha if alpha.dim() == 2 else alpha[idx]
            a = a.expand(len(idx), t, b) if a.dim() == 2 else a
            coef_sum[task] += a.double().sum(0).cpu()
            active[task] += (a != 0).double().mean((1, 2)).sum().cpu()
            count[task] += len(idx)
    acc = {}
    if data.labels is not None:
        for task in torch.unique(data.tasks).tolist():
            m = data.tasks == task
            acc[int(task)] = float((preds[m] == data.labels[m].cpu()).double().mean())
    present = count > 0
    coef_mean = torch.where(present[:, None, None], coef_sum / count.clamp_min(1)[:, None, None], torch.nan)
    return EvalResult(acc, preds, coef_mean, {i: float(active[i] / count[i]) for i in range(n_heads) if count[i] > 0})
