"""Fitting M bases to T task vectors from their Gram matrix, and reconstructing tasks from them.

Every method represents task i by a decoder column d_i: tau_i ~ sum_m d_i[m] s_m. The decoder is
the least-squares fit on the bases (on its cluster's basis alone for 'cluster'), and the error
of each task is exact from three small matrices:

    ||tau_i - S d_i||^2 = G_ii - 2 d_i^T C[:, i] + d_i^T H d_i,   C = S^T V,  H = S^T S.

For the linear methods ('learned', 'pca') S = V W, so C = W^T G and H = W^T G W come from G alone.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from pydantic import Field, ValidationError, model_validator

from taskvec.bases.analysis import AFFINITIES, auto_chunk, cosine_from_gram, eigengap, gram, spectral_assign
from taskvec.bases.analysis import affinity as affinity_matrix
from taskvec.bases.passes import cluster_pass, merged_basis, tapped
from taskvec.config import Strict
from taskvec.core.taskvector import TaskVector, check_same_tensors
from taskvec.errors import ConfigError, UnknownMethodError, format_validation_error
from taskvec.methods import get_method
from taskvec.methods.registry import parse_params
from taskvec.registry import Registry


# ---------------------------------------------------------------- options
def check_m(m: int | None, t: int, option: str = "m") -> None:
    if m is None:
        return
    if isinstance(m, bool) or not isinstance(m, int):
        raise ConfigError(f"{option}: must be an integer number of bases, got {m!r}")
    if m < 1:
        raise ConfigError(f"{option}: must be at least 1, got {m}")
    if m > t:
        raise ConfigError(f"{option}={m} exceeds the number of task vectors T={t}; choose {option} <= {t}")


def check_method(method: str) -> None:
    if method not in BASES:
        raise UnknownMethodError(f"method: unknown bases method {method!r}; choose one of {', '.join(BASES.known())}")


def check_merge(merge: str, params: dict[str, object]) -> dict[str, object]:
    """'mean' (no parameters) or a registered static merge method with valid parameters."""
    if merge == "mean":
        if params:
            raise ConfigError(f"merge 'mean' takes no parameters, got {', '.join(params)}")
        return {}
    method = get_method(merge)
    parse_params(method, dict(params))
    return dict(params)


def check_names(names: Sequence[str] | None, tvs: Sequence[TaskVector]) -> list[str]:
    if names is None:  # a task vector loaded from a file is named after the file
        names = [Path(tv.name).name.removesuffix(".safetensors") if os.sep in tv.name else tv.name for tv in tvs]
    names = [str(n) for n in names]
    if len(names) != len(tvs):
        raise ConfigError(f"names: {len(names)} names for {len(tvs)} task vectors")
    seen: set[str] = set()
    for n in names:
        if n in seen:
            raise ConfigError(f"names: {n!r} appears twice; every task needs its own name")
        if "," in n or not n:
            raise ConfigError(f"names: {n!r} is not a valid task name (non-empty, no commas)")
        seen.add(n)
    return names


# ---------------------------------------------------------------- small linear algebra
def lsq(h: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """argmin_D ||V - S D|| given H = S^T S and C = S^T V: D = H^+ C (pseudo-inverse, rank safe)."""
    return torch.linalg.lstsq(h, c, driver="gelsd").solution if h.numel() else c


def relative_errors(
    gdiag: torch.Tensor, cross: torch.Tensor, hgram: torch.Tensor, decoder: torch.Tensor
) -> torch.Tensor:
    """||tau_i - S d_i|| / ||tau_i|| for every task, from G_ii, C, H on the support of d_i.

    NaN where a needed statistic is unknown."""
    out = torch.empty(decoder.shape[1], dtype=torch.float64)
    for i in range(decoder.shape[1]):
        sup = torch.nonzero(decoder[:, i] != 0).flatten()
        d = decoder[sup, i]
        e2 = gdiag[i] - 2 * torch.dot(d, cross[sup, i]) + d @ hgram[sup][:, sup] @ d
        out[i] = math.sqrt(max(float(e2), 0.0) / float(gdiag[i])) if not math.isnan(float(e2)) else float("nan")
    return out


def farthest_seeds(cos: torch.Tensor, m: int) -> list[int]:
    """M mutually dissimilar tasks: the most central one first, then each the least similar to those chosen."""
    seeds = [int(torch.argmax(cos.clamp(min=0).sum(1)))]
    while len(seeds) < m:
        closest = cos[:, seeds].max(1).values
        closest[seeds] = float("inf")
        seeds.append(int(torch.argmin(closest)))
    return seeds


# ---------------------------------------------------------------- methods
def fit_pca(g: torch.Tensor, m: int) -> tuple[torch.Tensor, dict[str, Any]]:
    """Uncentred PCA through G = U L U^T: basis k is V u_k (norm sqrt(l_k)), so W = U_M, D = U_M^T.

    Bases keep the task vectors' scale (unit-norm bases of a huge model would underflow in fp16).
    """
    evals, evecs = torch.linalg.eigh(g)
    evals, evecs = evals.flip(0), evecs.flip(1)
    tol = 1e-12 * float(evals[0]) * g.shape[0]
    rank = int((evals > tol).sum())
    if m > rank:
        raise ConfigError(
            f"m={m}: the task vectors span only {rank} dimensions (rank of their Gram matrix); use m <= {rank} for pca"
        )
    w = evecs[:, :m].clone()
    for k in range(m):  # a deterministic sign: the largest coefficient positive
        if w[int(torch.argmax(w[:, k].abs())), k] < 0:
            w[:, k] = -w[:, k]
    return w, {"eigenvalues": [float(x) for x in evals]}


def fit_learned(
    g: torch.Tensor,
    m: int,
    *,
    temperature: float = 1.0,
    steps: int = 1000,
    lr: float = 0.05,
    seed: int = 0,
    normalize: bool = False,
    patience: int = 200,
) -> tuple[torch.Tensor, dict[str, Any]]:
    """Convex bases S = V softmax(A / t) trained with Adam on the Gram matrix alone.

    Loss ||V - V W D||_F^2 / tr(G) = (tr G - 2 tr(G W D) + tr(D^T W^T G W D)) / tr G, with D the
    exact least-squares decoder for the current W (solved in closed form inside the loss, so Adam
    only moves A); it stops early after `patience` steps without improvement. `normalize` uses
    unit-norm task vectors (the cosine matrix) instead, so every task weighs the same; the returned
    W is then expressed on the raw task vectors.
    """
    t = g.shape[0]
    if temperature <= 0:
        raise ConfigError(f"temperature: must be positive, got {temperature}")
    if steps < 0:
        raise ConfigError(f"steps: must be >= 0, got {steps}")
    if lr <= 0:
        raise ConfigError(f"lr: must be positive, got {lr}")
    scale = g.diagonal().sqrt() if normalize else torch.ones(t, dtype=torch.float64)
    gn = g / scale[:, None] / scale[None, :]
    tr = gn.trace()
    gen = torch.Generator().manual_seed(seed)
    logits = 0.01 * torch.randn(t, m, generator=gen, dtype=torch.float64)
    if t > 1:
        alpha = 0.8  # initial weight of each basis' seed task
        for j, s in enumerate(farthest_seeds(cosine_from_gram(g), m)):
            logits[s, j] += math.log(alpha * (t - 1) / (1 - alpha))
    a = (temperature * logits).requires_grad_(True)
    ridge = 1e-12 * float(tr) * torch.eye(m, dtype=torch.float64)

    def loss_of(a: torch.Tensor) -> torch.Tensor:
        w = torch.softmax(a / temperature, dim=0)
        gw = gn @ w
        h = w.T @ gw + ridge
        c = gw.T
        d = torch.linalg.solve(h, c)
        return (tr - 2 * (c * d).sum() + (d * (h @ d)).sum()) / tr

    opt = torch.optim.Adam([a], lr=lr)
    best, best_a, best_step = float("inf"), a.detach().clone(), 0
    first: float | None = None
    done = 0
    for step in range(steps + 1):
        opt.zero_grad()
        loss = loss_of(a)
        val = loss.detach().item()
        first = val if first is None else first
        if val < best - 1e-12 * abs(best) or best == float("inf"):
            best, best_a, best_step = val, a.detach().clone(), step
        done = step
        if step == steps or step - best_step > patience or val < 1e-14:
            break
        loss.backward()
        opt.step()
    w = torch.softmax(best_a / temperature, dim=0)
    info = {
        "temperature": temperature,
        "steps": steps,
        "steps_run": done,
        "lr": lr,
        "seed": seed,
        "normalize": normalize,
        "initial_loss": first,
        "final_loss": best,
        "logits": best_a.tolist(),
    }
    return w / scale[:, None], info


# ---------------------------------------------------------------- the fit
@dataclass
class BasisFit:
    """M bases fitted to T task vectors: how they are built and how each task is decoded.

    `mixing` (T x M, linear methods): s_m = sum_i mixing[i, m] tau_i. `assignments` (cluster):
    the basis of each task. `decoder` (M x T): tau_i ~ sum_m decoder[m, i] s_m. `cross` = S^T V
    and `basis_gram` = S^T S (float64, NaN where unknown) give the exact errors.
    """

    method: str
    names: list[str]
    gram: torch.Tensor
    decoder: torch.Tensor
    cross: torch.Tensor
    basis_gram: torch.Tensor
    mixing: torch.Tensor | None = None
    assignments: list[int] | None = None
    merge: str | None = None
    merge_params: dict[str, object] = field(default_factory=dict)
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def m(self) -> int:
        return int(self.decoder.shape[0])

    @property
    def t(self) -> int:
        return len(self.names)

    def relative_errors(self) -> torch.Tensor:
        return relative_errors(self.gram.diagonal(), self.cross, self.basis_gram, self.decoder)

    def members(self, m: int) -> list[int]:
        assert self.assignments is not None
        return [i for i, a in enumerate(self.assignments) if a == m]

    def basis(self, task_vectors: Sequence[TaskVector], k: int) -> TaskVector:
        """Basis k as a lazy task vector of the original task vectors."""
        if self.mixing is not None:
            return TaskVector.sum(task_vectors, self.mixing[:, k].tolist())
        return merged_basis([task_vectors[i] for i in self.members(k)], self.merge or "mean", self.merge_params)

    def bases(self, task_vectors: Sequence[TaskVector]) -> list[TaskVector]:
        """The M bases as lazy task vectors of the original task vectors."""
        return [self.basis(task_vectors, k) for k in range(self.m)]

    def reconstruct(self, task_vectors: Sequence[TaskVector], i: int | str) -> TaskVector:
        """Task i as decoded from the bases, lazily (reads the original task vectors)."""
        i = self.names.index(i) if isinstance(i, str) else i
        name = f"{self.names[i]} (from {self.m} {self.method} bases)"
        if self.mixing is not None:
            tv = TaskVector.sum(task_vectors, (self.mixing @ self.decoder[:, i]).tolist())
        else:
            assert self.assignments is not None
            k = self.assignments[i]
            tv = self.basis(task_vectors, k).scale(float(self.decoder[k, i]))
        tv.name = name
        return tv


def fit_structure(
    g: torch.Tensor,
    names: list[str],
    method: str,
    m: int | None,
    *,
    affinity: str = "clip",
    max_m: int | None = None,
    **options: Any,
) -> BasisFit:
    """Everything that needs only G. `options` are the method's (see BASES); for a method with
    clusters ('cluster'), the decoder and statistics still need a pass over the task vectors."""
    kind = BASES.get(method)
    t = g.shape[0]
    check_m(m, t)
    check_m(max_m, t, "max_m")
    own = set(kind.config.model_fields) - {"method"}
    unknown = set(options) - fit_options()
    if unknown:
        raise ConfigError(
            f"bases method {method!r}: unknown option(s) {', '.join(sorted(unknown))}; "
            f"its options: {', '.join(sorted(own)) or 'none'}"
        )
    try:  # options of other methods (e.g. a shared config's defaults) do not apply to this one
        opts = kind.config(method=method, **{k: v for k, v in options.items() if k in own})
    except ValidationError as e:
        raise ConfigError(f"bases method {method!r}: {format_validation_error(e)}") from None
    if affinity not in AFFINITIES:
        raise ConfigError(f"affinity: unknown {affinity!r}; choose one of {', '.join(AFFINITIES)}")
    cos = cosine_from_gram(g, names)
    aff = affinity_matrix(cos, affinity)
    chosen, evals = eigengap(aff, max_m)
    info: dict[str, Any] = {
        "affinity": affinity,
        "laplacian_eigenvalues": [float(x) for x in evals],
        "eigengap_m": chosen,
        "m_from": "given" if m is not None else "eigengap",
    }
    return kind.build(opts, g, names, m if m is not None else chosen, aff, info)


def linear_fit(method: str, g: torch.Tensor, names: list[str], w: torch.Tensor, info: dict[str, Any]) -> BasisFit:
    """A fit whose bases mix the task vectors with weights W (T, M): C = W^T G, H = W^T G W."""
    cross = w.T @ g
    hgram = w.T @ g @ w
    hgram = (hgram + hgram.T) / 2
    return BasisFit(method, names, g, lsq(hgram, cross), cross, hgram, w, None, None, {}, info)


class ClusterOptions(Strict):
    """Spectral clustering of the tasks on cosine similarity; each cluster merged into one basis."""

    method: str = "cluster"
    merge: str = "mean"
    merge_params: dict[str, Any] = Field(default_factory=dict)
    seed: int = 0

    @model_validator(mode="after")
    def _merge(self) -> ClusterOptions:
        self.merge_params = check_merge(self.merge, dict(self.merge_params))
        return self


def build_cluster(
    opts: ClusterOptions, g: torch.Tensor, names: list[str], m: int, aff: torch.Tensor, info: dict[str, Any]
) -> BasisFit:
    """Assignments only: the merged bases and their statistics come from a pass (set_cluster_stats)."""
    t = g.shape[0]
    assign = spectral_assign(aff, m, opts.seed)
    mm = max(assign) + 1
    info.update(requested_m=m, seed=opts.seed)
    nan = float("nan")
    return BasisFit(
        opts.method,
        names,
        g,
        torch.zeros(mm, t, dtype=torch.float64),
        torch.full((mm, t), nan, dtype=torch.float64),
        torch.full((mm, mm), nan, dtype=torch.float64),
        None,
        assign,
        opts.merge,
        opts.merge_params,
        info,
    )


class LearnedOptions(Strict):
    """Convex bases trained on the Gram matrix (see fit_learned)."""

    method: str = "learned"
    temperature: float = Field(1.0, gt=0)
    steps: int = Field(1000, ge=0)
    lr: float = Field(0.05, gt=0)
    seed: int = 0
    normalize: bool = False


def build_learned(
    opts: LearnedOptions, g: torch.Tensor, names: list[str], m: int, aff: torch.Tensor, info: dict[str, Any]
) -> BasisFit:
    w, extra = fit_learned(
        g, m, temperature=opts.temperature, steps=opts.steps, lr=opts.lr, seed=opts.seed, normalize=opts.normalize
    )
    return linear_fit(opts.method, g, names, w, {**info, **extra})


class PcaOptions(Strict):
    """Uncentred PCA of the task vectors (see fit_pca); no options."""

    method: str = "pca"


def build_pca(
    opts: PcaOptions, g: torch.Tensor, names: list[str], m: int, aff: torch.Tensor, info: dict[str, Any]
) -> BasisFit:
    w, extra = fit_pca(g, m)
    return linear_fit(opts.method, g, names, w, {**info, **extra})


BasesBuilder = Callable[[Any, torch.Tensor, list[str], int, torch.Tensor, dict[str, Any]], BasisFit]
BASES: Registry[BasesBuilder] = Registry("bases method", key="method", group="taskvec.bases_methods")
"""Bases methods by name: options model and `build(options, G, names, M, affinity, info) -> BasisFit`."""
BASES.register("cluster", ClusterOptions, build_cluster)
BASES.register("learned", LearnedOptions, build_learned, "convex bases learned on the Gram matrix")
BASES.register("pca", PcaOptions, build_pca, "uncentred PCA through the Gram matrix")
METHODS = tuple(BASES.known())
"""The built-in bases methods (`BASES.names()` adds those of other packages)."""
FIT_OPTIONS = {"affinity", "max_m"} | {f for k in METHODS for f in BASES.get(k).config.model_fields if f != "method"}


def fit_options() -> set[str]:
    """Every option name of `fit_bases`: affinity, max_m and each bases method's own."""
    return {"affinity", "max_m"} | {f for k in BASES.kinds() for f in k.config.model_fields if f != "method"}


