"""Core commands: extract, merge, apply, info, similarity, methods.

Bad input raises a `TaskVecError` (or an `OSError`); the CLI-wide handler in `taskvec.cli.common`
shows it as one line and exits with status 2, so commands need no error handling of their own.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.table import Table

from taskvec.cli.common import AllowNonfinite, Force, console, finite, torch_dtype
from taskvec.errors import ConfigError
from taskvec.io.atomic import check_output

if TYPE_CHECKING:
    from taskvec.bench.tune import TuneResult
    from taskvec.config import MergeConfig

app = typer.Typer()


@app.command()
def extract(
    pretrained: Annotated[str, typer.Argument(help="pre-trained checkpoint (file or folder)")],
    finetuned: Annotated[str, typer.Argument(help="fine-tuned checkpoint (file or folder)")],
    out: Annotated[Path, typer.Option("-o", "--out", help="output .safetensors file or shard folder")],
    dtype: Annotated[str, typer.Option(help="storage dtype: float16, bfloat16, float32")] = "float32",
    include: Annotated[list[str] | None, typer.Option(help="glob of tensors to keep (repeatable)")] = None,
    exclude: Annotated[list[str] | None, typer.Option(help="glob of tensors to skip, e.g. '*classifier*'")] = None,
    shard_size: Annotated[str, typer.Option(help="largest shard, e.g. 2GB")] = "2GB",
    allow_nonfinite: AllowNonfinite = False,
    force: Force = False,
) -> None:
    """Extract the task vector FINETUNED - PRETRAINED, streamed tensor by tensor."""
    from taskvec.config import positive_size
    from taskvec.core import TaskVector

    dt, size = torch_dtype(dtype), positive_size(shard_size, "--shard-size")
    check_output(out, overwrite=force, inputs=[pretrained, finetuned])
    tv = TaskVector.from_checkpoints(
        pretrained, finetuned, include=include, exclude=exclude, allow_nonfinite=allow_nonfinite
    )
    path = tv.save(out, dtype=dt, shard_size=size, overwrite=force, progress=True, allow_nonfinite=allow_nonfinite)
    console.print(f"wrote task vector of {len(tv)} tensors, {tv.numel():,} parameters to [bold]{path}[/]")


@app.command()
def merge(
    config: Annotated[Path, typer.Argument(help="YAML merge config")],
    out: Annotated[Path, typer.Option("-o", "--out", help="output shard folder or .safetensors file")],
    allow_nonfinite: AllowNonfinite = False,
    force: Force = False,
    device: Annotated[str, typer.Option(help="where the per-slice arithmetic runs: cpu or cuda")] = "cpu",
    tune_on: Annotated[
        str | None,
        typer.Option(
            help="choose the scale (and density) on this suite's validation data: a suite YAML file or a built-in name"
        ),
    ] = None,
    cache: Annotated[
        Path | None,
        typer.Option(
            help="--tune-on: cache of the suite's heads and checkpoints [default: $TASKVEC_CACHE or ~/.cache/taskvec]"
        ),
    ] = None,
) -> None:
    """Merge task vectors into the base model as CONFIG says, streamed and atomic."""
    from taskvec.config import load_merge_config
    from taskvec.core.source import source_path
    from taskvec.merge import merge_checkpoints

    cfg = load_merge_config(config)
    check_output(out, overwrite=force, inputs=[config, cfg.base, *(source_path(m) for m in cfg.models)])
    if tune_on is not None:
        from taskvec.bench.suite import suite_path

        suite_path(tune_on)
        cfg = _tune(cfg, tune_on, cache, allow_nonfinite)
    path = merge_checkpoints(cfg, out, overwrite=force, progress=True, allow_nonfinite=allow_nonfinite, device=device)
    console.print(f"merged {len(cfg.models)} task vectors with [bold]{cfg.method}[/] into [bold]{path}[/]")


def _tune(cfg: MergeConfig, suite: str, cache: Path | None, allow_nonfinite: bool) -> MergeConfig:
    """`cfg` with the scale (and density) chosen on `suite`'s validation data, with a progress bar."""
    from rich.progress import Progress

    from taskvec.bench.tune import tune_merge, tuned_config
    from taskvec.progress import columns

    with Progress(*columns(), console=console, transient=True) as bar:
        task = bar.add_task("--tune-on: validation evaluations", total=None)

        def on_eval(done: int, planned: int) -> None:
            bar.update(task, completed=done, total=planned)

        result = tune_merge(cfg, suite, cache=cache, on_eval=on_eval, allow_nonfinite=allow_nonfinite)
    _show_choice(result)
    return tuned_config(cfg, result)


def _show_choice(result: TuneResult) -> None:
    """The chosen point and how many evaluations found it."""
    chosen = ", ".join(f"{k}={v}" for k, v in result.params.items())
    console.print(
        f"chosen: scale {result.scale:g}{', ' + chosen if chosen else ''} "
        f"(validation {100 * result.val:.2f} %, {result.evaluations} evaluations)"
    )


