"""Features, linear probes and accuracy of a backbone on a suite's splits."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from taskvec._optional import require
from taskvec.bench.backbones import Inputs
from taskvec.bench.data import Split


def forward_features(backbone: nn.Module, x: Inputs) -> torch.Tensor:
    return backbone(x)


def eval_batches(split: Split, batch_size: int = 256) -> list[torch.Tensor]:
    """Row indices of a split in batches for evaluation: texts sorted by length, so each batch is
    padded only to its own longest text (images in order)."""
    if isinstance(split.x, dict) and "attention_mask" in split.x:
        order = torch.argsort(split.x["attention_mask"].sum(1), stable=True)
    else:
        order = torch.arange(len(split))
    return list(order.split(batch_size))


@torch.no_grad()
def features(backbone: nn.Module, split: Split, batch_size: int = 256) -> torch.Tensor:
    """Features of a whole split, in eval mode, batch by batch (texts bucketed by length), in split order."""
    backbone.eval()
    out: torch.Tensor | None = None
    for idx in eval_batches(split, batch_size):
        f = forward_features(backbone, split.batch(idx)[0])
        if out is None:
            out = f.new_empty((len(split), *f.shape[1:]))
        out[idx] = f
    assert out is not None, "features of an empty split"
    return out


def fit_head(
    feats: torch.Tensor, y: torch.Tensor, n_classes: int, c: float = 1.0, standardize: bool = False
) -> nn.Linear:
    """Multinomial logistic regression (scikit-learn) on frozen features, as one `nn.Linear`.

    Fitted on raw features by default: standardizing inflates the weights of near-constant
    features, and a large-norm frozen head makes fine-tuning through it unstable."""
    LogisticRegression = require("sklearn.linear_model", "bench").LogisticRegression

    x = feats.double().numpy()
    mu, sd = (x.mean(0), x.std(0) + 1e-6) if standardize else (np.zeros(x.shape[1]), np.ones(x.shape[1]))
    clf = LogisticRegression(C=c, max_iter=3000)
    clf.fit((x - mu) / sd, y.numpy())
    w = np.zeros((n_classes, x.shape[1]))
    b = np.zeros(n_classes)
    w[clf.classes_] = clf.coef_ / sd  # classes absent from the training split keep zero logits
    b[clf.classes_] = clf.intercept_ - (clf.coef_ / sd) @ mu
    if len(clf.classes_) == 2 and n_classes >= 2:  # binary sklearn stores one row
        w[:], b[:] = 0, 0
        w[clf.classes_[1]], b[clf.classes_[1]] = clf.coef_[0] / sd, clf.intercept_[0] - (clf.coef_[0] / sd) @ mu
    head = nn.Linear(x.shape[1], n_classes)
    with torch.no_grad():
        head.weight.copy_(torch.from_numpy(w))
        head.bias.copy_(torch.from_numpy(b))
    head.requires_grad_(False)
    return head


@torch.inference_mode()
def predict(backbone: nn.Module, head: nn.Module, split: Split, batch_size: int = 256) -> torch.Tensor:
    """Predicted class of every row of a split (texts bucketed by length), in split order."""
    backbone.eval()
    out = torch.empty(len(split), dtype=torch.long)
    for idx in eval_batches(split, batch_size):
        x, _ = split.batch(idx)
        out[idx] = head(forward_features(backbone, x)).argmax(-1)
    return out


def accuracy(backbone: nn.Module, head: nn.Module, split: Split, batch_size: int = 256) -> float:
    """Top-1 accuracy of backbone + head on a split."""
    return float((predict(backbone, head, split, batch_size) == split.y).float().mean())
