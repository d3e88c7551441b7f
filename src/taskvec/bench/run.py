"""Run a suite end to end: fit heads, fine-tune one backbone per task (cached), compose with every
method, choose coefficients on validation, report test accuracy, and test task negation.

`run_suite` works in stages: the data and heads, then each task's fine-tuning (its checkpoint
saved in the cache, as a fitted linear-probe head is) and reference accuracies, each static merge,
the bank of bases, each learned run (per seed), task negation. Each result is saved when it
finishes as one JSON file in the run's folder (`OUT/SUITE/stages/`) with a fingerprint of what it
depends on (the suite's backbone, tasks, items, fine-tuned checkpoints and the stage's own
settings). A rerun, or a rerun after Ctrl-C, reads back every finished stage whose
fingerprint still matches and starts at the first one that is not; an interrupted run writes the
table of what it finished so far. `plan_suite` tells in advance what a run will do and about how
long it will take.
"""

from __future__ import annotations

import hashlib
import json
import platform
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from rich.console import Console

from taskvec.bases import build_bank
from taskvec.bench.learned import learned_config, run_learned, suite_data
from taskvec.bench.models import forward_features
from taskvec.bench.prepare import Prepared, build_heads, finetune_task, finetuned_source, load_data
from taskvec.bench.report import check_ours, print_stage, write_reports
from taskvec.bench.suite import BankSpec, SuiteSpec, load_suite
from taskvec.core import TaskVector
from taskvec.errors import ConfigError, OutputError
from taskvec.grid import LAMBDAS, OnEval, extend_search
from taskvec.io.atomic import write_text_atomic
from taskvec.io.readers import parse_json
from taskvec.methods import compose, get_method
from taskvec.progress import bar
from taskvec.variational import PRESETS

NEG_LAMBDAS = (0.02, 0.05, 0.1, 0.2, 0.3, 0.5, 1.0, 1.5, 2.0)
CONTROL_KEEP = 0.95
STAGE_FORMAT = "taskvec/bench-stage"
STAGE_VERSION = 1
"""Bumped when what a stage computes changes, so older stage files are computed again."""
LEARNED_VERSION = 2
"""The same for learned runs alone (2: the composer's initial weights drawn from its seed)."""


def _mean(xs: Sequence[float]) -> float:
    return sum(xs) / len(xs)


def _items(prep: Prepared, split: str) -> int:
    return sum(len(getattr(d, split)) for d in prep.tasks.values())


def choose_lambda(
    prep: Prepared,
    tv: TaskVector,
    lambdas: Sequence[float] = LAMBDAS,
    *,
    progress: bool = False,
    description: str = "choosing λ",
    on_eval: OnEval | None = None,
) -> dict[str, object]:
    """theta0 + lambda * tv, lambda chosen on validation (mean accuracy over tasks; ties to the
    smaller lambda; searched coarse to fine, past the grid's edge while the best sits there), then
    scored once on test. `on_eval(done, planned)` follows the validation evaluations."""
    delta = TaskVector.from_tensors(tv.to_state_dict())  # materialise once, reuse for every lambda
    val: dict[float, dict[str, float]] = {}
    n_val, n_test = _items(prep, "val"), _items(prep, "test")
    with bar(description, len(set(lambdas)) * n_val + n_test, enabled=progress) as advance:

        def score(lam: float) -> float:
            if len(val) >= len(set(lambdas)) and advance.total is not None:  # the grid grew past its edge
                advance(0, total=advance.total + n_val)
            val[lam] = prep.evaluate(delta.apply_to(prep.pretrained, lam), "val", advance=advance)
            return _mean(list(val[lam].values()))

        best, _ = extend_search(score, lambdas, lo=0.005, on_eval=on_eval)
        test = prep.evaluate(delta.apply_to(prep.pretrained, best), "test", advance=advance)
    return {"lambda": best, "val": {str(k): v for k, v in sorted(val.items())}, "test": test}


