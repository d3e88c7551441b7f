"""Similarity analysis of many task vectors: streamed Gram matrix, cosine, affinity, eigengap,
spectral clustering. Everything after the Gram matrix works on T x T matrices only."""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import numpy as np
import torch

from taskvec.core.similarity import gram_matrix
from taskvec.core.stream import CHUNK_ELEMS, byte_progress
from taskvec.core.taskvector import TaskVector, check_same_tensors
from taskvec.errors import ConfigError
from taskvec.io import Source, TensorSpec

AFFINITIES = ("clip", "shift")
SLICE_BUDGET = 64 << 20  # bytes of float64 per stacked slice of all vectors (a few are in flight)


def auto_chunk(n_vectors: int, budget: int = SLICE_BUDGET) -> int:
    """Slice length such that `n_vectors` float64 slices take about `budget` bytes."""
    return int(max(1 << 14, min(CHUNK_ELEMS, budget // (8 * max(n_vectors, 1)))))


class _OneTensor:
    """A view of one tensor of a source, so the core Gram can be accumulated tensor by tensor."""

    def __init__(self, source: Source, key: str):
        self.source, self.key, self.name = source, key, source.name

    def keys(self) -> list[str]:
        return [self.key]

    def spec(self, key: str) -> TensorSpec:
        return self.source.spec(key)

    def read_flat(self, key: str, start: int = 0, stop: int | None = None) -> torch.Tensor:
        return self.source.read_flat(key, start, stop)


def gram(tvs: Sequence[TaskVector], *, chunk_elems: int | None = None, progress: bool = False) -> torch.Tensor:
    """G[i, j] = <tau_i, tau_j> in float64, streamed: one slice of each task vector in memory.

    Accumulated tensor by tensor with `core.similarity.gram_matrix` (so a progress bar can follow);
    the slice length defaults to ~64 MiB of float64 for all T slices together.
    """
    if not tvs:
        raise ConfigError("task_vectors: need at least one task vector")
    for tv in tvs[1:]:
        check_same_tensors(tvs[0].source, tv.source)
    chunk = chunk_elems or auto_chunk(len(tvs))
    g = torch.zeros(len(tvs), len(tvs), dtype=torch.float64)
    keys = tvs[0].keys()
    total = sum(tvs[0].spec(k).numel for k in keys) * len(tvs) * 4
    with byte_progress(total, f"Gram matrix of {len(tvs)} task vectors", progress) as advance:
        for key in keys:
            g += gram_matrix([TaskVector(_OneTensor(tv.source, key)) for tv in tvs], chunk)
            advance(tvs[0].spec(key).numel * len(tvs) * 4)
    return g


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
    from taskvec._optional import require

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
