"""`bench run` in saved stages, on a small real suite (a small network on scikit-learn's
digits, three tasks): a run stopped between stages writes the table of what it
finished, and the rerun goes on from the first unfinished stage with the same results; the plan;
the terminal table at 80 columns."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from rich.console import Console
from torch import nn
from typer.testing import CliRunner

import taskvec.bench.prepare as prepare_mod
import taskvec.bench.run as run_mod
from taskvec.bench.prepare import load_data
from taskvec.bench.report import print_table
from taskvec.bench.run import plan_suite, run_suite
from taskvec.bench.suite import load_suite
from taskvec.cli import app
from taskvec.errors import OutputError

pytest.importorskip("sklearn")


def small_mlp() -> nn.Module:
    """A `factory:` backbone: a small network from 3x8x8 images to 16 features."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(192, 32), nn.ReLU(), nn.Linear(32, 16))


def digits(kind: str) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """A `function:` data source: scikit-learn's digits, their parity, or the digits mirrored."""
    from taskvec.bench.assets import load_sklearn_digits

    x, y, classes = load_sklearn_digits()
    if kind == "parity":
        return x, y % 2, ["even", "odd"]
    if kind == "mirrored":
        return np.ascontiguousarray(x[:, :, ::-1]), y, classes
    return x, y, classes


SUITE = """\
name: stages
backbone:
  factory: test_bench_stages:small_mlp
  images: {size: 8, mean: [0.5, 0.5, 0.5], std: [0.5, 0.5, 0.5]}
head: {kind: prototype, shots: 8}
finetune: {epochs: 2, batch_size: 32, lr: 1.0e-3}
compose:
  bases: {m: 2}
  learned: [atlas_task]
  train: {epochs: 1, batch_size: 64, lr: 1.0e-2}
tasks:
"""


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path, dict[str, Any]]:
    """The suite file, its cache, and one uninterrupted run of it (folder and results)."""
    root = tmp_path_factory.mktemp("stages")
    text = SUITE + "".join(
        f"  - name: {k}\n    data: {{kind: function, function: test_bench_stages:digits, kwargs: {{kind: {k}}}}}\n"
        "    split: {train: 96, val: 32, test: 32}\n"
        for k in ("digits", "parity", "mirrored")
    )
    (root / "suite.yaml").write_text(text)
    full = _run(root / "suite.yaml", root / "full", root / "cache")
    return root / "suite.yaml", root / "cache", root / "full", full


@pytest.fixture
def suite_file(project: tuple[Path, Path, Path, dict[str, Any]]) -> Path:
    return project[0]


def _run(suite: Path, out: Path, cache: Path, console: Console | None = None) -> dict[str, Any]:
    return run_suite(
        load_suite(suite),
        ["task_arithmetic", "ties"],
        out_dir=out,
        cache=cache,
        progress=False,
        console=console or Console(width=100, record=True),
    )


def _count(monkeypatch: pytest.MonkeyPatch, name: str, calls: dict[str, int], module: Any = run_mod) -> None:
    orig = getattr(module, name)

    def counted(*a: Any, **k: Any) -> Any:
        calls[name] = calls.get(name, 0) + 1
        return orig(*a, **k)

    monkeypatch.setattr(module, name, counted)


def _same(a: dict[str, Any], b: dict[str, Any]) -> None:
    """Same accuracies, λ and validation scores (times differ from run to run)."""
    for k in ("pretrained", "pretrained_val", "finetuned", "negation"):
        assert a[k] == b[k], k
    for m in a["methods"]:
        assert {x: v for x, v in a["methods"][m].items() if x != "seconds"} == {
            x: v for x, v in b["methods"][m].items() if x != "seconds"
        }
    assert a["bases"]["test"] == b["bases"]["test"] and a["bases"]["lambda"] == b["bases"]["lambda"]
    assert [r["test"] for r in a["learned"]["atlas_task"]] == [r["test"] for r in b["learned"]["atlas_task"]]