def negate(
    prep: Prepared,
    target: str,
    tv: TaskVector,
    pre_val: dict[str, float],
    lambdas: Sequence[float] = NEG_LAMBDAS,
    advance: Callable[[int], None] | None = None,
) -> dict[str, object]:
    """theta0 - lambda * tv (tv: the target's task vector or a stand-in for it), lambda chosen on
    validation as the largest drop of the target while every other (control) task keeps >= 95% of
    its pretrained accuracy; 0 if none does."""
    controls = [t for t in prep.tasks if t != target]
    delta = TaskVector.from_tensors(tv.to_state_dict())
    best, best_val = 0.0, dict(pre_val)
    for lam in lambdas:
        v = prep.evaluate(delta.apply_to(prep.pretrained, -lam), "val", advance=advance)
        if all(v[c] >= CONTROL_KEEP * pre_val[c] for c in controls) and v[target] < best_val[target]:
            best, best_val = lam, v
    test = prep.evaluate(delta.apply_to(prep.pretrained, -best), "test", advance=advance)
    return {
        "lambda": best,
        "target": test[target],
        "controls": {c: test[c] for c in controls},
        "val": {"target": best_val[target], "controls": {c: best_val[c] for c in controls}},
    }


def run_method(
    prep: Prepared, method: str, params: dict[str, Any], lambdas: Sequence[float] = LAMBDAS, *, progress: bool = False
) -> dict[str, object]:
    """Compose all task vectors once, pick lambda on validation (mean accuracy), report test."""
    t0 = time.perf_counter()
    merged = compose([prep.task_vector(t) for t in prep.tasks], method, **params)
    r = choose_lambda(prep, merged, lambdas, progress=progress, description=f"{method}: choosing λ")
    return {
        "lambda": r["lambda"],
        "params": params,
        "val": r["val"],
        "test": r["test"],
        "evaluations": len(r["val"]),  # type: ignore[arg-type]
        "seconds": time.perf_counter() - t0,
    }


def run_negation(
    prep: Prepared, pre_val: dict[str, float], lambdas: Sequence[float] = NEG_LAMBDAS, *, progress: bool = False
) -> dict[str, dict[str, object]]:
    """Task negation of every task with its own task vector (see `negate`)."""
    n = len(prep.tasks)
    total = n * (len(lambdas) * _items(prep, "val") + _items(prep, "test"))
    with bar("task negation", total, enabled=progress) as advance:
        return {t: negate(prep, t, prep.task_vector(t), pre_val, lambdas, advance) for t in prep.tasks}


def run_bank(
    prep: Prepared, spec: BankSpec, out: Path, lambdas: Sequence[float] = LAMBDAS, *, progress: bool = False
) -> dict[str, object]:
    """A bank of M bases (default M = ceil(T/2)) built from the task vectors into `out`, then task
    addition from the bank, lambda chosen on validation; memory is the bank's files on disk."""
    names = list(prep.tasks)
    m = spec.m or -(-len(names) // 2)
    method = spec.method
    opts: dict[str, Any] = {"affinity": spec.affinity, "max_m": spec.max_m, **spec.method_options()}
    opts = {k: v for k, v in opts.items() if v is not None}
    if method == "cluster":
        opts.setdefault("merge", "mean")
    t0 = time.perf_counter()
    tvs = [prep.task_vector(t) for t in names]
    bank = build_bank(tvs, names, method, m, out=out, dtype=torch.float32, overwrite=True, progress=progress, **opts)
    r = choose_lambda(prep, bank.addition(names), lambdas, progress=progress, description="bank: choosing λ")
    return {
        "m": m,
        "method": method,
        "assignments": bank.manifest.assignments,
        "bank_bytes": bank.memory().bank,
        "task_vector_bytes": len(names) * tvs[0].numel() * 4,
        "lambda": r["lambda"],
        "val": r["val"],
        "test": r["test"],
        "evaluations": len(r["val"]),  # type: ignore[arg-type]
        "seconds": time.perf_counter() - t0,
    }


# --------------------------------------------------------------------------- stages


def _hash(obj: object) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _stamp(path: Path) -> list[list[object]] | None:
    """Name, size and modification time of a checkpoint file or of every file of a folder."""
    if path.is_file():
        files = [path]
    elif path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file())
    else:
        return None
    return [[str(p), p.stat().st_size, p.stat().st_mtime_ns] for p in files]


def task_key(prep: Prepared, task: str) -> str | None:
    """Fingerprint of one task: its recipe, its items and its fine-tuned checkpoint on disk
    (None while that checkpoint does not exist yet)."""
    spec = prep.suite.task(task)
    stamp = _stamp(finetuned_source(prep, task))
    if stamp is None:
        return None
    return _hash([STAGE_VERSION, prep.suite.task_hash(spec), prep.tasks[task].items_sha256, stamp])


def suite_key(prep: Prepared) -> str | None:
    """Fingerprint of everything a composition depends on: the backbone and every task's key."""
    keys = [task_key(prep, t) for t in prep.tasks]
    if any(k is None for k in keys):
        return None
    return _hash([STAGE_VERSION, prep.suite.backbone_hash(), list(prep.tasks), keys])


