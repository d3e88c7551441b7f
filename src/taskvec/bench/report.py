"""Tables (rich, Markdown), JSON and a bar chart of a suite's results; every file written atomically.

Three measures per method: test accuracy; normalized accuracy, merged / fine-tuned; and the share
of the fine-tuning gain kept, (merged - pretrained) / (fine-tuned - pretrained), which is 0 for
the pretrained model and 1 for the fine-tuned ones. Per task, and on average: the average
normalized accuracy is the mean of the tasks' ratios; the average gain kept is the gain of the
average accuracy, (mean merged - mean pretrained) / (mean fine-tuned - mean pretrained), which a
task whose fine-tuning gained almost nothing cannot blow up.
"""

from __future__ import annotations

import json
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from rich import box
from rich.console import Console
from rich.table import Table

from taskvec._optional import require
from taskvec.errors import OutputError
from taskvec.io.atomic import write_text_atomic
from taskvec.io.readers import parse_json
from taskvec.report import atomic_savefig


@dataclass
class Row:
    """One method's results: a list of runs (one per seed; static methods have one), and the
    scale λ it was chosen with (static merges and the bank)."""

    name: str
    runs: list[dict[str, float]]
    kind: str = "static"
    lam: float | None = None

    @property
    def label(self) -> str:
        """The name with its λ, as the Markdown table and the chart show it."""
        return self.name if self.lam is None else f"{self.name} (λ={self.lam:g})"

    def per_task(self, t: str) -> tuple[float, float]:
        return mean_sd([r[t] for r in self.runs])


def mean_sd(xs: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single value)."""
    return statistics.fmean(xs), (statistics.stdev(xs) if len(xs) > 1 else 0.0)


def scores(acc: dict[str, float], pre: dict[str, float], ft: dict[str, float]) -> dict[str, float]:
    """Average accuracy, average normalized accuracy and average gain kept of one run."""
    tasks = list(ft)
    avg = statistics.fmean(acc[t] for t in tasks)
    pre_avg, ft_avg = statistics.fmean(pre[t] for t in tasks), statistics.fmean(ft.values())
    return {
        "avg": avg,
        "norm": statistics.fmean(acc[t] / ft[t] for t in tasks),
        "gain": (avg - pre_avg) / (ft_avg - pre_avg) if ft_avg != pre_avg else float("nan"),
    }


def gain_kept(acc: float, pre: float, ft: float) -> float:
    """(merged - pretrained) / (fine-tuned - pretrained) of one task (nan if fine-tuning gained nothing)."""
    return (acc - pre) / (ft - pre) if ft != pre else float("nan")


def rows(r: dict[str, Any]) -> list[Row]:
    """Every method of a results dict, in the order: references, static merges, bank, learned."""
    out = [
        Row("pretrained", [r["pretrained"]], "reference"),
        Row("fine-tuned (one model per task)", [r["finetuned"]], "reference"),
    ]
    for m, res in r["methods"].items():
        out.append(Row(m, [res["test"]], lam=float(res["lambda"])))
    if "bases" in r:
        b = r["bases"]
        out.append(Row(f"bank of M = {b['m']} bases", [b["test"]], "bank", float(b["lambda"])))
    for name, runs in (r.get("learned") or {}).items():
        if runs:
            out.append(Row(name, [x["test"] for x in runs], "learned"))
    return out


def tasks_of(r: dict[str, Any]) -> list[str]:
    """The suite's tasks, in order."""
    return [t["name"] for t in r["suite"].get("tasks", [])] or list(r["finetuned"])


def has_references(r: dict[str, Any]) -> bool:
    """Whether the pretrained and fine-tuned accuracies of every task are there (a run interrupted
    before the end of its fine-tuning stages has no table yet)."""
    return all(t in r.get("pretrained", {}) and t in r.get("finetuned", {}) for t in tasks_of(r))


def status_line(r: dict[str, Any]) -> str | None:
    """What an interrupted run's report lacks, or None for a finished run."""
    if r.get("complete", True):
        return None
    return (
        f"Partial results: the run was interrupted during {r.get('interrupted', 'a stage')}; "
        "run the same command again to go on from the first unfinished stage."
    )