def test_an_interrupted_run_writes_its_table_and_the_rerun_goes_on(
    project: tuple[Path, Path, Path, dict[str, Any]], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    suite_file, cache, _, full = project  # full: an uninterrupted run, for reference
    out = tmp_path / "runs"
    assert full["complete"] is True

    def stop(*a: Any, **k: Any) -> Any:
        raise KeyboardInterrupt

    console = Console(width=80, record=True)
    with monkeypatch.context() as m:  # Ctrl-C as the bank stage starts
        m.setattr(run_mod, "run_bank", stop)
        with pytest.raises(KeyboardInterrupt):
            _run(suite_file, out, cache, console)
    shown = console.export_text()
    assert shown.index("plan of stages") < shown.index("digits: test accuracy pretrained")
    assert shown.index("parity: test accuracy") < shown.index("task_arithmetic λ=") < shown.index("ties λ=")
    assert "interrupted during bank of bases" in shown
    folder = out / "stages"
    partial = json.loads((folder / "results.json").read_text())
    assert partial["complete"] is False and partial["interrupted"] == "bank of bases"
    assert set(partial["methods"]) == {"task_arithmetic", "ties"} and "bases" not in partial
    md = (folder / "results.md").read_text()
    assert "interrupted during bank of bases" in md
    assert "| task_arithmetic (λ=" in md and "| ties (λ=" in md and "| bank of" not in md
    saved = sorted(p.name for p in (folder / "stages").iterdir())
    assert saved == [
        "static-task_arithmetic.json",
        "static-ties.json",
        "task-digits.json",
        "task-mirrored.json",
        "task-parity.json",
    ]

    calls: dict[str, int] = {}
    _count(monkeypatch, "finetune", calls, prepare_mod)
    for name in ("_task_stage", "run_method", "run_bank", "run_negation", "run_learned"):
        _count(monkeypatch, name, calls)
    again = _run(suite_file, out, cache)
    assert calls == {"run_bank": 1, "run_learned": 1, "run_negation": 1}  # only the unfinished stages ran
    assert again["complete"] is True
    assert again["methods"] == partial["methods"]  # read back as saved
    _same(again, full)
    assert "Partial" not in (folder / "results.md").read_text()

    calls.clear()  # a finished run reruns nothing
    _same(_run(suite_file, out, cache), full)
    assert calls == {}

    # a changed setting of one stage: only that stage runs again
    ties = suite_file.with_name("ties-0.5.yaml")
    static = "compose:\n  static: {task_arithmetic: {}, ties: {density: 0.5}}\n"
    ties.write_text(suite_file.read_text().replace("compose:\n", static))
    assert load_suite(ties).compose.params("ties") == {"density": 0.5}
    _run(ties, out, cache)
    assert calls == {"run_method": 1}


def test_an_interrupt_inside_learned_runs_keeps_the_finished_seeds(
    project: tuple[Path, Path, Path, dict[str, Any]], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    suite_file, cache, _, _ = project
    out = tmp_path / "runs"
    orig = run_mod.run_learned
    seen: list[int] = []

    def second_seed_stops(prep: Any, name: str, seed: int, *a: Any, **k: Any) -> Any:
        seen.append(seed)
        if seed == 1:
            raise KeyboardInterrupt
        return orig(prep, name, seed, *a, **k)

    spec = load_suite(suite_file)
    spec.compose.seeds = 2
    kw: dict[str, Any] = dict(out_dir=out, cache=cache, progress=False, negation=False, bases=False)
    monkeypatch.setattr(run_mod, "run_learned", second_seed_stops)
    with pytest.raises(KeyboardInterrupt):
        run_suite(spec, [], console=Console(record=True), **kw)
    partial = json.loads((out / "stages" / "results.json").read_text())
    assert [r["seed"] for r in partial["learned"]["atlas_task"]] == [0]  # the finished seed is in the table
    assert "| atlas_task |" in (out / "stages" / "results.md").read_text()
    seen.clear()

    def counted(prep: Any, name: str, seed: int, *a: Any, **k: Any) -> Any:
        seen.append(seed)
        return orig(prep, name, seed, *a, **k)

    monkeypatch.setattr(run_mod, "run_learned", counted)
    again = run_suite(spec, [], console=Console(record=True), **kw)
    assert seen == [1]  # seed 0 read back, seed 1 trained
    assert [r["seed"] for r in again["learned"]["atlas_task"]] == [0, 1]
    assert again["learned"]["atlas_task"][0] == partial["learned"]["atlas_task"][0]


def test_a_foreign_stage_file_is_refused_and_kept(suite_file: Path, tmp_path: Path) -> None:
    out = tmp_path / "runs"
    mine = out / "stages" / "stages" / "task-digits.json"
    mine.parent.mkdir(parents=True)
    mine.write_text('{"my": "notes"}')
    with pytest.raises(OutputError, match="task-digits.json: not a stage written by taskvec"):
        _run(suite_file, out, tmp_path / "cache")
    assert mine.read_text() == '{"my": "notes"}'


def test_the_plan_counts_stages_and_what_is_finished(
    project: tuple[Path, Path, Path, dict[str, Any]], tmp_path: Path
) -> None:
    suite_file, cache, out, _ = project
    fresh = tmp_path / "cache"
    prep = load_data(load_suite(suite_file), fresh)
    plan = plan_suite(prep, ["task_arithmetic", "ties"], out_dir=tmp_path / "runs")
    rows = {r.stage: r for r in plan.rows}
    assert (rows["fine-tunes"].count, rows["fine-tunes"].done) == (3, 0)
    assert (rows["static merges"].count, rows["static merges"].done) == (2, 0)
    assert rows["learned runs (1 seed)"].count == 1 and rows["bank of bases"].count == 1
    assert rows["heads"].done == 3  # prototype heads: nothing to fit ahead
    assert all(r.seconds > 0 for r in plan.rows if r.done < r.count) and set(plan.forward_ms) == {
        "digits",
        "parity",
        "mirrored",
    }
    assert not fresh.exists()  # nothing written
    after = plan_suite(load_data(load_suite(suite_file), cache), ["task_arithmetic", "ties"], out_dir=out)
    assert all(r.done == r.count for r in after.rows) and after.seconds == 0
    # the CLI prints only the plan with --plan, and writes nothing
    before = sorted(p.name for p in (out / "stages" / "stages").iterdir())
    r = CliRunner().invoke(
        app,
        ["bench", "run", str(suite_file), "--plan", "--methods", "task_arithmetic,ties,dare", "-o", str(out)]
        + ["--cache", str(cache)],
    )
    assert r.exit_code == 0, r.output
    assert "plan of stages" in r.output and "static merges" in r.output and "2/3" in r.output
    assert sorted(p.name for p in (out / "stages" / "stages").iterdir()) == before


def test_ctrl_c_in_the_cli_is_a_clean_exit(suite_file: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def stop(*a: Any, **k: Any) -> Any:
        raise KeyboardInterrupt

    monkeypatch.setattr(run_mod, "run_suite", stop)
    r = CliRunner().invoke(app, ["bench", "run", str(suite_file), "-o", str(tmp_path / "runs")])
    assert r.exit_code == 130 and "run the same command again" in r.output
    assert "Traceback" not in r.output


VISION6 = ["mnist", "fashion", "digits", "elpv", "fontletters", "gimp_textures"]


def _vision6_results() -> dict[str, Any]:
    rng = np.random.default_rng(0)

    def acc() -> dict[str, float]:
        return {t: float(rng.uniform(0.2, 0.95)) for t in VISION6}

    methods = ["task_arithmetic", "ties", "dare", "magnitude", "breadcrumbs", "consensus"]
    return {
        "suite": {"name": "vision-6", "tasks": [{"name": t} for t in VISION6]},
        "pretrained": {t: 0.2 for t in VISION6},
        "finetuned": {t: 0.97 for t in VISION6},
        "methods": {m: {"lambda": 0.075 * (i + 1), "test": acc(), "seconds": 1.0} for i, m in enumerate(methods)},
        "bases": {"m": 3, "method": "cluster", "lambda": 1.5, "test": acc()},
        "learned": {
            n: [{"test": acc(), "kept": {}, "seconds": 1.0} for _ in range(5)]
            for n in ("atlas_task", "atlas_block", "adamerging_block", "variational")
        },
    }


def test_the_terminal_table_fits_80_columns_and_cuts_no_name() -> None:
    from taskvec.bench.report import rows

    r = _vision6_results()
    console = Console(width=80, record=True)
    print_table(r, console)
    text = console.export_text()
    lines = text.splitlines()
    assert max(len(line) for line in lines) <= 80
    assert len(rows(r)) >= 13
    for row in rows(r):
        assert any(line.startswith(row.name + " ") or line == row.name for line in lines), row.name
        if row.lam is not None:
            line = next(x for x in lines if x.startswith(row.name + " "))
            assert f"{row.lam:g}" in line.split()  # λ in full on the method's summary row
    for t in VISION6:  # every task's column is there, in full
        assert t in text
    assert "…" not in text
