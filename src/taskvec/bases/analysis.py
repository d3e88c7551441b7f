"""Similarity analysis of many task vectors: streamed Gram matrix, cosine, affinity, eigengap,
spectral clustering. Everything after the Gram matrix works on T x T matrices only."""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import numpy as np
import torch

from taskvec._optional import require
from taskvec.core.similarity import gram_chunk, gram_matrix
from taskvec.core.taskvector import TaskVector
from taskvec.errors import ConfigError

AFFINITIES = ("clip", "shift")
auto_chunk = gram_chunk  # slice length of the streamed passes over many task vectors


def gram(
    tvs: Sequence[TaskVector],
    *,
    chunk_elems: int | None = None,
    progress: bool = False,
    device: str | torch.device | None = None,
) -> torch.Tensor:
    """G[i, j] = <tau_i, tau_j> in float64, streamed (see `core.similarity.gram_matrix`); the
    products run on `device` (e.g. "cuda"), reading stays on the CPU."""
    if not tvs:
        raise ConfigError("task_vectors: need at least one task vector")
    return gram_matrix(tvs, chunk_elems, progress=progress, device=device)


def cosine_from_gram(g: torch.Tensor, names: Sequence[str] | None = None) -> torch.Tensor:
    """Cosine similarity matrix from a Gram matrix; a zero task vector is an error naming it."""
    d = g.diagonal()
    if bool((d <= 0).any()):
        i = int(torch.nonzero(d <= 0)[0, 0])
        who = repr(names[i]) if names is not None else f"#{i}"
        raise ConfigError(f"task vector {who} is zero: its cosine similarity is undefined")
    n = d.sqrt()
    return (g / n[:, None] / n[None, :]).clamp(-1.0, 1.0)


def affinity(cos: torch.Tensor, kind: str = "clip") -> torch.Tensor:
    """Non-negative affinity for spectral clustering.

    'clip': max(cos, 0). The default: unrelated task vectors are near orthogonal (cos ~ 0), so they
    get affinity ~0 and the block structure of related tasks stays sharp. 'shift': (cos + 1) / 2,
    which keeps anti-correlation information but gives orthogonal pairs affinity 1/2.
    The diagonal is 1 in both.
    """
    if kind == "clip":
        a = cos.clamp(min=0.0)
    elif kind == "shift":
        a = (cos + 1.0) / 2.0
    else:
        raise ConfigError(f"affinity: unknown {kind!r}; choose one of {', '.join(AFFINITIES)}")
    a = a.clone()
    a.fill_diagonal_(1.0)
    return a


def laplacian_eigenvalues(aff: torch.Tensor) -> torch.Tensor:
    """Ascending eigenvalues of the normalized Laplacian I - D^-1/2 A D^-1/2."""
    a = aff.to(torch.float64)
    d = a.sum(1).rsqrt()
    lap = torch.eye(a.shape[0], dtype=torch.float64) - d[:, None] * a * d[None, :]
    return torch.linalg.eigvalsh((lap + lap.T) / 2)


def eigengap(aff: torch.Tensor, max_m: int | None = None) -> tuple[int, torch.Tensor]:
    """M = argmax_k (lambda_{k+1} - lambda_k), k = 1..max_m, on the normalized Laplacian's spectrum."""
    ev = laplacian_eigenvalues(aff)
    t = ev.numel()
    if t == 1:
        return 1, ev
    hi = t - 1 if max_m is None else max(1, min(max_m, t - 1))
    gaps = ev[1:] - ev[:-1]
    return int(torch.argmax(gaps[:hi])) + 1, ev


def spectral_assign(aff: torch.Tensor, m: int, seed: int = 0) -> list[int]:
    """Cluster labels 0..M'-1 (numbered by first appearance) from scikit-learn's SpectralClustering.

    M' < m only if the clustering leaves a cluster empty.
    """
    t = aff.shape[0]
    if m == 1:
        return [0] * t
    if m == t:
        return list(range(t))
    SpectralClustering = require("sklearn.cluster", "bases").SpectralClustering

    with warnings.catch_warnings():
        # a block-diagonal affinity (clusters with cos <= 0 between them) is a disconnected graph;
        # its spectral embedding is then the cluster indicators, which is what we want
        warnings.filterwarnings("ignore", message="Graph is not fully connected")
        labels = SpectralClustering(
            n_clusters=m, affinity="precomputed", random_state=seed, assign_labels="kmeans", n_init=10
        ).fit_predict(aff.numpy().astype(np.float64))
    order: dict[int, int] = {}
    for lab in labels:
        order.setdefault(int(lab), len(order))
    return [order[int(lab)] for lab in labels]
