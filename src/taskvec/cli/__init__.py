"""The `taskvec` command line: typer glue over the library. Each file adds one group of commands."""

from __future__ import annotations

import typer

from taskvec.cli import bases, bench, cache, compose, lowrank, main
from taskvec.cli.common import guard_app

app = typer.Typer(
    help="Task vector composition: extract, merge, inspect and compare task vectors.", no_args_is_help=True
)
app.registered_commands += main.app.registered_commands
app.registered_commands += lowrank.app.registered_commands  # taskvec compress
# command groups: `app.add_typer(<module>.app, name="<group>")`, one line per file in this folder
app.add_typer(bases.app, name="bases")
app.add_typer(bench.app, name="bench")
app.add_typer(cache.app, name="cache")
app.add_typer(compose.app, name="compose")
guard_app(app)  # every command: bad input is one line on stderr and exit status 2, never a traceback

__all__ = ["app"]
