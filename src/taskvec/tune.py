"""Choose a merge's scale lambda (and its method's density, where it has one) on the validation
data of a suite, on a grid that grows past its edge while the best value sits there."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from taskvec.config import MergeConfig
from taskvec.core import TaskVector
from taskvec.errors import ConfigError
from taskvec.grid import DENSITIES, LAMBDAS, extend_search
from taskvec.methods import compose, get_method


@dataclass
class TuneResult:
    """The chosen scale and params, and every (density, scale) -> mean validation accuracy searched."""

    scale: float
    params: dict[str, Any]
    val: float
    grid: list[dict[str, Any]] = field(default_factory=list)
    densities: list[float] = field(default_factory=list)


def _task_vectors(cfg: MergeConfig) -> list[TaskVector]:
    tvs = []
    for m in cfg.models:
        if m.finetuned is not None:
            tvs.append(
                TaskVector.from_checkpoints(
                    cfg.base, m.finetuned, include=cfg.include, exclude=cfg.exclude or None, name=m.name
                )
            )
        else:
            assert m.task_vector is not None
            tvs.append(TaskVector.load(m.task_vector).filter(cfg.include, cfg.exclude or None))
    return tvs


def tune_merge(
    cfg: MergeConfig,
    suite: str | Path,
    *,
    cache: Path | None = None,
    lambdas: Sequence[float] = LAMBDAS,
    densities: Sequence[float] | None = None,
    progress: bool = True,
) -> TuneResult:
    """Search lambda (and density) for `cfg` by the mean validation accuracy over the suite's tasks.

    The suite's backbone must hold the merge base's tensors (under the same names, or under the
    suite's wrapper prefix); its heads score every candidate on each task's validation split."""
    from taskvec.bench.backbones import match_state
    from taskvec.bench.run import prepare

    if isinstance(cfg.scale, dict):
        raise ConfigError("--tune-on chooses one scale; remove the per-layer 'scale' map from the config")
    method = get_method(cfg.method)
    has_density = "density" in method.params.model_fields
    dens = (
        sorted(set(densities or (*DENSITIES, *([cfg.params["density"]] if "density" in cfg.params else []))))
        if has_density
        else [None]
    )
    prep = prepare(suite, cache, progress=progress)
    assert prep.loaded is not None
    prefix = prep.loaded.prefix
    theta0 = match_state(prep.pretrained, Path(cfg.base), prefix)
    tvs = _task_vectors(cfg)
    weights = [m.weight for m in cfg.models]
    rows: list[dict[str, Any]] = []
    best: tuple[float, float, float | None] | None = None

    def bare(k: str) -> str:
        return k[len(prefix) :] if prefix and k.startswith(prefix) else k

    def run(density: float | None) -> tuple[float, dict[float, float]]:
        params = {**cfg.params, **({"density": density} if density is not None else {})}
        delta = compose(tvs, cfg.method, weights, **params).to_state_dict()
        missing = [k for k in delta if prefix + k not in theta0 and k not in theta0]
        if missing:
            raise ConfigError(f"{cfg.base}: the suite's backbone has no tensor {missing[0]!r} of the merge")

        def score(lam: float) -> float:
            state = dict(theta0)
            for k in theta0:
                d = delta.get(bare(k))
                if d is not None and theta0[k].is_floating_point():
                    state[k] = (theta0[k].double() + lam * d.double()).to(theta0[k].dtype)
            acc = prep.evaluate(state, "val")
            return sum(acc.values()) / len(acc)

        return extend_search(score, lambdas)

    for d in dens:
        lam, scores = run(d)
        rows += [{"density": d, "scale": v, "val": s} for v, s in sorted(scores.items())]
        if best is None or (scores[lam], -lam) > (best[0], -best[1]):
            best = (scores[lam], lam, d)
    assert best is not None
    if has_density and best[2] is not None:  # a best density on the grid's edge: search past it too
        done = {d for d in dens if d is not None}

        def dens_score(d: float) -> float:
            if d not in done:
                _, scores = run(d)
                rows.extend({"density": d, "scale": v, "val": s} for v, s in sorted(scores.items()))
                done.add(d)
            return max(r["val"] for r in rows if r["density"] == d)

        d_best, _ = extend_search(dens_score, sorted(done), lo=0.01, hi=1.0, up=math.sqrt(2))
        cand = [r for r in rows if r["density"] == d_best]
        top = max(cand, key=lambda r: (r["val"], -r["scale"]))
        best = (top["val"], top["scale"], d_best)
    params = {**cfg.params, **({"density": best[2]} if best[2] is not None else {})}
    prep.backbone.load_state_dict(prep.pretrained)
    return TuneResult(best[1], params, best[0], rows, sorted({r["density"] for r in rows if r["density"] is not None}))


def tuned_config(cfg: MergeConfig, result: TuneResult) -> MergeConfig:
    """`cfg` with the chosen scale and params."""
    return cfg.model_copy(update={"scale": result.scale, "params": result.params})