def _cell(m: float, s: float, n: int, scale: float = 100.0) -> str:
    return f"{scale * m:.1f} ± {scale * s:.1f}" if n > 1 else f"{scale * m:.1f}"


def summary(r: dict[str, Any], row: Row) -> dict[str, tuple[float, float]]:
    """Mean and sd over the row's runs of avg, norm and gain."""
    per = [scores(run, r["pretrained"], r["finetuned"]) for run in row.runs]
    return {k: mean_sd([p[k] for p in per]) for k in ("avg", "norm", "gain")}


def t_tests(mine: list[float], others: dict[str, list[float]]) -> list[tuple[str, float, float, str]]:
    """(method, mean difference, p, test) of the values `mine` against each method's values in
    `others`, for 'mine are larger': a one-sided Welch t-test when the other has several values, a
    one-sided one-sample t-test against a single value."""
    stats = require("scipy.stats", "bench")
    out = []
    for name, other in others.items():
        diff = statistics.fmean(mine) - statistics.fmean(other)
        if len(other) > 1:
            p = float(stats.ttest_ind(mine, other, equal_var=False, alternative="greater").pvalue)
            how = f"Welch, {len(mine)} vs {len(other)} seeds"
        else:
            p = float(stats.ttest_1samp(mine, other[0], alternative="greater").pvalue)
            how = f"one-sample, {len(mine)} seeds vs one deterministic value"
        out.append((name, diff, p, how))
    return out


def welch(r: dict[str, Any], ref: str = "variational") -> list[tuple[str, float, float, str]]:
    """(method, mean difference in average accuracy points, p, test) of `ref` against every other
    shared-coefficient method: a one-sided Welch t-test over the seeds when both have several, a
    one-sided one-sample t-test against a deterministic method's single value."""
    learned = r.get("learned") or {}
    if len(learned.get(ref, [])) < 2:
        return []
    mine = [100 * scores(x["test"], r["pretrained"], r["finetuned"])["avg"] for x in learned[ref]]
    others = {
        row.label: [100 * scores(x, r["pretrained"], r["finetuned"])["avg"] for x in row.runs]
        for row in rows(r)
        if row.kind != "reference" and row.label != ref
    }
    return t_tests(mine, others)


