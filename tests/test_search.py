"""The coarse-to-fine search of a merge's scale: the same choice as the full grid on the validation
scores recorded by real suite runs, in fewer evaluations; exact on every single-peaked grid."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from taskvec.grid import LAMBDAS, Scores, climb, coarse_steps, extend_search

RESULTS = Path(__file__).parents[1] / "benchmarks" / "results" / "suites"


def _recorded() -> list[tuple[str, str, float, dict[float, float]]]:
    """(suite, method, chosen lambda, lambda -> mean validation accuracy) of the full-grid runs
    recorded under benchmarks/results/suites by the full-grid search (vision-4 predates the grid's
    extension past its edge; the suites rerun since record only the points the search asked for)."""
    out = []
    for suite in ("tiny-far", "text-3", "vision-6-far"):
        r = json.loads((RESULTS / suite / "results.json").read_text())
        runs = {**r["methods"], **({"bases": r["bases"]} if "bases" in r else {})}
        for name, run in runs.items():
            val = {round(float(k), 6): sum(v.values()) / len(v) for k, v in run["val"].items()}
            out.append((suite, name, float(run["lambda"]), val))
    return out


@pytest.mark.parametrize(("suite", "method", "chosen", "val"), _recorded(), ids=lambda x: str(x)[:20])
def test_same_choice_as_the_full_grid_on_recorded_scores(
    suite: str, method: str, chosen: float, val: dict[float, float]
) -> None:
    asked: list[float] = []

    def score(lam: float) -> float:
        asked.append(lam)
        return val[round(lam, 6)]  # a point the full grid did not score would raise KeyError

    progress: list[tuple[int, int]] = []
    best, scores = extend_search(score, LAMBDAS, lo=0.005, on_eval=lambda d, p: progress.append((d, p)))
    assert best == chosen
    assert len(asked) == len(set(asked)) == len(scores) < len(val)
    assert [d for d, _ in progress] == list(range(1, len(asked) + 1))
    assert all(p >= d for d, p in progress)


@pytest.mark.parametrize("n", [1, 2, 3, 4, 5, 8, 9, 16, 17])
def test_exact_on_every_single_peaked_grid(n: int) -> None:
    grid = [0.1 * (i + 1) for i in range(n)]
    for peak in range(n):
        calls: list[float] = []

        def score(v: float, peak: int = peak, calls: list[float] = calls) -> float:
            calls.append(v)
            return -abs(round(v / 0.1) - 1 - peak)

        best, _ = extend_search(score, grid, lo=grid[0], hi=grid[-1])
        assert best == round(grid[peak], 6)
        assert len(calls) <= coarse_steps(n)


def test_climb_walks_to_the_peak_and_past_the_grid_edge() -> None:
    peak = 2.0
    memo = Scores(lambda v: -abs(v - peak))
    assert climb(memo, LAMBDAS, 0.4) == 1.5 * 1.5  # along the grid, then one 1.5x step past its edge
    assert {0.3, 0.5, 0.7, 1.0, 1.5, 2.25} <= set(memo)
    memo = Scores(lambda v: -abs(v - 0.2))
    assert climb(memo, LAMBDAS, 0.2) == 0.2 and sorted(memo) == [0.1, 0.2, 0.3]  # neighbours only
