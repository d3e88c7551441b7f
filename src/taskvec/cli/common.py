"""Shared CLI pieces: consoles, the --force option, and how errors are shown."""

from __future__ import annotations

from typing import Annotated, NoReturn

import typer
from rich.console import Console
from rich.markup import escape

console = Console()
err_console = Console(stderr=True)

Force = Annotated[bool, typer.Option("--force", help="replace OUT if it exists")]


def _fail(e: Exception) -> NoReturn:
    """Print a one-line error naming what is at fault and exit with status 2."""
    err_console.print(f"[bold red]error:[/] {escape(str(e))}")  # messages may hold brackets, e.g. taskvec[plot]
    raise typer.Exit(2)
