"""`taskvec cache`: what the cache of fine-tuned checkpoints and heads holds, and where."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape

from taskvec.cli.common import console

app = typer.Typer(help="The cache of fine-tuned checkpoints and heads that `bench run` fills.", no_args_is_help=True)

CacheOption = Annotated[
    Path | None, typer.Option("--cache", help="the cache folder [default: $TASKVEC_CACHE or ~/.cache/taskvec]")
]


def _size(n: int) -> str:
    return f"{n / 2**20:.1f} MiB" if n >= 2**20 else f"{n / 2**10:.1f} KiB"


@app.command("list")
def list_cache(cache: CacheOption = None) -> None:
    """Suites, tasks, recipes and fine-tuned checkpoints (paths and sizes) in the cache."""
    from taskvec.bench.cache_index import cache_entries
    from taskvec.paths import default_cache

    where = cache or default_cache()
    entries = cache_entries(where)
    if not entries:
        console.print(f"{where}: the cache holds no suite yet (`taskvec bench run` fills it)")
        return
    console.print(f"cache [bold]{where}[/]: {len(entries)} tasks", soft_wrap=True)
    suite = None
    for e in entries:
        if e.suite != suite:
            suite = e.suite
            console.print(f"suite [bold]{escape(suite)}[/]", soft_wrap=True)
        state = "fine-tuned" if e.finetuned else ("fine-tuning unfinished" if e.unfinished else "not fine-tuned")
        console.print(f"  {escape(e.task)}  recipe {e.recipe}  {_size(e.bytes)}  {state}", soft_wrap=True)
        if e.finetuned:  # whole, on a line of its own: a path to copy into a merge config
            console.print(f"    {escape(str(e.finetuned))}", soft_wrap=True, highlight=False)


@app.command("path")
def path(
    suite: Annotated[str, typer.Argument(help="suite file, built-in name, or a suite name listed by `cache list`")],
    task: Annotated[str, typer.Argument(help="task name")],
    cache: CacheOption = None,
) -> None:
    """Print the fine-tuned checkpoint of SUITE's TASK (a path `merge`, `extract` and `bases build` take)."""
    from taskvec.bench.cache_index import cached_checkpoint

    typer.echo(str(cached_checkpoint(suite, task, cache)))