@app.command()
def apply(
    base: Annotated[str, typer.Argument(help="base checkpoint")],
    task_vector: Annotated[str, typer.Argument(help="saved task vector")],
    out: Annotated[Path, typer.Option("-o", "--out", help="output shard folder or .safetensors file")],
    coef: Annotated[float, typer.Option(help="coefficient; negative to forget the task", callback=finite)] = 1.0,
    dtype: Annotated[str | None, typer.Option(help="output dtype (default: the base's)")] = None,
    allow_nonfinite: AllowNonfinite = False,
    force: Force = False,
) -> None:
    """Write BASE + COEF * TASK_VECTOR."""
    from taskvec.core import TaskVector

    dt = torch_dtype(dtype)
    check_output(out, overwrite=force, inputs=[base, task_vector])
    tv = TaskVector.load(task_vector, allow_nonfinite=allow_nonfinite)
    path = tv.apply_to(base, coef, out=out, dtype=dt, overwrite=force, progress=True, allow_nonfinite=allow_nonfinite)
    console.print(f"wrote [bold]{path}[/]")


@app.command()
def info(
    file: Annotated[str, typer.Argument(help="checkpoint or task vector (file or folder)")],
    top: Annotated[int, typer.Option(min=0, help="show the N tensors of largest norm")] = 10,
) -> None:
    """Tensors, size, sparsity and norms of a checkpoint or task vector."""
    from taskvec.summary import summarize

    s = summarize(file)
    t = Table(title=f"{file}")
    t.add_column("")
    t.add_column("value", justify="right")
    t.add_row("tensors", f"{s.n_tensors:,}")
    t.add_row("parameters", f"{s.numel:,}")
    t.add_row("bytes", f"{s.nbytes:,} ({s.nbytes / 2**30:.3f} GiB)")
    t.add_row("dtypes", ", ".join(f"{k}: {v:,}" for k, v in s.dtypes.items()))
    t.add_row("sparsity (exact zeros)", f"{s.zeros / max(s.numel, 1):.4%}")
    t.add_row("L2 norm", f"{s.norm:.6g}")
    t.add_row("max |x|", f"{s.max_abs:.6g}")
    console.print(t)
    tt = Table(title=f"top {min(top, len(s.tensors))} tensors by L2 norm")
    for c in ("tensor", "shape", "dtype", "norm", "sparsity"):
        tt.add_column(c, justify="left" if c == "tensor" else "right")
    for r in sorted(s.tensors, key=lambda r: -r.norm)[:top]:
        tt.add_row(
            r.key,
            str(list(r.shape)),
            str(r.dtype).replace("torch.", ""),
            f"{r.norm:.4g}",
            f"{r.zeros / max(r.numel, 1):.2%}",
        )
    console.print(tt)


@app.command()
def similarity(
    task_vectors: Annotated[list[str], typer.Argument(help="two or more saved task vectors")],
    png: Annotated[Path | None, typer.Option(help="write a heatmap here (.png, .pdf or .svg)")] = None,
    allow_nonfinite: AllowNonfinite = False,
    force: Annotated[bool, typer.Option("--force", help="replace the plot if taskvec wrote it")] = False,
    device: Annotated[str, typer.Option(help="where the Gram matrix's products run: cpu or cuda")] = "cpu",
) -> None:
    """Cosine similarity matrix of task vectors (streamed Gram matrix), as a table and a heatmap."""
    from taskvec._optional import require
    from taskvec.core import TaskVector
    from taskvec.core.similarity import cosine_matrix
    from taskvec.methods.compose import resolve_device
    from taskvec.report import check_plot, heatmap

    if len(task_vectors) < 2:
        raise ConfigError("similarity needs at least two task vectors")
    if png is not None:
        check_plot(png, overwrite=force, inputs=task_vectors)  # fail before the work, not after it
        require("matplotlib", "plot")
    dev = resolve_device(device)  # a clear error where there is no such device
    tvs = [TaskVector.load(p, allow_nonfinite=allow_nonfinite) for p in task_vectors]
    cos = cosine_matrix(tvs, device=dev)
    names = [Path(p).stem for p in task_vectors]
    t = Table(title="cosine similarity")
    t.add_column("")
    for n in names:
        t.add_column(n, justify="right")
    for i, n in enumerate(names):
        t.add_row(n, *(f"{float(cos[i, j]):.4f}" for j in range(len(names))))
    console.print(t)
    zero = [n for i, n in enumerate(names) if bool(cos[i, i].isnan())]
    if zero:
        console.print(
            f"nan: {', '.join(zero)} {'is a zero task vector' if len(zero) == 1 else 'are zero task vectors'}; "
            "the cosine with a zero vector is undefined"
        )
    if png is not None:
        heatmap(
            cos.numpy(),
            names,
            names,
            png,
            title="cosine similarity of task vectors",
            overwrite=force,
            inputs=task_vectors,
        )
        console.print(f"heatmap written to [bold]{png}[/]")


@app.command()
def methods() -> None:
    """List the registered merge methods and their parameters."""
    from taskvec.methods import kernels, list_methods
    from taskvec.methods.registry import method_source

    methods = list_methods()
    t = Table(title="merge methods")
    for c in ("name", "what", "parameters", "from"):
        t.add_column(c)
    for m in methods:
        ps = ", ".join(f"{n}={f.default!r}" for n, f in m.params.model_fields.items()) or "-"
        t.add_row(m.name, m.summary, ps, method_source(m.name))
    console.print(t)
    console.print(f"CPU kernels of ties and magnitude: {kernels.status()}")
