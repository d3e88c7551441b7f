"""Validation searches of a merge's scale and density: coarse to fine over a grid, past its edges
while the best value sits on one, and a local climb from a known point."""

from __future__ import annotations

from collections.abc import Callable, Sequence

LAMBDAS = (0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.7, 1.0, 1.5)
DENSITIES = (0.1, 0.2, 0.4, 0.7, 1.0)
GROW = 1.5
"""Geometric step of a grid extended past its upper edge (the lower edge is halved)."""

OnEval = Callable[[int, int], None]
"""Progress callback: (evaluations done, evaluations planned so far)."""


class Scores(dict[float, float]):
    """value -> score, each value scored once (a memo shared by the searches of one quantity)."""

    def __init__(self, score: Callable[[float], float], on_eval: OnEval | None = None, planned: int = 0):
        super().__init__()
        self.score, self.on_eval, self.planned = score, on_eval, planned

    def at(self, v: float) -> float:
        v = round(v, 6)
        if v not in self:
            self[v] = self.score(v)
            self.planned = max(self.planned, len(self))
            if self.on_eval is not None:
                self.on_eval(len(self), self.planned)
        return self[v]

    def best(self, among: Sequence[float] | None = None) -> float:
        """The best value scored (or the best of `among`); ties go to the smaller value."""
        values = list(self) if among is None else [round(v, 6) for v in among]
        return max(values, key=lambda v: (self[v], -v))


def coarse_steps(n: int) -> int:
    """Evaluations a coarse-to-fine search of an n-point grid makes at most (before any extension)."""
    if n <= 3:
        return n
    stride = _stride(n)
    coarse = len(range(0, n, stride)) + (0 if (n - 1) % stride == 0 else 1)
    return coarse + 2 * (stride.bit_length() - 1)


def _stride(n: int) -> int:
    stride = 1
    while 2 * stride <= (n - 1) // 2:
        stride *= 2
    return stride


def extend_search(
    score: Callable[[float], float],
    grid: Sequence[float],
    *,
    lo: float = 1e-3,
    hi: float = 100.0,
    up: float = GROW,
    down: float = 0.5,
    on_eval: OnEval | None = None,
    scores: Scores | None = None,
) -> tuple[float, dict[float, float]]:
    """Best value of `score` over `grid` and every value scored. Ties go to the smaller value.

    Coarse to fine: every `stride`-th grid point first, then the points half a stride either side
    of the best, down to its neighbours (the grid's best for a score with one peak, in about
    2 log2(n) evaluations instead of n); then, while the best sits on an edge of what was searched,
    the next geometric step beyond that edge (bounded by lo, hi). `on_eval(done, planned)` is
    called after each evaluation."""
    memo = scores if scores is not None else Scores(score, on_eval)
    values = sorted({round(v, 6) for v in grid})
    memo.planned = max(memo.planned, len(memo) + coarse_steps(len(values)))
    stride = _stride(len(values)) if len(values) > 3 else 1
    coarse = [*values[::stride], values[-1]]
    for v in coarse:
        memo.at(v)
    b = values.index(memo.best(coarse))
    while stride > 1:
        stride //= 2
        for i in (b - stride, b + stride):
            if 0 <= i < len(values):
                memo.at(values[i])
        b = values.index(memo.best([values[i] for i in range(len(values)) if values[i] in memo]))
    best = _extend(memo, lo, hi, up, down)
    return best, dict(memo)


def _extend(memo: Scores, lo: float, hi: float, up: float, down: float) -> float:
    """Step past the edge of what `memo` holds while its best value sits there."""
    while True:
        best = memo.best()
        values = sorted(memo)
        if best == values[-1] and best < hi:
            nxt = min(hi, best * up)
        elif best == values[0] and best > lo and len(values) > 1:
            nxt = max(lo, best * down)
        else:
            return best
        if round(nxt, 6) in memo:
            return best
        memo.planned += 1
        memo.at(nxt)


def climb(
    memo: Scores,
    grid: Sequence[float],
    start: float,
    *,
    lo: float = 1e-3,
    hi: float = 100.0,
    up: float = GROW,
    down: float = 0.5,
) -> float:
    """From `start`, step to the better neighbour on `grid` (past its edges geometrically, bounded
    by lo and hi) until neither neighbour is better; returns the value reached. Scores already in
    `memo` are reused."""
    values = sorted({round(v, 6) for v in (*grid, *memo, start)})
    cur = round(start, 6)
    memo.at(cur)
    while True:
        i = values.index(cur)
        below = values[i - 1] if i > 0 else (round(max(lo, cur * down), 6) if cur > lo else None)
        above = values[i + 1] if i + 1 < len(values) else (round(min(hi, cur * up), 6) if cur < hi else None)
        near = [v for v in (below, above) if v is not None and v != cur]
        memo.planned += sum(v not in memo for v in near)
        for v in near:
            memo.at(v)
        nxt = memo.best([cur, *near])
        if nxt == cur:
            return cur
        values = sorted({*values, *near})
        cur = nxt