def markdown(r: dict[str, Any]) -> str:
    status = status_line(r)
    if not has_references(r):
        done = ", ".join(r.get("finetuned", {})) or "none"
        return f"### {r['suite']['name']}\n\n{status}\n\nNo table yet: tasks with reference accuracies: {done}.\n"
    tasks = list(r["finetuned"])
    pre, ft = r["pretrained"], r["finetuned"]
    seeds = max((len(x) for x in (r.get("learned") or {}).values()), default=1)
    spread = f"; learned methods: mean ± sd over {seeds} seeds" if seeds > 1 else ""
    lines = [
        f"### {r['suite']['name']}: test accuracy (%){spread}",
        "",
        *([status, ""] if status else []),
        "| method | " + " | ".join(tasks) + " | avg | avg normalized | gain kept |",
        "|---" * (len(tasks) + 4) + "|",
    ]
    for row in rows(r):
        n = len(row.runs)
        s = summary(r, row)
        cells = [_cell(*row.per_task(t), n) for t in tasks]
        lines.append(
            f"| {row.label} | " + " | ".join(cells) + f" | {_cell(*s['avg'], n)} | {_cell(*s['norm'], n)} "
            f"| {_cell(*s['gain'], n)} |"
        )
    lines += [
        "",
        "Share of the fine-tuning gain kept per task, (merged − pretrained) / (fine-tuned − pretrained), %:",
        "",
        "| method | " + " | ".join(tasks) + " |",
        "|---" * (len(tasks) + 1) + "|",
    ]
    for row in rows(r):
        if row.kind == "reference":
            continue
        cells = [f"{100 * gain_kept(row.per_task(t)[0], pre[t], ft[t]):.0f}" for t in tasks]
        lines.append(f"| {row.label} | " + " | ".join(cells) + " |")
    tests = welch(r)
    if tests:
        lines += ["", "Is the variational composer better? (average accuracy, one-sided tests over its seeds)", ""]
        lines += [f"* variational − {m}: {d:+.1f} points, p = {p:.3g} ({how})" for m, d, p, how in tests]
    if "bases" in r:
        b = r["bases"]
        lines += [
            "",
            f"Bank: M = {b['m']} bases ({b['method']}) of T = {len(tasks)} task vectors, assignments "
            f"{b['assignments']}; {b['bank_bytes'] / 2**20:.1f} MiB on disk vs "
            f"{b['task_vector_bytes'] / 2**20:.1f} MiB of float32 task vectors.",
        ]
    if any(r.get("learned", {}).values()):
        lines += ["", "| learned method | coefficients kept at test time (%) | train s (mean) |", "|---|---|---|"]
        for name, runs in r["learned"].items():
            if not runs:
                continue
            kept = [statistics.fmean(x["kept"].values()) for x in runs if x.get("kept")]
            k = f"{100 * statistics.fmean(kept):.0f}" if kept else "100"
            lines.append(f"| {name} | {k} | {statistics.fmean(x['seconds'] for x in runs):.1f} |")
    if "negation" in r:
        lines += [
            "",
            "Task negation (θ0 − λ·τ_target; λ chosen on validation with every control task ≥ 95% "
            "of its pretrained accuracy):",
            "",
            "| target | λ | target acc pretrained → negated | control acc pretrained → negated (mean) | control kept |",
            "|---|---|---|---|---|",
        ]
        for t, n in r["negation"].items():
            cs = n["controls"]
            pre_c = sum(pre[c] for c in cs) / len(cs)
            neg_c = sum(cs.values()) / len(cs)
            kept = min(cs[c] / pre[c] for c in cs)
            lines.append(
                f"| {t} | {n['lambda']:g} | {100 * pre[t]:.1f} → {100 * n['target']:.1f} "
                f"| {100 * pre_c:.1f} → {100 * neg_c:.1f} | min {100 * kept:.1f}% |"
            )
    secs = r.get("finetune_seconds") or {}
    if secs:
        lines += ["", "Fine-tuning time (s): " + ", ".join(f"{t} {s:.0f}" for t, s in secs.items())]
    if r["methods"]:
        lines += [
            "",
            "Composition time (s): " + ", ".join(f"{m} {res['seconds']:.1f}" for m, res in r["methods"].items()),
        ]
    digests = r.get("items_sha256") or {}
    if digests:
        lines += [
            "",
            "Items (sha256 of each task's splits): " + ", ".join(f"{t} `{d[:12]}`" for t, d in digests.items()),
        ]
    return "\n".join(lines) + "\n"


def bar_chart(r: dict[str, Any], path: Path) -> Path:
    """Two panels: test accuracy per task and on average (error bars: sd over seeds), and the
    average share of the fine-tuning gain kept per method."""
    require("matplotlib", "plot").use("Agg")
    plt = require("matplotlib.pyplot", "plot")
    tasks = list(r["finetuned"])
    all_rows = rows(r)
    fig, (ax, ax2) = plt.subplots(
        1, 2, figsize=(3 + 1.4 * (len(tasks) + 1) + 4, 6), gridspec_kw={"width_ratios": [len(tasks) + 1, 3]}
    )
    width = 0.8 / len(all_rows)
    x = np.arange(len(tasks) + 1)
    colors = plt.get_cmap("tab20")(np.linspace(0, 1, 20))[[0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 1, 3, 5, 7, 9, 11]]
    for i, row in enumerate(all_rows):
        s = summary(r, row)
        means = [100 * row.per_task(t)[0] for t in tasks] + [100 * s["avg"][0]]
        sds = [100 * row.per_task(t)[1] for t in tasks] + [100 * s["avg"][1]]
        ax.bar(
            x + i * width,
            means,
            width,
            yerr=sds if len(row.runs) > 1 else None,
            label=row.label,
            capsize=2,
            color=colors[i % len(colors)],
        )
    ax.set_xticks(x + 0.4 - width / 2, tasks + ["avg"], rotation=20)
    ax.set_ylabel("test accuracy (%)")
    ax.set_ylim(0, 100)
    ax.set_title(f"{r['suite']['name']}: composed models vs one model per task")
    ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.12), ncol=3)
    merged = [row for row in all_rows if row.kind != "reference"]
    gain = [summary(r, row)["gain"] for row in merged]
    gains, errs = [100 * m for m, _ in gain], [100 * sd for _, sd in gain]
    ax2.barh(
        np.arange(len(merged)),
        gains,
        xerr=errs,
        color=[colors[(i + 2) % len(colors)] for i in range(len(merged))],
        capsize=2,
    )
    ax2.set_yticks(np.arange(len(merged)), [row.label for row in merged], fontsize=7)
    ax2.invert_yaxis()
    ax2.axvline(100, color="black", lw=0.8, ls="--")
    ax2.axvline(0, color="black", lw=0.8)
    ax2.set_xlabel("fine-tuning gain kept (%, average)")
    fig.tight_layout()
    atomic_savefig(fig, path, owned=lambda p: None)  # write_reports checked the folder is ours
    plt.close(fig)
    return path


