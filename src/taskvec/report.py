"""Plots shared by the CLI and the benchmark (matplotlib, no display).

A plot is an output like any other: it is written through `atomic_path`, never onto an input,
and `--force` replaces only a plot taskvec wrote. Plots are PNG, PDF or SVG files whose embedded
metadata (PNG `Software`, PDF and SVG `Creator`) says "taskvec plot"; that is how a later
`--force` tells taskvec's plot from a user's picture of the same name.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from taskvec._optional import require
from taskvec.errors import ConfigError
from taskvec.io.atomic import atomic_path, check_output

if TYPE_CHECKING:
    from matplotlib.figure import Figure

PLOT_FORMATS = {"png": "Software", "pdf": "Creator", "svg": "Creator"}
PLOT_MARK = "taskvec plot"


def plot_format(path: str | os.PathLike[str]) -> str:
    """The format of a plot file from its suffix: png, pdf or svg; any other is a ConfigError."""
    fmt = Path(path).suffix.lstrip(".").lower()
    if fmt not in PLOT_FORMATS:
        raise ConfigError(f"{path}: unknown plot format {fmt or '(no suffix)'!r}; name the file .png, .pdf or .svg")
    return fmt


def plot_owned(path: Path) -> str | None:
    """None if `path` is a plot taskvec wrote (its metadata says so); otherwise why it is not taskvec's."""
    if path.is_symlink():
        return "is a symbolic link"
    if path.is_dir():
        return "is a folder, not a plot that taskvec wrote"
    if not path.is_file():
        return "is not a regular file"
    with open(path, "rb") as f:
        head = f.read(64 * 2**20)
    return None if PLOT_MARK.encode() in head else "is a file that taskvec did not write"


def check_plot(
    path: str | os.PathLike[str], *, overwrite: bool = False, inputs: Iterable[str | os.PathLike[str] | None] = ()
) -> Path:
    """Refuse a plot path before the work: unknown format, an input, or an existing file or folder
    that is not a plot taskvec wrote (or any existing one without `overwrite`)."""
    out = check_output(path, overwrite=overwrite, inputs=inputs, owned=plot_owned)
    plot_format(path)
    return out


def atomic_savefig(
    fig: Figure,
    path: Path,
    *,
    overwrite: bool = True,
    inputs: Iterable[str | os.PathLike[str] | None] = (),
    owned: Callable[[Path], str | None] | None = None,
) -> None:
    """Save `fig` to `path` through a temporary file (never a half-written image), marked as
    taskvec's; an existing file is replaced only if `owned` (default: `plot_owned`) accepts it."""
    fmt = plot_format(path)
    with atomic_path(path, overwrite=overwrite, owned=owned or plot_owned, inputs=inputs) as tmp:
        fig.savefig(tmp, dpi=120, bbox_inches="tight", format=fmt, metadata={PLOT_FORMATS[fmt]: PLOT_MARK})


def heatmap(
    values: np.ndarray,
    rows: Sequence[str],
    cols: Sequence[str],
    path: str | os.PathLike[str],
    title: str = "",
    *,
    overwrite: bool = False,
    inputs: Iterable[str | os.PathLike[str] | None] = (),
) -> Path:
    """A labelled heatmap with the value printed in each cell, written to `path` (.png, .pdf or
    .svg); an existing plot is replaced only with `overwrite` and only if taskvec wrote it."""
    require("matplotlib", "plot").use("Agg")
    plt = require("matplotlib.pyplot", "plot")

    path = Path(path)
    fig, ax = plt.subplots(figsize=(1.2 + 0.8 * len(cols), 1.0 + 0.6 * len(rows)))
    im = ax.imshow(values, cmap="viridis")
    ax.set_xticks(range(len(cols)), cols, rotation=45, ha="right")
    ax.set_yticks(range(len(rows)), rows)
    for i in range(values.shape[0]):
        for j in range(values.shape[1]):
            ax.text(
                j,
                i,
                f"{values[i, j]:.2f}",
                ha="center",
                va="center",
                color="w" if values[i, j] < values.mean() else "k",
                fontsize=8,
            )
    fig.colorbar(im, ax=ax)
    ax.set_title(title)
    try:
        atomic_savefig(fig, path, overwrite=overwrite, inputs=inputs)
    finally:
        plt.close(fig)
    return path
