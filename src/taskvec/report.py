"""Plots shared by the CLI and the benchmark (matplotlib, no display)."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from taskvec._optional import require
from taskvec.io.atomic import atomic_path

if TYPE_CHECKING:
    from matplotlib.figure import Figure


def atomic_savefig(fig: Figure, path: Path) -> None:
    """Save `fig` to `path` (format from the suffix) through a temporary file: never a half-written image."""
    with atomic_path(path, overwrite=True, owned=lambda p: None) as tmp:
        fig.savefig(tmp, dpi=120, bbox_inches="tight", format=path.suffix.lstrip(".") or "png")


_atomic_savefig = atomic_savefig  # the former private name, kept for branches that still import it


def heatmap(
    values: np.ndarray, rows: Sequence[str], cols: Sequence[str], path: str | os.PathLike[str], title: str = ""
) -> Path:
    """A labelled heatmap with the value printed in each cell."""
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
    atomic_savefig(fig, path)
    plt.close(fig)
    return path
