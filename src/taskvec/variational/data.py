"""In-memory training data of a composer and the per-sample noise of the ELBO."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch

from taskvec.variational.engine import batch_size as count
from taskvec.variational.engine import default_forward, take, to_device

_MIX = 0x9E3779B97F4A7C15  # golden-ratio constant: spreads (seed, epoch, index) over 64 bits


@dataclass
class ComposeData:
    """Inputs of the backbone (a tensor, or a dict of tensors such as tokenized text; batch first),
    frozen pretrained features f0(x) (N, D), the task (= head) index of each sample (N,) and the
    labels (N,) (None for unlabeled data, e.g. AdaMerging's test inputs)."""

    inputs: torch.Tensor | Mapping[str, torch.Tensor]
    features: torch.Tensor
    tasks: torch.Tensor
    labels: torch.Tensor | None = None

    def __post_init__(self) -> None:
        n = count(self.inputs)
        for name, t in (("features", self.features), ("tasks", self.tasks), ("labels", self.labels)):
            if t is not None and len(t) != n:
                raise ValueError(f"ComposeData: {n} inputs but {len(t)} {name}")
        if self.features.dim() != 2:
            raise ValueError(f"ComposeData: features must be (N, D), got shape {tuple(self.features.shape)}")

    def __len__(self) -> int:
        return len(self.features)

    def batch(
        self, index: torch.Tensor, device: torch.device | str = "cpu", dtype: torch.dtype | None = None
    ) -> ComposeData:
        """Rows `index`, moved to `device` (floating inputs and features cast to `dtype`), with
        all-padding columns of tokenized text dropped."""
        inputs = trim_padding(take(self.inputs, index))
        inputs = to_device(inputs, device)
        if dtype is not None:
            inputs = _cast(inputs, dtype)
        feats = self.features[index].to(device=device, dtype=dtype or self.features.dtype)
        labels = None if self.labels is None else self.labels[index].to(device)
        return ComposeData(inputs, feats, self.tasks[index].to(device), labels)


def holdout_split(data: ComposeData, frac: float, fold: int = 0, seed: int = 0) -> tuple[ComposeData, ComposeData]:
    """(fit part, held-out part) of a composer's training data, cut per task from one seeded
    permutation, to choose training settings without touching test data. Fold f holds out the f-th
    slice of k = round(frac * n_task) items, and fold round(1/frac) - 1 also takes the remainder, so
    with frac = 1/K folds 0..K-1 hold out disjoint parts that cover every task's data (K-fold
    cross-validation)."""
    if not 0.0 < frac < 1.0:
        raise ValueError(f"holdout_split: frac must lie in (0, 1), got {frac}")
    folds = max(1, round(1 / frac))  # the last fold also takes the remainder, so the folds cover all items
    g = torch.Generator().manual_seed(seed)
    fit_idx, held_idx = [], []
    for t in torch.unique(data.tasks).tolist():
        idx = (data.tasks == t).nonzero().squeeze(1)
        idx = idx[torch.randperm(len(idx), generator=g)]
        n = len(idx)
        k = max(1, round(frac * n))
        if not 0 <= fold < folds or fold * k >= n:
            raise ValueError(f"holdout_split: task {t} has {n} items, so held-out parts of {k} have no fold {fold}")
        lo, hi = fold * k, (n if fold == folds - 1 else (fold + 1) * k)
        held_idx.append(idx[lo:hi])
        fit_idx.append(torch.cat([idx[:lo], idx[hi:]]))
    return data.batch(torch.cat(fit_idx).sort().values), data.batch(torch.cat(held_idx).sort().values)


def _cast(x: Any, dtype: torch.dtype) -> Any:
    if isinstance(x, Mapping):
        return {k: _cast(v, dtype) for k, v in x.items()}
    return x.to(dtype) if isinstance(x, torch.Tensor) and x.is_floating_point() else x


def trim_padding(inputs: Any) -> Any:
    """Drop trailing sequence columns where the attention mask is 0 for every row of the batch
    (exact for attention-masked encoders; saves the cost of padding to the data set's longest text)."""
    if not isinstance(inputs, Mapping) or "attention_mask" not in inputs:
        return inputs
    mask = inputs["attention_mask"]
    used = mask.any(0).nonzero()
    length = int(used.max()) + 1 if len(used) else 1
    if length == mask.shape[1]:
        return inputs
    return {k: v[:, :length] if v.dim() >= 2 and v.shape[1] == mask.shape[1] else v for k, v in inputs.items()}


def sample_noise(
    index: torch.Tensor,
    epoch: int,
    seed: int,
    samples: int,
    channels: int,
    shape: tuple[int, ...],
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
) -> torch.Tensor | None:
    """(samples, channels, len(index), *shape) noise: channel 0 standard normal, channel 1 uniform.

    Each sample's noise depends only on (seed, epoch, data index), so a run gives the same training
    trajectory on one process or on several DDP ranks that split the same global batches."""
    if channels == 0:
        return None
    out = torch.empty(len(index), samples, channels, *shape, dtype=torch.float64)
    for row, i in enumerate(index.tolist()):
        g = torch.Generator().manual_seed(((seed * _MIX + epoch) * _MIX + i) % (1 << 63))
        out[row, :, 0].normal_(generator=g)
        if channels > 1:
            out[row, :, 1].uniform_(generator=g)
    return out.permute(1, 2, 0, *range(3, out.dim())).to(device=device, dtype=dtype)


@torch.no_grad()
def compute_features(
    backbone: torch.nn.Module,
    inputs: Any,
    *,
    forward_fn: Any = None,
    batch_size: int = 256,
    advance: Callable[[int], None] | None = None,
) -> torch.Tensor:
    """f0(x): the frozen pretrained backbone's output for every input, in batches (eval mode, no
    gradients, texts bucketed by length and padding trimmed per batch), on the backbone's device;
    returned on CPU in input order. `advance(n)` is called after each batch of n inputs (a
    progress bar)."""
    fn = forward_fn or default_forward
    was_training = backbone.training
    backbone.eval()
    device = next(iter(backbone.parameters())).device
    out: torch.Tensor | None = None
    for index in length_order(inputs).split(batch_size):
        f = fn(backbone, to_device(trim_padding(take(inputs, index)), device)).cpu()
        if out is None:
            out = f.new_empty((count(inputs), *f.shape[1:]))
        out[index] = f
        if advance is not None:
            advance(len(index))
    backbone.train(was_training)
    assert out is not None, "features of no inputs"
    return out


def length_order(inputs: Any) -> torch.Tensor:
    """Row order that puts texts of similar length together (by attention mask; stable), so
    batches cut from it carry little padding; other inputs keep their order."""
    if isinstance(inputs, Mapping) and "attention_mask" in inputs:
        return torch.argsort(inputs["attention_mask"].sum(1), stable=True)
    return torch.arange(count(inputs))
