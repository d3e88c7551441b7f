"""Progress bars with time remaining for long work, shared by the commands.

    with bar("choosing λ for ties", total=n_items) as advance:
        for ...:
            advance(len(batch))              # or advance(0, total=bigger) when the work grows

A bar opened while another one shows joins that display (one live display at a time), so a
phase can show its parts (each evaluation of a λ search) below its own bar. `sub_bar` shows only
inside such a display: an evaluation run on its own stays quiet.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)


class Advance:
    """Moves one bar: `advance(n)` adds n done; `advance(0, total=t)` changes what is to do."""

    def __init__(self, progress: Progress | None = None, task: TaskID | None = None) -> None:
        self._progress, self._task = progress, task

    def __call__(self, n: float = 1, *, total: float | None = None) -> None:
        if self._progress is None or self._task is None:
            return
        if total is not None:
            self._progress.update(self._task, total=total)
        self._progress.advance(self._task, n)

    @property
    def total(self) -> float | None:
        if self._progress is None or self._task is None:
            return None
        return self._progress.tasks[self._progress.task_ids.index(self._task)].total


@dataclass
class _Display:
    progress: Progress | None  # None: bars are switched off


_current: ContextVar[_Display | None] = ContextVar("taskvec_progress_display", default=None)


def columns() -> list[TextColumn | BarColumn | MofNCompleteColumn | TimeElapsedColumn | TimeRemainingColumn]:
    """Description, bar, done/total, elapsed and remaining time."""
    return [
        TextColumn("{task.description}"),
        BarColumn(bar_width=24),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
    ]


@contextmanager
def bar(
    description: str,
    total: float | None,
    *,
    enabled: bool = True,
    transient: bool = False,
    console: Console | None = None,
) -> Iterator[Advance]:
    """A progress bar with elapsed and remaining time; yields its `Advance`. Inside another bar's
    display it joins that display (and is removed from it when done if `transient`)."""
    outer = _current.get()
    if outer is not None:
        if outer.progress is None:
            yield Advance()
            return
        task = outer.progress.add_task(description, total=total)
        try:
            yield Advance(outer.progress, task)
        finally:
            if transient:
                outer.progress.remove_task(task)
            else:
                outer.progress.stop_task(task)
        return
    if not enabled:
        token = _current.set(_Display(None))
        try:
            yield Advance()
        finally:
            _current.reset(token)
        return
    with Progress(*columns(), console=console, transient=transient) as progress:
        token = _current.set(_Display(progress))
        try:
            yield Advance(progress, progress.add_task(description, total=total))
        finally:
            _current.reset(token)


@contextmanager
def sub_bar(description: str, total: float | None) -> Iterator[Advance]:
    """A transient bar inside the display of an enclosing `bar`; nothing when there is none."""
    if _current.get() is None:
        yield Advance()
        return
    with bar(description, total, transient=True) as advance:
        yield advance


@contextmanager
def quiet() -> Iterator[None]:
    """Bars opened inside are switched off (for work that shows its own progress elsewhere)."""
    token = _current.set(_Display(None))
    try:
        yield
    finally:
        _current.reset(token)


def active() -> bool:
    """Whether a bar's display is showing (bars opened now join it)."""
    d = _current.get()
    return d is not None and d.progress is not None
