"""`taskvec bench`: run a real benchmark suite end to end."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from taskvec.cli.common import console

if TYPE_CHECKING:
    from taskvec.bench.suite import TaskSpec

app = typer.Typer(
    help="Real benchmark suites: fine-tune per task, compose with every method, report.", no_args_is_help=True
)


@app.command("run")
def run(
    suite: Annotated[str, typer.Argument(help="a suite YAML file, or a built-in suite (taskvec bench list)")],
    methods: Annotated[
        str | None,
        typer.Option(help="comma-separated merge methods (default: the suite's compose.static, with their params)"),
    ] = None,
    out: Annotated[Path, typer.Option("-o", "--out", help="folder for results.json/.md and accuracy.png")] = Path(
        "runs"
    ),
    cache: Annotated[
        Path | None, typer.Option(help="cache of fine-tuned checkpoints (default ~/.cache/taskvec or $TASKVEC_CACHE)")
    ] = None,
    learned: Annotated[
        str | None,
        typer.Option(help="comma-separated learned compositions (default: the suite's compose.learned; '' for none)"),
    ] = None,
    seeds: Annotated[
        int | None, typer.Option(min=1, help="seeds of each learned composition (default: the suite's)")
    ] = None,
    bases: Annotated[bool, typer.Option(help="also build a bank of bases (the suite's compose.bases)")] = True,
    negation: Annotated[bool, typer.Option(help="also report task negation")] = True,
    threads: Annotated[int | None, typer.Option(help="torch CPU threads")] = None,
    plan: Annotated[
        bool, typer.Option("--plan", help="only print what the run would do and about how long it takes, then exit")
    ] = False,
) -> None:
    """Fine-tune one model per task (cached), compose them with each method (static merges, a bank of
    bases, learned coefficients and the variational composer), print and save the results.

    The run goes in stages (data and heads, each fine-tune, each static merge, the bank, each
    learned run, negation), each saved under OUT/SUITE/stages when it finishes and printed at once.
    Stop it with Ctrl-C at any time: the table of the finished stages is written, and running the
    same command again goes on from the first unfinished stage."""
    import torch

    from taskvec.bench.prepare import load_data
    from taskvec.bench.run import plan_suite, print_plan, run_suite
    from taskvec.bench.suite import load_suite
    from taskvec.methods import get_method

    if threads:
        torch.set_num_threads(threads)
    try:
        names = None if methods is None else [m.strip() for m in methods.split(",") if m.strip()]
        for m in names or []:
            get_method(m)
        spec = load_suite(suite)
        chosen = None if learned is None else [m.strip() for m in learned.split(",") if m.strip()]
        if plan:
            console.print(f"[bold]{spec.name}[/]: loading the backbone and data ...")
            prep = load_data(spec, cache)
            steps = plan_suite(prep, names, out_dir=out, negation=negation, bases=bases, learned=chosen, seeds=seeds)
            print_plan(steps, console)
            return
        run_suite(
            spec,
            names,
            out_dir=out,
            cache=cache,
            negation=negation,
            bases=bases,
            learned=chosen,
            seeds=seeds,
            console=console,
        )
    except KeyboardInterrupt:
        console.print("stopped; run the same command again to go on from the first unfinished stage")
        raise typer.Exit(130) from None


@app.command("list")
def list_suites() -> None:
    """The built-in suites and their tasks (run your own with `taskvec bench run SUITE.yaml`)."""
    from rich.table import Table

    from taskvec.bench.suite import builtin_suites, load_suite

    t = Table(title="built-in suites")
    for c in ("suite", "backbone", "tasks (split)", "description"):
        t.add_column(c)
    for name in builtin_suites():
        s = load_suite(name)
        tasks = ", ".join(f"{x.name} ({_split(x)})" for x in s.tasks)
        b = s.backbone
        where = getattr(b, "hf", None) or getattr(b, "factory", None) or getattr(b, "kind", "")
        t.add_row(s.name, where, tasks, s.description)
    console.print(t)


def _split(task: TaskSpec) -> str:
    if task.split is None:
        return "given"
    return "/".join(str(v) for v in (task.split.train, task.split.val, task.split.test))
