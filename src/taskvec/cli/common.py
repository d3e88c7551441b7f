"""Shared CLI pieces: consoles, the --force option, and how errors are shown."""

from __future__ import annotations

import functools
import math
import warnings
from collections.abc import Callable
from typing import TYPE_CHECKING, Annotated, Any, NoReturn, overload

import typer
from pydantic import ValidationError
from rich.console import Console
from rich.markup import escape

from taskvec.errors import TaskVecError, format_validation_error

if TYPE_CHECKING:
    import torch

console = Console()
err_console = Console(stderr=True)

Force = Annotated[bool, typer.Option("--force", help="replace OUT if it exists")]
AllowNonfinite = Annotated[
    bool, typer.Option("--allow-nonfinite", help="use checkpoints holding NaN/inf values instead of refusing them")
]


def finite(value: float | None) -> float | None:
    """Option callback: refuse NaN and infinite numbers (they would write an all-NaN model), and
    magnitudes beyond float32 (the weights' arithmetic could only give infinities)."""
    if value is not None and not math.isfinite(value):
        raise typer.BadParameter(f"{value} is not a finite number")
    if value is not None and abs(value) > 3.4028234663852886e38:
        raise typer.BadParameter(f"{value:g} is beyond the float32 range (|x| <= 3.403e+38)")
    return value


def error_line(e: BaseException) -> str:
    """What the user is told about `e`: one line naming the file, tensor or option at fault."""
    if isinstance(e, ValidationError):
        return format_validation_error(e)
    if isinstance(e, OSError) and e.strerror:
        names = [str(n) for n in (e.filename, e.filename2) if n is not None]
        return f"{' -> '.join(names)}: {e.strerror}" if names else e.strerror
    return " ".join(str(e).split("\n")) or type(e).__name__


def fail(e: BaseException) -> NoReturn:
    """Print a one-line error naming what is at fault and exit with status 2."""
    # escaped: messages may hold brackets, e.g. taskvec[plot]
    err_console.print(f"[bold red]error:[/] {escape(error_line(e))}", soft_wrap=True)
    raise typer.Exit(2)


@overload
def torch_dtype(name: str) -> torch.dtype: ...
@overload
def torch_dtype(name: None) -> None: ...
@overload
def torch_dtype(name: str | None) -> torch.dtype | None: ...
def torch_dtype(name: str | None) -> torch.dtype | None:
    """The torch dtype a --dtype option names (None: keep the input's)."""
    from taskvec.config import dtype_named  # torch is imported when a command runs, not at start-up

    return dtype_named(name)


def _show_warning(message: Warning | str, category: type[Warning], *args: Any, **kwargs: Any) -> None:
    err_console.print(f"[yellow]warning:[/] {escape(str(message))}", soft_wrap=True)


def guarded(fn: Callable[..., Any]) -> Callable[..., Any]:
    """`fn` with bad input (TaskVecError, OSError, pydantic ValidationError) shown as one line, exit 2."""
    if getattr(fn, "_taskvec_guarded", False):
        return fn

    @functools.wraps(fn)
    def run(*args: Any, **kwargs: Any) -> Any:
        from taskvec.io.readers import tracking_inputs

        with warnings.catch_warnings(), tracking_inputs():  # no output of the command may replace a file it read
            warnings.showwarning = _show_warning
            try:
                return fn(*args, **kwargs)
            except (TaskVecError, OSError, ValidationError) as e:
                fail(e)

    run._taskvec_guarded = True  # type: ignore[attr-defined]
    return run


def guard_app(app: typer.Typer) -> None:
    """Apply `guarded` to every command of `app` and of its command groups."""
    for cmd in app.registered_commands:
        if cmd.callback is not None:
            cmd.callback = guarded(cmd.callback)
    for group in app.registered_groups:
        if group.typer_instance is not None:
            guard_app(group.typer_instance)
