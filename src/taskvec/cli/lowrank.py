"""`taskvec compress`: store a task vector as low-rank factors, with the error of each tensor."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from taskvec.cli.common import Force, console, torch_dtype

app = typer.Typer()


def _mb(n: int) -> str:
    return f"{n / 1e6:,.2f}"


@app.command()
def compress(
    task_vector: Annotated[
        str, typer.Argument(help="task vector (.safetensors, shard folder) or PEFT LoRA adapter folder")
    ],
    out: Annotated[Path, typer.Option("-o", "--out", help="output .safetensors file or shard folder")],
    rank: Annotated[int | None, typer.Option(help="singular values kept per tensor")] = None,
    energy: Annotated[
        float | None,
        typer.Option(
            help="keep the fewest singular values holding this fraction of each tensor's squared norm, e.g. 0.95"
        ),
    ] = None,
    dtype: Annotated[
        str, typer.Option(help="storage dtype of the factors: float16, bfloat16, float32, float64")
    ] = "float32",
    base: Annotated[
        str | None, typer.Option(help="base model of a LoRA adapter (needed when it saves whole tensors)")
    ] = None,
    shard_size: Annotated[str, typer.Option(help="largest shard, e.g. 2GB")] = "2GB",
    show: Annotated[int, typer.Option(min=0, help="tensors listed, largest error first (0: none)")] = 20,
    force: Force = False,
) -> None:
    """Store TASK_VECTOR as factors U diag(s) V^T per matrix (truncated SVD), reporting the error."""
    from taskvec.core import TaskVector
    from taskvec.core.lowrank import compress as run
    from taskvec.io import parse_size

    tv = TaskVector.from_lora(task_vector, base) if base is not None else TaskVector.load(task_vector)
    report = run(
        tv,
        out,
        rank=rank,
        energy=energy,
        dtype=torch_dtype(dtype),
        shard_size=parse_size(shard_size),
        overwrite=force,
        progress=True,
    )
    if show:
        t = Table(
            title=f"reconstruction error per tensor (largest {min(show, len(report.tensors))} of {len(report.tensors)})"
        )
        for c in ("tensor", "shape", "rank", "relative error", "dense MB", "stored MB"):
            t.add_column(c, justify="left" if c in ("tensor", "shape") else "right")
        for r in sorted(report.tensors, key=lambda r: -r.rel_error)[:show]:
            t.add_row(
                r.key,
                "x".join(map(str, r.shape)),
                "dense" if r.rank is None else str(r.rank),
                f"{r.rel_error:.2e}",
                _mb(r.dense_bytes),
                _mb(r.stored_bytes),
            )
        console.print(t)
    console.print(
        f"wrote [bold]{out}[/]: total relative error {report.rel_error:.3e} (||tau - tau_r|| / ||tau||), "
        f"{_mb(report.stored_bytes)} MB stored vs {_mb(report.dense_bytes)} MB dense "
        f"({report.stored_bytes / max(report.dense_bytes, 1):.1%})"
    )
