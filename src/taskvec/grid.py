"""Validation grids of a merge's scale and density, searched past their edges while the best
value sits on one."""

from __future__ import annotations

from collections.abc import Callable, Sequence

LAMBDAS = (0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.7, 1.0, 1.5)
DENSITIES = (0.1, 0.2, 0.4, 0.7, 1.0)
GROW = 1.5
"""Geometric step of a grid extended past its upper edge (the lower edge is halved)."""


def extend_search(
    score: Callable[[float], float],
    grid: Sequence[float],
    *,
    lo: float = 1e-3,
    hi: float = 100.0,
    up: float = GROW,
    down: float = 0.5,
) -> tuple[float, dict[float, float]]:
    """Best value of `score` over `grid`; while the best sits on an edge of what was searched, add
    the next geometric step beyond that edge (bounded by lo, hi). Ties go to the smaller value."""
    scores: dict[float, float] = {}
    for v in sorted(set(grid)):
        scores[v] = score(v)
    while True:
        best = max(scores, key=lambda v: (scores[v], -v))
        values = sorted(scores)
        if best == values[-1] and best < hi:
            nxt = min(hi, best * up)
        elif best == values[0] and best > lo and len(values) > 1:
            nxt = max(lo, best * down)
        else:
            return best, scores
        nxt = round(nxt, 6)
        if nxt in scores:
            return best, scores
        scores[nxt] = score(nxt)