def _width(table: Table, console: Console) -> int:
    """The width `table` takes when nothing limits it."""
    from rich.measure import Measurement

    return Measurement.get(console, console.options.update(max_width=10_000), table).maximum


def _table(title: str, names: list[str]) -> Table:
    t = Table(title=title, title_justify="left", box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False)
    t.add_column("method", no_wrap=True, min_width=max(len(n) for n in names))
    return t


def print_table(r: dict[str, Any], console: Console) -> None:
    """The results in the terminal, readable at any width down to 80 columns: first the summary
    (method, λ, average, average normalized, gain kept), then the per-task accuracies in as many
    tables as the tasks need to fit the width; a method's name is never cut."""
    status = status_line(r)
    if not has_references(r):
        console.print(status or "no results yet")
        return
    tasks = list(r["finetuned"])
    all_rows = rows(r)
    names = [row.name for row in all_rows]
    seeds = max(len(row.runs) for row in all_rows)
    spread = f"; learned: mean ± sd over {seeds} seeds" if seeds > 1 else ""
    t = _table(f"{r['suite']['name']}: test accuracy (%){spread}", names)
    t.add_column("λ", justify="right", no_wrap=True)
    for c in ("avg", "avg norm.", "gain kept"):
        t.add_column(c, justify="right", no_wrap=True)
    for row in all_rows:
        n = len(row.runs)
        s = summary(r, row)
        lam = "" if row.lam is None else f"{row.lam:g}"
        t.add_row(row.name, lam, _cell(*s["avg"], n), _cell(*s["norm"], n), _cell(*s["gain"], n))
    console.print(t)
    cells = {row.name: [_cell(*row.per_task(c), len(row.runs)) for c in tasks] for row in all_rows}
    chunks: list[list[int]] = [[]]
    for i in range(len(tasks)):  # as many task columns per table as fit the width
        trial = _per_task(r, tasks, chunks[-1] + [i], names, cells, 1, 1)
        if chunks[-1] and _width(trial, console) > console.width:
            chunks.append([i])
        else:
            chunks[-1].append(i)
    for k, chunk in enumerate(chunks):
        console.print(_per_task(r, tasks, chunk, names, cells, k + 1, len(chunks)))
    if status:
        console.print(f"[yellow]{status}[/]")
    short = {row.label: row.name for row in all_rows}
    for m, d, p, how in welch(r):
        console.print(f"variational − {short.get(m, m)}: {d:+.1f} points, p = {p:.3g} ({how})")


def _per_task(
    r: dict[str, Any],
    tasks: list[str],
    chunk: list[int],
    names: list[str],
    cells: dict[str, list[str]],
    part: int,
    parts: int,
) -> Table:
    title = "test accuracy per task (%)" + (f", part {part} of {parts}" if parts > 1 else "")
    t = _table(title, names)
    for i in chunk:
        t.add_column(tasks[i], justify="right", no_wrap=len(tasks[i]) <= 24, min_width=min(len(tasks[i]), 24))
    for name in names:
        t.add_row(name, *(cells[name][i] for i in chunk))
    return t


