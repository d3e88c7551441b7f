"""`taskvec compose`: train, evaluate, apply and export learned compositions on a suite."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.table import Table

from taskvec.cli.common import Force, console
from taskvec.errors import ConfigError

if TYPE_CHECKING:
    from taskvec.variational.train import EvalResult

app = typer.Typer(
    help="Learned composition: variational (sample-specific) and shared coefficients.", no_args_is_help=True
)

MODES = ("deterministic", "mc")
Mode = Annotated[str, typer.Option(help="deterministic (gate * mu) or mc (posterior average)")]
Suite = Annotated[
    str | None, typer.Option(help="suite file or built-in name (default: the one the composer was trained on)")
]
Cache = Annotated[
    Path | None,
    typer.Option(
        help="cache of fine-tuned checkpoints and heads [default: the one used in training, else "
        "$TASKVEC_CACHE or ~/.cache/taskvec]"
    ),
]


def _show(result: EvalResult, names: list[str], title: str) -> None:
    t = Table(title=title)
    for c in ("task", "test accuracy (%)", "coefficients kept (%)"):
        t.add_column(c, justify="right" if c != "task" else "left")
    for i, n in enumerate(names):
        t.add_row(n, f"{100 * result.accuracy[i]:.1f}", f"{100 * result.active.get(i, 1.0):.1f}")
    t.add_row("mean", f"{100 * result.mean_accuracy:.1f}", "")
    console.print(t)


def _check_mode(mode: str) -> None:
    if mode not in MODES:
        raise ConfigError(f"--mode: {mode!r} is not one of {', '.join(MODES)}")


def _copy_model_files() -> Callable[..., list[str]] | None:
    """The function that makes an output folder loadable with from_pretrained, where installed."""
    try:
        from taskvec.io.hf import copy_model_files
    except ImportError:
        return None
    return copy_model_files


@app.command("train")
def train(
    config: Annotated[
        Path, typer.Argument(help="YAML: suite (file or built-in name), preset, composer overrides, train options")
    ],
    out: Annotated[Path, typer.Option("-o", "--out", help="folder of the saved composer")],
    cache: Annotated[
        Path | None,
        typer.Option(
            help="cache of fine-tuned checkpoints and heads [default: the config's 'cache', else "
            "$TASKVEC_CACHE or ~/.cache/taskvec]"
        ),
    ] = None,
    force: Force = False,
) -> None:
    """Train a composer on a suite's validation splits (entropy presets: unlabeled test inputs), save it, score it."""
    from taskvec.bench.compose import load_run_config, train_on_suite
    from taskvec.bench.suite import suite_path

    cfg = load_run_config(config)
    if cache is not None:
        cfg = cfg.model_copy(update={"cache": str(cache)})
    suite_path(cfg.suite)  # a missing suite file is named before anything loads
    _, result, prep = train_on_suite(cfg, out, overwrite=force)
    _show(result, list(prep.tasks), f"{cfg.preset} on {prep.suite.name}")
    console.print(f"composer saved to [bold]{out}[/]")


@app.command("eval")
def evaluate(
    composer: Annotated[Path, typer.Argument(help="folder written by `taskvec compose train`")],
    suite: Suite = None,
    mode: Mode = "deterministic",
    cache: Cache = None,
) -> None:
    """Score a saved composer on the suite's test splits."""
    from taskvec.bench.compose import composer_suite, evaluate_on_suite, load_on_suite

    _check_mode(mode)
    composer_suite(composer, suite)
    comp, prep = load_on_suite(composer, suite, cache)
    result = evaluate_on_suite(comp, prep, mode)
    _show(result, list(prep.tasks), f"{composer} on {prep.suite.name} ({mode})")


@app.command("predict")
def predict(
    composer: Annotated[Path, typer.Argument(help="folder written by `taskvec compose train`")],
    inputs: Annotated[
        Path,
        typer.Argument(help="new inputs of the task: .csv/.jsonl/.parquet (text column), .npz (x), or an image folder"),
    ],
    task: Annotated[str, typer.Option(help="the task the inputs belong to (its head classifies them)")],
    out: Annotated[
        Path, typer.Option("-o", "--out", help="output .jsonl: prediction, per-sample coefficients, kept share")
    ],
    column: Annotated[str | None, typer.Option(help="text column (default: the task's)")] = None,
    suite: Suite = None,
    mode: Mode = "deterministic",
    cache: Cache = None,
    force: Force = False,
) -> None:
    """Predict new inputs of a task; write one JSON line per input."""
    from taskvec.bench.compose import (
        check_inputs_file,
        composer_suite,
        load_on_suite,
        predict,
        predictions_owned,
        read_inputs,
        write_jsonl,
    )
    from taskvec.io.atomic import check_output

    _check_mode(mode)
    check_output(out, overwrite=force, inputs=[inputs, composer], owned=predictions_owned)
    if not inputs.exists():
        raise ConfigError(f"{inputs}: no such input file or folder")
    check_inputs_file(inputs)  # a damaged table or archive fails before the composer is loaded
    composer_suite(composer, suite)
    comp, prep = load_on_suite(composer, suite, cache)
    raw, labels = read_inputs(inputs, prep, task, column)
    records = predict(comp, prep, task, raw, mode)
    if labels is not None:
        for r, y in zip(records, labels, strict=True):
            r["label"] = y
    write_jsonl(records, out, overwrite=force)
    msg = f"wrote {len(records)} predictions for task [bold]{task}[/] to [bold]{out}[/]"
    if labels is not None:
        hits = sum(str(r["label"]) in (r["prediction"], str(r["class_index"])) for r in records)
        msg += f" (accuracy against the file's labels: {100 * hits / max(len(records), 1):.1f} %)"
    console.print(msg)


@app.command("export")
def export(
    composer: Annotated[Path, typer.Argument(help="folder written by `taskvec compose train`")],
    task: Annotated[str, typer.Option(help="the task whose mean coefficients are applied")],
    out: Annotated[Path, typer.Option("-o", "--out", help="output model folder")],
    split: Annotated[str, typer.Option(help="inputs the coefficients are averaged over: train or val")] = "val",
    dtype: Annotated[str | None, typer.Option(help="output dtype (default: the backbone's)")] = None,
    suite: Suite = None,
    cache: Cache = None,
    force: Force = False,
) -> None:
    """Write a static model for one task: theta0 + sum of its mean coefficients times the task vectors."""
    from taskvec.bench.compose import composer_suite, dtype_of, export_task, load_on_suite
    from taskvec.io.atomic import check_output

    if split not in ("train", "val"):
        raise ConfigError(f"--split: {split!r} is not train or val (coefficients are never chosen on test data)")
    torch_dtype = dtype_of(dtype)
    check_output(out, overwrite=force, inputs=[composer])
    composer_suite(composer, suite)
    comp, prep = load_on_suite(composer, suite, cache)
    path, alpha = export_task(
        comp, prep, task, out, split=split, dtype=torch_dtype, overwrite=force, copy_model_files=_copy_model_files()
    )
    console.print(
        f"wrote the model of task [bold]{task}[/] (mean coefficient {float(alpha.mean()):.3f}) to [bold]{path}[/]"
    )
