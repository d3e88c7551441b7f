"""`taskvec bench`: run a real benchmark suite end to end."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from taskvec.cli.common import _fail, console
from taskvec.errors import TaskVecError

app = typer.Typer(help="Real benchmark suites: fine-tune per task, compose with every method, report.", no_args_is_help=True)


@app.command("run")
def run(
    suite: Annotated[str, typer.Argument(help="tiny, vision-4 or text-3")],
    methods: Annotated[str, typer.Option(help="comma-separated merge methods")] = "task_arithmetic,ties,dare,magnitude",
    out: Annotated[Path, typer.Option("-o", "--out", help="folder for results.json/.md and accuracy.png")] = Path("runs"),
    cache: Annotated[Path | None, typer.Option(help="cache of fine-tuned checkpoints (default ~/.cache/taskvec or $TASKVEC_CACHE)")] = None,
    negation: Annotated[bool, typer.Option(help="also report task negation")] = True,
    threads: Annotated[int | None, typer.Option(help="torch CPU threads")] = None,
) -> None:
    """Fine-tune one model per task (cached), compose them with each method, print and save the results."""
    import torch

    from taskvec.bench.run import run_suite
    from taskvec.methods import get_method

    if threads:
        torch.set_num_threads(threads)
    try:
        names = [m.strip() for m in methods.split(",") if m.strip()]
        for m in names:
            get_method(m)
        run_suite(suite, names, out_dir=out, cache=cache, negation=negation, console=console)
    except TaskVecError as e:
        _fail(e)


@app.command("list")
def list_suites() -> None:
    """The suites and their tasks."""
    from rich.table import Table

    from taskvec.bench.suites import SUITES

    t = Table(title="benchmark suites")
    for c in ("suite", "backbone", "tasks (train/val/test)", "input"):
        t.add_column(c)
    for s in SUITES.values():
        tasks = ", ".join(f"{x.name} ({x.n_train}/{x.n_val}/{x.n_test})" for x in s.tasks)
        t.add_row(s.name, s.backbone, tasks, f"{s.image_size}px" if s.backbone.startswith("eff") else f"{s.max_length} tokens")
    console.print(t)
