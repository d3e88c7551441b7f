"""Features, linear probes and accuracy of a backbone on a suite's splits."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from taskvec.bench.suite import Inputs, Split


def forward_features(backbone: nn.Module, x: Inputs) -> torch.Tensor:
    return backbone(x)


@torch.no_grad()
def features(backbone: nn.Module, split: Split, batch_size: int = 256) -> torch.Tensor:
    """Features of a whole split, in eval mode, batch by batch."""
    backbone.eval()
    out = [
        forward_features(backbone, split.batch(slice(i, i + batch_size))[0]) for i in range(0, len(split), batch_size)
    ]
    return torch.cat(out)


def fit_head(
    feats: torch.Tensor, y: torch.Tensor, n_classes: int, c: float = 1.0, standardize: bool = False
) -> nn.Linear:
    """Multinomial logistic regression (scikit-learn) on frozen features, as one `nn.Linear`.

    Fitted on raw features by default: standardizing inflates the weights of near-constant
    features, and a large-norm frozen head makes fine-tuning through it unstable."""
    from taskvec._optional import require

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


@torch.no_grad()
def predict(backbone: nn.Module, head: nn.Module, split: Split, batch_size: int = 256) -> torch.Tensor:
    backbone.eval()
    out = []
    for i in range(0, len(split), batch_size):
        x, _ = split.batch(slice(i, i + batch_size))
        out.append(head(forward_features(backbone, x)).argmax(-1))
    return torch.cat(out)


def accuracy(backbone: nn.Module, head: nn.Module, split: Split, batch_size: int = 256) -> float:
    """Top-1 accuracy of backbone + head on a split."""
    return float((predict(backbone, head, split, batch_size) == split.y).float().mean())
