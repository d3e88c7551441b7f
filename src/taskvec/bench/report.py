"""Tables (rich, Markdown), JSON and a bar chart of a suite's results; every file written atomically."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from taskvec.io.atomic import write_text_atomic


def accuracy_rows(r: dict[str, Any]) -> tuple[list[str], list[tuple[str, list[float], float, float | None]]]:
    """(task names, rows of (label, per-task accuracy, mean accuracy, mean normalized accuracy))."""
    tasks = list(r["finetuned"])
    ft = r["finetuned"]
    rows: list[tuple[str, list[float], float, float | None]] = []

    def row(label: str, accs: dict[str, float], normalized: bool = True) -> None:
        vals = [accs[t] for t in tasks]
        norm = sum(accs[t] / ft[t] for t in tasks) / len(tasks) if normalized else None
        rows.append((label, vals, sum(vals) / len(vals), norm))

    row("pretrained (frozen-feature head)", r["pretrained"])
    row("fine-tuned (one model per task)", ft)
    for m, res in r["methods"].items():
        row(f"{m} (λ={res['lambda']:g})", res["test"])
    return tasks, rows


def markdown(r: dict[str, Any]) -> str:
    tasks, rows = accuracy_rows(r)
    lines = [
        f"### {r['suite']['name']}: test accuracy (%)",
        "",
        "| method | " + " | ".join(tasks) + " | avg | avg normalized |",
        "|---" * (len(tasks) + 3) + "|",
    ]
    for label, vals, avg, norm in rows:
        lines.append(
            f"| {label} | "
            + " | ".join(f"{100 * v:.1f}" for v in vals)
            + f" | {100 * avg:.1f} | {'' if norm is None else f'{100 * norm:.1f}'} |"
        )
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
            pre_c = sum(r["pretrained"][c] for c in cs) / len(cs)
            neg_c = sum(cs.values()) / len(cs)
            kept = min(cs[c] / r["pretrained"][c] for c in cs)
            lines.append(
                f"| {t} | {n['lambda']:g} | {100 * r['pretrained'][t]:.1f} → {100 * n['target']:.1f} "
                f"| {100 * pre_c:.1f} → {100 * neg_c:.1f} | min {100 * kept:.1f}% |"
            )
    secs = r.get("finetune_seconds") or {}
    if secs:
        lines += ["", "Fine-tuning time (s): " + ", ".join(f"{t} {s:.0f}" for t, s in secs.items())]
    lines += [
        "",
        "Composition time (s): " + ", ".join(f"{m} {res['seconds']:.1f}" for m, res in r["methods"].items()),
        "",
    ]
    return "\n".join(lines)


def bar_chart(r: dict[str, Any], path: Path) -> Path:
    from taskvec._optional import require

    require("matplotlib", "plot").use("Agg")
    plt = require("matplotlib.pyplot", "plot")
    import numpy as np

    from taskvec.report import _atomic_savefig

    tasks, rows = accuracy_rows(r)
    fig, ax = plt.subplots(figsize=(2 + 1.6 * (len(tasks) + 1), 4))
    width = 0.8 / len(rows)
    x = np.arange(len(tasks) + 1)
    for i, (label, vals, avg, _) in enumerate(rows):
        ax.bar(x + i * width, [100 * v for v in vals] + [100 * avg], width, label=label)
    ax.set_xticks(x + 0.4 - width / 2, tasks + ["avg"])
    ax.set_ylabel("test accuracy (%)")
    ax.set_ylim(0, 100)
    ax.set_title(f"{r['suite']['name']}: composed models vs one model per task")
    ax.legend(fontsize=7, loc="lower right")
    _atomic_savefig(fig, path)
    plt.close(fig)
    return path


def print_table(r: dict[str, Any], console: Console) -> None:
    tasks, rows = accuracy_rows(r)
    t = Table(title=f"{r['suite']['name']}: test accuracy (%)")
    t.add_column("method")
    for name in [*tasks, "avg", "avg norm."]:
        t.add_column(name, justify="right")
    for label, vals, avg, norm in rows:
        t.add_row(
            label, *(f"{100 * v:.1f}" for v in vals), f"{100 * avg:.1f}", "" if norm is None else f"{100 * norm:.1f}"
        )
    console.print(t)


def write_reports(r: dict[str, Any], folder: Path, console: Console | None = None) -> dict[str, Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = {"json": folder / "results.json", "md": folder / "results.md", "png": folder / "accuracy.png"}
    write_text_atomic(paths["json"], json.dumps(r, indent=2, default=str))
    write_text_atomic(paths["md"], markdown(r))
    bar_chart(r, paths["png"])
    if console is not None:
        print_table(r, console)
        console.print(f"wrote {paths['json']}, {paths['md']}, {paths['png']}")
    return paths
