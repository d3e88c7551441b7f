"""`taskvec compose`: train and evaluate learned compositions (variational and baselines) on a suite."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from taskvec.cli.common import Force, _fail, console
from taskvec.errors import TaskVecError

app = typer.Typer(help="Learned composition: variational (sample-specific) and shared coefficients.", no_args_is_help=True)


def _show(result, names: list[str], title: str) -> None:  # type: ignore[no-untyped-def]
    t = Table(title=title)
    for c in ("task", "test accuracy (%)", "coefficients kept (%)"):
        t.add_column(c, justify="right" if c != "task" else "left")
    for i, n in enumerate(names):
        t.add_row(n, f"{100 * result.accuracy[i]:.1f}", f"{100 * result.active.get(i, 1.0):.1f}")
    t.add_row("mean", f"{100 * result.mean_accuracy:.1f}", "")
    console.print(t)


@app.command("train")
def train(
    config: Annotated[Path, typer.Argument(help="YAML: suite, preset, composer overrides, train options")],
    out: Annotated[Path, typer.Option("-o", "--out", help="folder of the saved composer")],
    force: Force = False,
) -> None:
    """Train a composer on a suite's validation splits (entropy presets: unlabeled test inputs), save it, score it."""
    from taskvec.bench.compose import load_run_config, train_on_suite

    try:
        cfg = load_run_config(config)
        _, result, prep = train_on_suite(cfg, out, overwrite=force)
    except (TaskVecError, KeyError) as e:
        _fail(e)
    _show(result, list(prep.tasks), f"{cfg.preset} on {cfg.suite}")
    console.print(f"composer saved to [bold]{out}[/]")


@app.command("eval")
def evaluate(
    composer: Annotated[Path, typer.Argument(help="folder written by `taskvec compose train`")],
    suite: Annotated[str, typer.Option(help="the suite it was trained on")],
    mode: Annotated[str, typer.Option(help="deterministic (gate * mu) or mc (posterior average)")] = "deterministic",
    cache: Annotated[Path | None, typer.Option(help="cache of fine-tuned checkpoints")] = None,
) -> None:
    """Score a saved composer on the suite's test splits."""
    from taskvec.bench.compose import evaluate_on_suite, load_on_suite

    try:
        comp, prep = load_on_suite(composer, suite, cache)
        result = evaluate_on_suite(comp, prep, mode)
    except TaskVecError as e:
        _fail(e)
    _show(result, list(prep.tasks), f"{composer} on {suite} ({mode})")