def set_cluster_stats(fit: BasisFit, k: int, h: float, c: torch.Tensor) -> None:
    """Record ||s_k||^2 and <s_k, tau_j> for the members j of cluster k, and their decoder: c_j / h."""
    idx = fit.members(k)
    fit.basis_gram[k, k] = h
    fit.cross[k, idx] = c
    fit.decoder[:, idx] = 0.0
    fit.decoder[k, idx] = c / h if h > 0 else 0.0


def fit_bases(
    task_vectors: Sequence[TaskVector],
    names: Sequence[str] | None = None,
    method: str = "cluster",
    m: int | None = None,
    *,
    gram_matrix: torch.Tensor | None = None,
    affinity: str = "clip",
    max_m: int | None = None,
    chunk_elems: int | None = None,
    progress: bool = False,
    **options: Any,
) -> BasisFit:
    """Fit M bases to the task vectors in memory (nothing written). `m=None`: the eigengap's M.

    `options` are the method's (BASES: e.g. merge/merge_params/seed for 'cluster'). Pass
    `gram_matrix` (from `bases.gram`) to fit several M without re-reading the task vectors.
    A method with clusters streams each merged basis once to measure its statistics.
    """
    check_method(method)
    tvs = list(task_vectors)
    names_ = check_names(names, tvs)
    for tv in tvs[1:]:
        check_same_tensors(tvs[0].source, tv.source)
    g = gram_matrix if gram_matrix is not None else gram(tvs, chunk_elems=chunk_elems, progress=progress)
    if g.shape != (len(tvs), len(tvs)):
        raise ConfigError(f"gram_matrix: shape {list(g.shape)} does not match {len(tvs)} task vectors")
    fit = fit_structure(g.to(torch.float64), names_, method, m, affinity=affinity, max_m=max_m, **options)
    if fit.mixing is None:  # clusters: each basis is a merge of its members
        for k in range(fit.m):
            members = [tapped(tvs[i]) for i in fit.members(k)]
            basis = merged_basis(members, fit.merge or "mean", fit.merge_params)
            dtype = basis.spec(basis.keys()[0]).dtype
            h, c, _ = cluster_pass(
                basis,
                members,
                dtype,
                chunk_elems=chunk_elems or auto_chunk(len(members) + 1),
                progress=progress,
                description=f"basis {k}",
            )
            set_cluster_stats(fit, k, h, c)
    return fit


def reconstruct_tasks(
    task_vectors: Sequence[TaskVector],
    m: int | None,
    method: str = "learned",
    **options: Any,
) -> list[TaskVector]:
    """Each task vector as reconstructed from M bases fitted to all of them (lazy task vectors).

    The entry point for an accuracy-vs-M curve: `reconstruct_tasks(tvs, m, 'pca')[i].apply_to(base)`.
    Options are those of `fit_bases` (pass `gram_matrix=` to reuse one Gram matrix across M).
    """
    fit = fit_bases(task_vectors, options.pop("names", None), method, m, **options)
    return [fit.reconstruct(task_vectors, i) for i in range(fit.t)]