def print_stage(
    r: dict[str, Any], kind: str, name: str, console: Console, *, seed: int | None = None, saved: bool = False
) -> None:
    """One finished stage's result, printed as soon as it exists: a task's reference accuracies,
    a method's row (λ, average, normalized, gain kept, then per task), or task negation."""
    how = " [dim](saved)[/]" if saved else ""
    if kind == "task":
        secs = r["finetune_seconds"].get(name)
        took = f", fine-tuned in {secs:.0f} s" if secs is not None and not saved else ""
        console.print(
            f"[bold]{name}[/]: test accuracy pretrained {100 * r['pretrained'][name]:.1f} % → "
            f"fine-tuned {100 * r['finetuned'][name]:.1f} %{took}{how}"
        )
        return
    if kind == "negation":
        for t, n in r["negation"].items():
            kept = [a / r["pretrained"][c] for c, a in n["controls"].items() if r["pretrained"][c] > 0]
            controls = f", controls keep ≥ {100 * min(kept):.0f} %" if kept else ""
            console.print(
                f"negating [bold]{t}[/] (λ={n['lambda']:g}): test {100 * r['pretrained'][t]:.1f} → "
                f"{100 * n['target']:.1f} %{controls}{how}"
            )
        return
    if kind == "learned":
        run = r["learned"][name][-1]
        label, acc, lam = f"{name} (seed {seed})", run["test"], None
        extra = f"{run['seconds']:.0f} s"
    else:
        res = r["bases"] if kind == "bank" else r["methods"][name]
        label = f"bank of M = {res['m']} bases" if kind == "bank" else name
        acc, lam = res["test"], res["lambda"]
        evals = res.get("evaluations")
        extra = (f"{evals} val evaluations, " if evals else "") + f"{res['seconds']:.0f} s"
    s = scores(acc, r["pretrained"], r["finetuned"])
    lam_text = "" if lam is None else f" λ={lam:g}"
    console.print(
        f"[bold]{label}[/]{lam_text}: avg {100 * s['avg']:.1f}, avg norm. {100 * s['norm']:.1f}, "
        f"gain kept {100 * s['gain']:.1f} ({extra}){how}"
    )
    console.print("  " + " · ".join(f"{t} {100 * a:.1f}" for t, a in acc.items()), style="dim")


def check_ours(folder: Path) -> None:
    """Refuse (before any work) a folder whose report files an earlier `bench run` did not write."""
    _check_ours(_paths(folder))


def _paths(folder: Path) -> dict[str, Path]:
    return {"json": folder / "results.json", "md": folder / "results.md", "png": folder / "accuracy.png"}


def _check_ours(paths: dict[str, Path]) -> None:
    """Refuse to replace report files that an earlier `bench run` did not write: a results.json
    of taskvec's records `"written_by": "taskvec"`, and the .md and .png beside it are its own."""
    existing = [p for p in paths.values() if p.exists()]
    if not existing:
        return
    try:
        ours = parse_json(paths["json"].read_bytes()).get("written_by") == "taskvec"
    except (OSError, ValueError, AttributeError):
        ours = False
    if not ours:
        names = ", ".join(str(p) for p in existing)
        raise OutputError(f"{names}: not written by taskvec's bench run; choose another output folder (-o)")


def write_reports(r: dict[str, Any], folder: Path, console: Console | None = None) -> dict[str, Path]:
    """results.json, results.md and accuracy.png in `folder`, replacing only an earlier run's. A
    partial run's chart is drawn once every task's reference accuracies exist."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = _paths(folder)
    _check_ours(paths)
    r = {"written_by": "taskvec", **r}
    write_text_atomic(paths["json"], json.dumps(r, indent=2, default=str))
    write_text_atomic(paths["md"], markdown(r))
    written = [paths["json"], paths["md"]]
    if has_references(r):
        bar_chart(r, paths["png"])
        written.append(paths["png"])
    if console is not None:
        print_table(r, console)
        console.print("wrote " + ", ".join(str(p) for p in written))
    return paths