def _stage_path(folder: Path, name: str) -> Path:
    return folder / f"{re.sub(r'[^A-Za-z0-9_.=-]', '_', name)}.json"


def load_stage(folder: Path, name: str, key: str | None) -> dict[str, Any] | None:
    """A finished stage's result when its file is there with the same fingerprint `key`, else None.
    A file there that taskvec did not write is refused, not replaced."""
    path = _stage_path(folder, name)
    if not path.exists():
        return None
    try:
        saved = parse_json(path.read_bytes())
    except (OSError, ValueError):
        saved = None
    if not isinstance(saved, dict) or saved.get("format") != STAGE_FORMAT or "result" not in saved:
        raise OutputError(f"{path}: not a stage written by taskvec's bench run; move it away")
    if key is None or saved.get("key") != key:
        return None
    result: dict[str, Any] = saved["result"]
    return result


def save_stage(folder: Path, name: str, key: str, result: dict[str, Any]) -> None:
    """Write a finished stage's result, atomically."""
    folder.mkdir(parents=True, exist_ok=True)
    body = {"format": STAGE_FORMAT, "stage": name, "key": key, "result": result}
    write_text_atomic(_stage_path(folder, name), json.dumps(body, default=str))


def _method_key(prep: Prepared, method: str, params: dict[str, Any], lambdas: Sequence[float]) -> str | None:
    base = suite_key(prep)
    return None if base is None else _hash([base, method, params, sorted(lambdas)])


def _bank_key(prep: Prepared, spec: BankSpec, lambdas: Sequence[float]) -> str | None:
    base = suite_key(prep)
    return None if base is None else _hash([base, "bank", spec.options(), sorted(lambdas)])


def _learned_key(prep: Prepared, name: str, seed: int, init: float | None) -> str | None:
    """Everything a learned run depends on: the suite's key, the preset's settings and the seed."""
    base = suite_key(prep)
    if base is None:
        return None
    cfg = learned_config(prep, name, seed, init, progress=False).model_dump(mode="json")
    return _hash([base, "learned", LEARNED_VERSION, cfg])


def _negation_key(prep: Prepared, lambdas: Sequence[float]) -> str | None:
    base = suite_key(prep)
    return None if base is None else _hash([base, "negation", list(lambdas), CONTROL_KEEP])


# --------------------------------------------------------------------------- the plan


def _check_static(suite: SuiteSpec, methods: Sequence[str] | None) -> list[str]:
    """The static merges to run (default: the suite's `compose.static`), refused before any work if
    unknown; one the suite gives no params for takes its method's defaults."""
    names = list(suite.compose.static if methods is None else methods)
    for m in names:
        get_method(m)
    return names


def _check_learned(suite: SuiteSpec, learned: Sequence[str] | None) -> list[str]:
    """The learned presets to run (default: the suite's), refused before any work if unknown."""
    names = list(suite.compose.learned if learned is None else learned)
    unknown = [m for m in names if m not in PRESETS]
    if unknown:
        raise ConfigError(f"learned: unknown composer preset(s) {', '.join(unknown)}; known: {', '.join(PRESETS)}")
    return names


@dataclass
class PlanRow:
    """One kind of stage: how many there are, how many are finished, what each does, and about
    how many seconds the unfinished ones take."""

    stage: str
    count: int
    done: int
    work: str
    seconds: float


@dataclass
class Plan:
    suite: str
    rows: list[PlanRow]
    forward_ms: dict[str, float]
    """Measured milliseconds of one forward pass per item, per task."""

    @property
    def seconds(self) -> float:
        return sum(r.seconds for r in self.rows)


def forward_seconds(prep: Prepared, items: int = 128, batch_size: int = 128) -> dict[str, float]:
    """Seconds of one forward pass of the backbone per item of each task, timed on `items`
    validation items spread over the split, in batches as evaluation runs them (after one small
    untimed batch)."""
    prep.backbone.load_state_dict(prep.pretrained)
    prep.backbone.eval()
    out = {}
    with torch.no_grad():
        for t, data in prep.tasks.items():
            n = min(items, len(data.val))
            idx = torch.linspace(0, len(data.val) - 1, n).long()
            forward_features(prep.backbone, data.val.batch(idx[:16])[0])  # warm-up
            t0 = time.perf_counter()
            for chunk in idx.split(batch_size):
                forward_features(prep.backbone, data.val.batch(chunk)[0])
            out[t] = (time.perf_counter() - t0) / n
    return out


