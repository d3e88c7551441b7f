"""Choose a merge's scale lambda (and its method's density, where it has one) on the validation
data of a suite: lambda coarse to fine, then density around the best lambda, then each in turn
from there while a neighbour is better; grids grow past their edges while the best sits there."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from taskvec.bench.backbones import match_state
from taskvec.bench.prepare import prepare
from taskvec.config import MergeConfig
from taskvec.core.source import open_task
from taskvec.errors import ConfigError
from taskvec.grid import DENSITIES, LAMBDAS, OnEval, Scores, climb, coarse_steps, extend_search
from taskvec.methods import compose, get_method

DENSITY_LO, DENSITY_HI, DENSITY_UP = 0.01, 1.0, math.sqrt(2)
"""Bounds and upward step of a density grid extended past its edge."""
MAX_ROUNDS = 4
"""Alternations of lambda and density climbs after the first search of each."""


@dataclass
class TuneResult:
    """The chosen scale and params, and every (density, scale) -> mean validation accuracy searched."""

    scale: float
    params: dict[str, Any]
    val: float
    grid: list[dict[str, Any]] = field(default_factory=list)
    densities: list[float] = field(default_factory=list)

    @property
    def evaluations(self) -> int:
        """How many merged models were scored on the validation data."""
        return len(self.grid)


def full_grid_size(lambdas: Sequence[float] = LAMBDAS, densities: Sequence[float] | None = DENSITIES) -> int:
    """Evaluations of the full lambda x density grid (before any extension past its edges)."""
    return len(set(lambdas)) * (len(set(densities)) if densities else 1)


def tune_merge(
    cfg: MergeConfig,
    suite: str | Path,
    *,
    cache: Path | None = None,
    lambdas: Sequence[float] = LAMBDAS,
    densities: Sequence[float] | None = None,
    progress: bool = True,
    on_eval: OnEval | None = None,
    allow_nonfinite: bool = False,
) -> TuneResult:
    """Search lambda (and density) for `cfg` by the mean validation accuracy over the suite's tasks.

    The suite's backbone must hold the merge base's tensors (under the same names, or under the
    suite's wrapper prefix); its heads score every candidate on each task's validation split.
    Lambda is searched coarse to fine at the config's density (or the method's default); density
    then on its grid at that lambda; then lambda and density in turn step to a better neighbour
    until neither improves. The result is the best point scored (ties: smaller lambda, then smaller
    density). `on_eval(done, planned)` is called after each validation evaluation."""
    if isinstance(cfg.scale, dict):
        raise ConfigError("--tune-on chooses one scale; remove the per-layer 'scale' map from the config")
    method = get_method(cfg.method)
    has_density = "density" in method.params.model_fields
    d0 = float(cfg.params.get("density", method.params.model_fields["density"].default)) if has_density else None
    dens = sorted({*(densities or DENSITIES), d0}) if d0 is not None else []
    prep = prepare(suite, cache, progress=progress)
    assert prep.loaded is not None
    prefix = prep.loaded.prefix
    theta0 = match_state(prep.pretrained, Path(cfg.base), prefix)
    tvs = [
        open_task(m, cfg.base, include=cfg.include, exclude=cfg.exclude, allow_nonfinite=allow_nonfinite)
        for m in cfg.models
    ]
    weights = [m.weight for m in cfg.models]
    rows: dict[tuple[float | None, float], float] = {}
    deltas: dict[float | None, dict[str, torch.Tensor]] = {}
    planned = coarse_steps(len(set(lambdas))) + (coarse_steps(len(dens)) + 2 if has_density else 0)

    def bare(k: str) -> str:
        return k[len(prefix) :] if prefix and k.startswith(prefix) else k

    def delta_at(density: float | None) -> dict[str, torch.Tensor]:
        if density not in deltas:
            deltas.clear()  # one merged task vector in memory at a time
            params = {**cfg.params, **({"density": density} if density is not None else {})}
            delta = compose(tvs, cfg.method, weights, **params).to_state_dict()
            missing = [k for k in delta if prefix + k not in theta0 and k not in theta0]
            if missing:
                raise ConfigError(f"{cfg.base}: the suite's backbone has no tensor {missing[0]!r} of the merge")
            deltas[density] = delta
        return deltas[density]

    def score(density: float | None, lam: float) -> float:
        nonlocal planned
        key = (density, round(lam, 6))
        if key not in rows:
            delta = delta_at(density)
            state = dict(theta0)
            for k in theta0:
                d = delta.get(bare(k))
                if d is not None and theta0[k].is_floating_point():
                    state[k] = (theta0[k].double() + lam * d.double()).to(theta0[k].dtype)
            acc = prep.evaluate(state, "val")
            rows[key] = sum(acc.values()) / len(acc)
            planned = max(planned, len(rows))
            if on_eval is not None:
                on_eval(len(rows), planned)
        return rows[key]

    def along_lambda(density: float | None) -> Scores:
        memo = Scores(lambda lam: score(density, lam))
        memo.update({lam: v for (d, lam), v in rows.items() if d == density})
        return memo

    def along_density(lam: float) -> Scores:
        memo = Scores(lambda d: score(d, lam))
        memo.update({d: v for (d, l_), v in rows.items() if l_ == round(lam, 6) and d is not None})
        return memo

    lam, _ = extend_search(lambda v: score(d0, v), lambdas, scores=along_lambda(d0))
    if d0 is not None:
        planned = max(planned, len(rows) + coarse_steps(len(dens)) + 2)
        d, _ = extend_search(
            lambda v: score(v, lam), dens, scores=along_density(lam), lo=DENSITY_LO, hi=DENSITY_HI, up=DENSITY_UP
        )
        for _ in range(MAX_ROUNDS):
            planned = max(planned, len(rows) + 2)
            new_lam = climb(along_lambda(d), lambdas, lam)
            if new_lam == lam:
                break
            lam = new_lam
            planned = max(planned, len(rows) + 2)
            new_d = climb(along_density(lam), dens, d, lo=DENSITY_LO, hi=DENSITY_HI, up=DENSITY_UP)
            if new_d == d:
                break
            d = new_d
    (best_d, best_lam), best_val = max(rows.items(), key=lambda kv: (kv[1], -kv[0][1], -(kv[0][0] or 0.0)))
    params = {**cfg.params, **({"density": best_d} if best_d is not None else {})}
    prep.backbone.load_state_dict(prep.pretrained)
    grid = [
        {"density": d, "scale": v, "val": s}
        for (d, v), s in sorted(rows.items(), key=lambda kv: (kv[0][0] or 0, kv[0][1]))
    ]
    return TuneResult(best_lam, params, best_val, grid, sorted({d for d, _ in rows if d is not None}))


def tuned_config(cfg: MergeConfig, result: TuneResult) -> MergeConfig:
    """`cfg` with the chosen scale and params."""
    return cfg.model_copy(update={"scale": result.scale, "params": result.params})
