"""`taskvec bases`: build a bank of task vector bases, inspect it, compose tasks from it."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from pydantic import ValidationError
from rich.markup import escape
from rich.table import Table

from taskvec.cli.common import AllowNonfinite, Force, console, err_console, finite
from taskvec.errors import ConfigError, format_validation_error

if TYPE_CHECKING:
    from taskvec.bases.bank import Bank

app = typer.Typer(
    help="Task vector bases: keep M << T bases of many task vectors and compose from them.", no_args_is_help=True
)


def _split(text: str | None) -> list[str]:
    return [x.strip() for x in text.split(",") if x.strip()] if text else []


def _params(items: list[str] | None) -> dict[str, Any]:
    import yaml

    out: dict[str, Any] = {}
    for it in items or []:
        if "=" not in it:
            raise ConfigError(f"--merge-param: expected KEY=VALUE, got {it!r}")
        k, v = it.split("=", 1)
        out[k.strip()] = yaml.safe_load(v)
    return out


def _gib(n: int) -> str:
    return f"{n:,} B ({n / 2**20:,.2f} MiB)" if n < 2**30 else f"{n:,} B ({n / 2**30:,.3f} GiB)"


def print_bank(bank: Bank, top: int = 20) -> None:
    """Tables: overview, bases, per-task errors, memory."""
    mf = bank.manifest
    t = Table(title=f"bank {bank.path}")
    t.add_column("")
    t.add_column("value", justify="right")
    t.add_row("method", bank.method + (f" ({mf.merge} merge)" if mf.merge else ""))
    t.add_row("tasks T", str(bank.t))
    t.add_row("bases M", f"{bank.m} ({mf.info.get('m_from', '?')}; eigengap suggests {mf.info.get('eigengap_m', '?')})")
    t.add_row("dtype", mf.dtype)
    t.add_row("tensors / parameters per basis", f"{mf.n_tensors:,} / {mf.numel:,}")
    ev = mf.info.get("laplacian_eigenvalues")
    if ev:
        t.add_row(
            "Laplacian eigenvalues",
            ", ".join(f"{x:.3f}" for x in ev[: min(len(ev), bank.m + 3)]) + (" ..." if len(ev) > bank.m + 3 else ""),
        )
    console.print(t)
    tb = Table(title="bases")
    for c in ("basis", "file", "bytes", "tasks"):
        tb.add_column(c, justify="right" if c == "bytes" else "left")
    for k, b in enumerate(mf.bases):
        who = ", ".join(b.members) if b.members is not None else f"mixes all {len(mf.mixing or [])} build tasks"
        tb.add_row(str(k), b.file, f"{b.bytes:,}", who if len(who) < 80 else who[:77] + "...")
    console.print(tb)
    errs = bank.relative_errors()
    tt = Table(title=f"reconstruction error of each task ({min(top, bank.t)} of {bank.t} shown, worst first)")
    for c in ("task", "basis" if bank.method == "cluster" else "largest coefficient", "relative error"):
        tt.add_column(c, justify="left" if c == "task" else "right")
    order = sorted(errs, key=lambda n: -(errs[n] if errs[n] == errs[n] else float("inf")))
    for n in order[:top]:
        i = bank.index(n)
        if bank.method == "cluster":
            where = str(mf.assignments[i])  # type: ignore[index]
        else:
            k = int(bank.decoder[:, i].abs().argmax())
            where = f"{float(bank.decoder[k, i]):+.3f} x basis {k}"
        tt.add_row(n, where, f"{errs[n]:.4%}")
    console.print(tt)
    mem = bank.memory()
    tm = Table(title="memory (exact bytes)")
    tm.add_column("")
    tm.add_column("bytes", justify="right")
    tm.add_row(f"{bank.t} full task vectors (tensor data at their storage dtype)", _gib(mem.task_vectors))
    tm.add_row(f"{bank.m} bases (tensor data, {mf.dtype})", _gib(mem.bases_data))
    tm.add_row(f"{bank.m} basis files on disk (data + headers)", _gib(mem.bases_files))
    tm.add_row("manifest.json", _gib(mem.manifest))
    tm.add_row("[bold]bank total[/]", _gib(mem.bank))
    tm.add_row("task vectors / bank", f"{mem.ratio:.2f}x")
    console.print(tm)


@app.command()
def build(
    inputs: Annotated[list[str], typer.Argument(help="a YAML config (bases.yaml), or two or more saved task vectors")],
    out: Annotated[Path, typer.Option("-o", "--out", help="the bank folder to write")],
    method: Annotated[str | None, typer.Option(help="cluster | learned | pca  [default: cluster]")] = None,
    m: Annotated[int | None, typer.Option("--m", "-m", help="number of bases M [default: from the eigengap]")] = None,
    names: Annotated[str | None, typer.Option(help="comma-separated task names [default: file names]")] = None,
    merge: Annotated[
        str | None,
        typer.Option(help="cluster: merge of each cluster: mean, task_arithmetic, ties, ... [default: mean]"),
    ] = None,
    merge_param: Annotated[
        list[str] | None, typer.Option(help="cluster: merge parameter KEY=VALUE, e.g. density=0.2 (repeatable)")
    ] = None,
    affinity: Annotated[
        str | None, typer.Option(help="clip (max(cos, 0)) | shift ((cos + 1) / 2)  [default: clip]")
    ] = None,
    max_m: Annotated[int | None, typer.Option(help="largest M the eigengap may choose")] = None,
    temperature: Annotated[float | None, typer.Option(help="learned: softmax temperature [default: 1]")] = None,
    steps: Annotated[int | None, typer.Option(help="learned: Adam steps [default: 1000]")] = None,
    lr: Annotated[float | None, typer.Option(help="learned: Adam learning rate [default: 0.05]")] = None,
    normalize: Annotated[
        bool | None, typer.Option("--normalize/--no-normalize", help="learned: fit unit-norm task vectors")
    ] = None,
    seed: Annotated[int | None, typer.Option(help="random seed [default: 0]")] = None,
    dtype: Annotated[str | None, typer.Option(help="storage dtype of the bases [default: the task vectors']")] = None,
    shard_size: Annotated[
        str | None, typer.Option(help="a basis larger than this becomes a shard folder [default: 2GB]")
    ] = None,
    allow_nonfinite: AllowNonfinite = False,
    force: Force = False,
) -> None:
    """Fit M bases to many task vectors and write them as a bank (one safetensors file per basis + manifest.json)."""
    from taskvec.bases.bank import build_bank
    from taskvec.bases.config import BasesConfig, load_bases_config, task_vectors_of
    from taskvec.config import DTYPES
    from taskvec.core.source import source_path
    from taskvec.io import parse_size
    from taskvec.io.atomic import check_output

    given = {
        "method": method,
        "m": m,
        "merge": merge,
        "merge_params": _params(merge_param) or None,
        "affinity": affinity,
        "max_m": max_m,
        "temperature": temperature,
        "steps": steps,
        "lr": lr,
        "normalize": normalize,
        "seed": seed,
        "dtype": dtype,
        "shard_size": shard_size,
    }
    given = {k: v for k, v in given.items() if v is not None}
    if len(inputs) == 1 and Path(inputs[0]).suffix in (".yaml", ".yml"):
        if given or names:
            opts = ", ".join("--" + k.replace("_", "-") for k in [*given, *(["names"] if names else [])])
            raise ConfigError(f"{opts}: set options in the config file {inputs[0]}, not on the command line")
        cfg = load_bases_config(inputs[0])
    else:
        if len(inputs) < 2:
            raise ConfigError("INPUTS: give a YAML config, or at least two task vector files")
        labels = _split(names)
        if labels and len(labels) != len(inputs):
            raise ConfigError(f"--names: {len(labels)} names for {len(inputs)} task vectors")
        tasks = [{"task_vector": p, **({"name": labels[i]} if labels else {})} for i, p in enumerate(inputs)]
        try:
            cfg = BasesConfig.model_validate({"tasks": tasks, **given})
        except ValidationError as e:  # pydantic's message names the option
            raise ConfigError(format_validation_error(e, option=True)) from None
    check_output(out, overwrite=force, inputs=[*inputs, cfg.base, *(source_path(t) for t in cfg.tasks)])
    tvs, labels = task_vectors_of(cfg, allow_nonfinite=allow_nonfinite)
    bank = build_bank(
        tvs,
        labels,
        cfg.method,
        cfg.m,
        out=out,
        dtype=DTYPES[cfg.dtype] if cfg.dtype else None,
        shard_size=parse_size(cfg.shard_size),
        overwrite=force,
        progress=True,
        **cfg.options(),
    )
    console.print(f"wrote bank of {bank.m} {bank.method} bases for {bank.t} task vectors to [bold]{bank.path}[/]")
    print_bank(bank, top=10)


@app.command()
def info(
    bank_path: Annotated[Path, typer.Argument(metavar="BANK", help="a bank folder")],
    top: Annotated[int, typer.Option(min=0, help="show the N tasks of largest error")] = 20,
) -> None:
    """Method, bases, per-task reconstruction errors and exact memory accounting of a bank."""
    from taskvec.bases.bank import Bank

    bank = Bank.load(bank_path)
    print_bank(bank, top=top)


@app.command()
def add(
    bank_path: Annotated[Path, typer.Argument(metavar="BANK", help="a bank folder")],
    task_vector: Annotated[str, typer.Argument(help="saved task vector to add")],
    name: Annotated[str | None, typer.Option(help="task name [default: the file name]")] = None,
    new_basis_below: Annotated[
        float | None, typer.Option(help="cluster: open a new basis if the best cosine is below this")
    ] = None,
    allow_changed_sources: Annotated[
        bool,
        typer.Option(
            "--allow-changed-sources",
            help="cluster: re-merge members whose recorded source file changed since it was recorded, as it is now",
        ),
    ] = False,
) -> None:
    """Continual mode: add a task vector (cluster: joins and re-merges its most similar basis)."""
    from taskvec.bases.bank import Bank
    from taskvec.core import TaskVector

    bank = Bank.load(bank_path)
    label = name or Path(task_vector).name.removesuffix(".safetensors")
    k = bank.add(
        TaskVector.load(task_vector),
        label,
        new_basis_below=new_basis_below,
        progress=True,
        allow_changed_sources=allow_changed_sources,
    )
    where = f"basis {k}" if k is not None else f"least-squares coefficients on the {bank.m} bases"
    console.print(f"added [bold]{label}[/] to {where}; relative error {bank.relative_errors()[label]:.4%}")


@app.command()
def compose(
    bank_path: Annotated[Path, typer.Argument(metavar="BANK", help="a bank folder")],
    out: Annotated[Path, typer.Option("-o", "--out", help="output model (with --base) or task vector")],
    add: Annotated[str | None, typer.Option(help="comma-separated tasks to add")] = None,
    negate: Annotated[str | None, typer.Option(help="comma-separated tasks to negate (forget)")] = None,
    base: Annotated[
        str | None, typer.Option(help="base checkpoint to apply to; without it OUT is the composed task vector")
    ] = None,
    coef: Annotated[float, typer.Option(help="scaling coefficient lambda", callback=finite)] = 1.0,
    dtype: Annotated[str | None, typer.Option(help="output dtype [default: the base's, or the bank's]")] = None,
    force: Force = False,
) -> None:
    """BASE + COEF * (sum of the reconstructions of --add - those of --negate), streamed."""
    from taskvec.bases.bank import Bank
    from taskvec.config import DTYPES
    from taskvec.io.atomic import check_output

    if dtype is not None and dtype not in DTYPES:
        raise ConfigError(f"--dtype: unknown dtype {dtype!r}; choose one of {', '.join(DTYPES)}")
    check_output(out, overwrite=force, inputs=[bank_path, base])
    bank = Bank.load(bank_path)
    tv = bank.combine(add=_split(add), negate=_split(negate))
    dt = DTYPES[dtype] if dtype else None
    if base is not None:
        path = tv.apply_to(base, coef, out=out, dtype=dt, overwrite=force, progress=True)
    else:
        path = (tv * coef).save(out, dtype=dt or bank.dtype, overwrite=force, progress=True)
    console.print(f"{tv.name}: wrote [bold]{path}[/]")


@app.command()
def verify(
    bank_path: Annotated[Path, typer.Argument(metavar="BANK", help="a bank folder")],
    rehash: Annotated[
        bool,
        typer.Option(
            "--rehash",
            help="record the sha256 of the basis files as they are now "
            "(banks written without checksums; only for a bank you trust)",
        ),
    ] = False,
) -> None:
    """Check every basis file of a bank against the sha256, size and dtype in its manifest."""
    from taskvec.bases.bank import verify_bank

    bank = verify_bank(bank_path, rehash=rehash)
    what = "recorded the sha256 of" if rehash else "verified"
    console.print(f"{bank.path}: {what} {bank.m} basis files ({_gib(bank.memory().bases_files)}); the bank is sound")
    changed = bank.changed_sources()
    for name, why in changed.items():
        err_console.print(
            f"[yellow]warning:[/] task {escape(name)}: its recorded source {escape(why)}; "
            "`bases add` will refuse to re-merge it (--allow-changed-sources uses it as it is now)",
            soft_wrap=True,
        )
    if changed:
        console.print(f"{len(changed)} of {bank.t} recorded source files are no longer as recorded (see the warnings)")