BACKWARD = 2.0
"""A backward pass costs about twice the forward pass it follows."""


def _when(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def plan_suite(
    prep: Prepared,
    methods: Sequence[str] | None = None,
    *,
    out_dir: Path = Path("runs"),
    negation: bool = True,
    bases: bool = True,
    learned: Sequence[str] | None = None,
    seeds: int | None = None,
    lambdas: Sequence[float] = LAMBDAS,
) -> Plan:
    """What `run_suite` will do on `prep` (data loaded, nothing trained), what is finished already
    (cached fine-tunes, saved stages under out_dir), and an estimate of the rest from a timed
    forward pass (training steps: forward plus a backward of about twice its cost)."""
    suite = prep.suite
    methods = _check_static(suite, methods)
    learned = _check_learned(suite, learned)
    n_seeds = seeds or suite.compose.seeds
    stages = out_dir / suite.name / "stages"
    f = forward_seconds(prep)

    def cost(split: str) -> float:  # one forward pass over every task's split
        return sum(len(getattr(d, split)) * f[t] for t, d in prep.tasks.items())

    val, test, n_lam = cost("val"), cost("test"), len(set(lambdas))
    rows = []
    names = list(prep.tasks)
    probes = [t for t in names if getattr(suite.head_of(suite.task(t)), "kind", "") == "linear_probe"]
    fitted = [t for t in probes if (prep.folders[t] / "head.safetensors").exists()]
    secs = sum(len(prep.tasks[t].train) * f[t] for t in probes if t not in fitted)
    work = f"data loaded; {len(probes)} linear probes on train features" if probes else "data loaded; heads"
    rows.append(PlanRow("heads", len(names), len(names) - len(probes) + len(fitted), work, secs))
    cached = [t for t in names if finetuned_source(prep, t).exists()]
    recipe = suite.finetune
    ft = sum(recipe.epochs * len(prep.tasks[t].train) * f[t] * (1 + BACKWARD) for t in names if t not in cached)
    given = sum(suite.task(t).finetuned is not None for t in names)
    rows.append(
        PlanRow(
            "fine-tunes",
            len(names) - given,
            len([t for t in cached if suite.task(t).finetuned is None]),
            f"{recipe.epochs} epochs over each train split" + (f"; {given} checkpoints given" if given else ""),
            ft,
        )
    )
    refs_done = sum(load_stage(stages, f"task-{t}", task_key(prep, t)) is not None for t in names)
    refs = (val + 2 * test) * (len(names) - refs_done) / len(names)
    rows.append(PlanRow("reference accuracies", len(names), refs_done, "pretrained val+test, fine-tuned test", refs))
    ta_lambda = None
    per_method = n_lam * val + test
    done = 0
    for m in methods:
        params = suite.compose.params(m)
        saved = load_stage(stages, f"static-{m}", _method_key(prep, m, params, lambdas))
        done += saved is not None
        if saved is not None and m == "task_arithmetic":
            ta_lambda = float(saved["lambda"])
    work = f"{n_lam}+ λ on val ({len(names)} tasks), then test"
    rows.append(PlanRow("static merges", len(methods), done, work, per_method * (len(methods) - done)))
    if bases and suite.compose.bases is not None and len(names) > 1:
        saved = load_stage(stages, "bank", _bank_key(prep, suite.compose.bases, lambdas))
        rows.append(
            PlanRow("bank of bases", 1, int(saved is not None), "build, then " + work, 0.0 if saved else per_method)
        )
    if learned:
        count, done, secs = 0, 0, 0.0
        known = ta_lambda is not None or "task_arithmetic" not in methods  # the runs start at TA's λ
        for name in learned:
            for seed in range(n_seeds):
                count += 1
                init = ta_lambda
                key = _learned_key(prep, name, seed, init) if known else None
                if load_stage(stages, f"learned-{name}-s{seed}", key) is not None:
                    done += 1
                    continue
                cfg = learned_config(prep, name, seed, init, progress=False)
                items = cost("test") if cfg.composer.objective == "entropy" else cost("val")
                secs += cfg.train.epochs * items * (1 + BACKWARD) + test
        if done < count:
            secs += val + test  # frozen features f0(x) of the splits, once
        epochs = sorted({learned_config(prep, n, 0, None, progress=False).train.epochs for n in learned})
        work = f"{', '.join(learned)}; {'/'.join(map(str, epochs))} epochs on val, then test"
        rows.append(PlanRow(f"learned runs ({n_seeds} seed{'s' * (n_seeds > 1)})", count, done, work, secs))
    if negation:
        saved = load_stage(stages, "negation", _negation_key(prep, NEG_LAMBDAS))
        work = f"{len(NEG_LAMBDAS)} λ on val per target task, then test"
        secs = 0.0 if saved else len(names) * (len(NEG_LAMBDAS) * val + test)
        rows.append(PlanRow("task negation", 1, int(saved is not None), work, secs))
    return Plan(suite.name, rows, {t: 1000 * s for t, s in f.items()})


def print_plan(plan: Plan, console: Console) -> None:
    """The plan as a table that fits 80 columns."""
    from rich.table import Table

    t = Table(title=f"plan of {plan.suite}", title_justify="left")
    t.add_column("stage", no_wrap=True)
    t.add_column("done", justify="right", no_wrap=True)
    t.add_column("each", overflow="fold")
    t.add_column("time left", justify="right", no_wrap=True)
    for r in plan.rows:
        t.add_row(r.stage, f"{r.done}/{r.count}", r.work, "done" if r.done == r.count else f"~{_when(r.seconds)}")
    console.print(t)
    speed = ", ".join(f"{t} {ms:.2f}" for t, ms in plan.forward_ms.items())
    console.print(
        f"about {_when(plan.seconds)} left on this machine (from a timed forward pass, ms per item: {speed}; "
        "a training step counted as 3 forward passes)"
    )


# --------------------------------------------------------------------------- the run


def _header(prep: Prepared) -> dict[str, Any]:
    return {
        "suite": prep.suite.model_dump(mode="json"),
        "items_sha256": {t: d.items_sha256 for t, d in prep.tasks.items()},
        "machine": {
            "platform": platform.platform(),
            "processor": platform.processor(),
            "threads": torch.get_num_threads(),
            "device": "cpu",
        },
        "batchnorm": "frozen at pretrained statistics during fine-tuning (backbone in eval mode); "
        "no re-estimation after composing",
        "selection": "lambda and every setting chosen on validation splits; test reported once",
        "pretrained": {},
        "pretrained_val": {},
        "finetuned": {},
        "finetune_seconds": {},
        "methods": {},
        "learned": {},
    }


def _task_stage(prep: Prepared, task: str, seconds: float | None, progress: bool) -> dict[str, Any]:
    """The pretrained model on the task's val and test splits, its fine-tuned model on test."""
    d = prep.tasks[task]
    with bar(f"{task}: reference accuracies", len(d.val) + 2 * len(d.test), enabled=progress) as advance:
        pre_val = prep.evaluate(prep.pretrained, "val", [task], advance)[task]
        pre_test = prep.evaluate(prep.pretrained, "test", [task], advance)[task]
        ft_test = prep.evaluate(prep.finetuned[task], "test", [task], advance)[task]
    return {"pretrained_val": pre_val, "pretrained": pre_test, "finetuned": ft_test, "finetune_seconds": seconds}


def run_suite(
    suite_name: str | Path | SuiteSpec,
    methods: Sequence[str] | None = None,
    *,
    out_dir: Path = Path("runs"),
    cache: Path | None = None,
    negation: bool = True,
    bases: bool = True,
    learned: Sequence[str] | None = None,
    seeds: int | None = None,
    progress: bool = True,
    console: Console | None = None,
    show_plan: bool = True,
) -> dict[str, object]:
    """The whole benchmark of one suite; writes results.json, results.md and accuracy.png under
    out_dir/suite. Static merges (`methods`, default the suite's `compose.static`), a bank of bases
    (the suite's `compose.bases`), and the learned compositions (`learned`, default the suite's
    `compose.learned`) over `seeds` seeds (default the suite's `compose.seeds`), each learned one
    starting at task arithmetic's lambda.

    Each stage is saved under out_dir/suite/stages when it finishes and its result printed; a
    rerun reads back the finished ones. On KeyboardInterrupt the table of the finished stages is
    written (results.json says `"complete": false`) and the interrupt goes on."""
    console = console or Console()
    suite = suite_name if isinstance(suite_name, SuiteSpec) else load_suite(suite_name)
    methods = _check_static(suite, methods)
    learned = _check_learned(suite, learned)
    n_seeds = seeds or suite.compose.seeds
    folder = out_dir / suite.name
    stages = folder / "stages"
    check_ours(folder)  # before any work: the reports will replace only an earlier run's
    t0 = time.perf_counter()
    console.print(f"[bold]{suite.name}[/]: loading the backbone and data ...")
    prep = load_data(suite, cache)
    if show_plan:
        print_plan(
            plan_suite(prep, methods, out_dir=out_dir, negation=negation, bases=bases, learned=learned, seeds=n_seeds),
            console,
        )
    results = _header(prep)
    stage = "data and heads"
    try:
        build_heads(prep)
        for task in prep.tasks:
            stage = f"fine-tuning {task}"
            seconds = finetune_task(prep, task, progress=progress, console=console)
            stage = f"reference accuracies of {task}"
            key = task_key(prep, task)
            assert key is not None
            ref = load_stage(stages, f"task-{task}", key)
            saved = ref is not None
            if ref is None:
                ref = _task_stage(prep, task, seconds, progress)
                save_stage(stages, f"task-{task}", key, ref)
            for k in ("pretrained", "pretrained_val", "finetuned"):
                results[k][task] = ref[k]
            if ref["finetune_seconds"] is not None:
                results["finetune_seconds"][task] = ref["finetune_seconds"]
            print_stage(results, "task", task, console, saved=saved)
        for m in methods:
            stage = f"static merge {m}"
            params = suite.compose.params(m)
            key = _method_key(prep, m, params, LAMBDAS)
            assert key is not None
            res = load_stage(stages, f"static-{m}", key)
            saved = res is not None
            if res is None:
                res = run_method(prep, m, params, progress=progress)
                save_stage(stages, f"static-{m}", key, res)
            results["methods"][m] = res
            print_stage(results, "static", m, console, saved=saved)
        if bases and suite.compose.bases is not None and len(prep.tasks) > 1:
            stage = "bank of bases"
            key = _bank_key(prep, suite.compose.bases, LAMBDAS)
            assert key is not None
            res = load_stage(stages, "bank", key)
            saved = res is not None
            if res is None:
                res = run_bank(prep, suite.compose.bases, folder / "bank", progress=progress)
                save_stage(stages, "bank", key, res)
            results["bases"] = res
            print_stage(results, "bank", "bank", console, saved=saved)
        if learned:
            stage = "learned runs"
            _learned_stages(prep, results, learned, n_seeds, stages, progress, console)
        if negation:
            stage = "task negation"
            key = _negation_key(prep, NEG_LAMBDAS)
            assert key is not None
            neg = load_stage(stages, "negation", key)
            saved = neg is not None
            if neg is None:
                neg = run_negation(prep, results["pretrained_val"], progress=progress)
                save_stage(stages, "negation", key, neg)
            results["negation"] = neg
            print_stage(results, "negation", "negation", console, saved=saved)
    except KeyboardInterrupt:
        results["complete"] = False
        results["interrupted"] = stage
        results["seconds"] = time.perf_counter() - t0
        write_reports(results, folder, console=console)
        console.print(f"[yellow]interrupted during {stage}[/]; finished stages are saved in {stages}")
        raise
    if not negation:
        results.pop("pretrained_val", None)
    results["complete"] = True
    results["seconds"] = time.perf_counter() - t0
    write_reports(results, folder, console=console)
    return results


def _learned_stages(
    prep: Prepared,
    results: dict[str, Any],
    learned: Sequence[str],
    n_seeds: int,
    stages: Path,
    progress: bool,
    console: Console,
) -> None:
    """Each learned run (per preset and seed), read back when finished, else trained and saved."""
    ta = results["methods"].get("task_arithmetic")
    init = float(ta["lambda"]) if ta else None
    data: dict[str, Any] = {}
    for name in learned:
        results["learned"][name] = []
        for seed in range(n_seeds):  # an interrupt here keeps the finished seeds in `results`
            key = _learned_key(prep, name, seed, init)
            assert key is not None
            done = load_stage(stages, f"learned-{name}-s{seed}", key)
            saved = done is not None
            if done is None:
                if not data:
                    console.print("frozen pretrained features of the val and test splits ...")
                    data["val"], data["test"] = suite_data(prep, "val"), suite_data(prep, "test")
                console.print(f"learning [bold]{name}[/] (seed {seed}) ...")
                done = run_learned(prep, name, seed, data["val"], data["test"], init_coef=init, progress=progress)
                save_stage(stages, f"learned-{name}-s{seed}", key, done)
            results["learned"][name].append(done)
            print_stage(results, "learned", name, console, seed=seed, saved=saved)
