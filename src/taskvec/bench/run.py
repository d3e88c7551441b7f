"""Run a suite end to end: fit heads, fine-tune one backbone per task (cached), compose with every
method, choose coefficients on validation, report test accuracy, and test task negation."""

from __future__ import annotations

import hashlib
import json
import platform
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from safetensors.torch import load_file
from torch import nn

from taskvec.bench.backbones import Backbone, load_backbone, match_state
from taskvec.bench.cache import default_cache, save_atomic
from taskvec.bench.finetune import finetune
from taskvec.bench.heads import HeadContext, build_head
from taskvec.bench.models import accuracy
from taskvec.bench.suite import SuiteSpec, TaskData, TaskSpec, load_suite, load_task
from taskvec.core import TaskVector
from taskvec.errors import ConfigError
from taskvec.grid import LAMBDAS, OnEval, extend_search
from taskvec.io.atomic import write_text_atomic
from taskvec.methods import compose

DEFAULT_METHODS = ("task_arithmetic", "ties", "dare", "magnitude")
DEFAULT_PARAMS: dict[str, dict[str, object]] = {
    "ties": {"density": 0.2},
    "dare": {"density": 0.5, "seed": 0},
    "magnitude": {"density": 0.2},
}
NEG_LAMBDAS = (0.02, 0.05, 0.1, 0.2, 0.3, 0.5, 1.0, 1.5, 2.0)
CONTROL_KEEP = 0.95


@dataclass
class Prepared:
    """A suite ready to compose: pretrained backbone, frozen heads, fine-tuned weights, data."""

    suite: SuiteSpec
    backbone: nn.Module
    pretrained: dict[str, torch.Tensor]
    tasks: dict[str, TaskData]
    heads: dict[str, nn.Module]
    finetuned: dict[str, dict[str, torch.Tensor]]
    finetune_seconds: dict[str, float] = field(default_factory=dict)
    loaded: Backbone | None = None
    """The backbone with its input encoder and the folder it came from."""

    def task_vector(self, task: str) -> TaskVector:
        """tau_task in float64, so theta0 + 1 * tau gives the fine-tuned float32 weights bit for bit."""
        return TaskVector.from_checkpoints(self.pretrained, self.finetuned[task], dtype=torch.float64, name=task)

    def evaluate(
        self, state: dict[str, torch.Tensor], split: str = "test", tasks: Sequence[str] | None = None
    ) -> dict[str, float]:
        """Accuracy of backbone weights `state` on each task's `split`, through its frozen head."""
        self.backbone.load_state_dict(state)
        return {t: accuracy(self.backbone, self.heads[t], getattr(self.tasks[t], split)) for t in (tasks or self.tasks)}

    def finetuned_accuracy(self, split: str = "test") -> dict[str, float]:
        """Each task's own fine-tuned model on that task's `split`."""
        return {t: self.evaluate(self.finetuned[t], split, [t])[t] for t in self.tasks}


def _check_recipe(folder: Path, suite: SuiteSpec, task: TaskSpec) -> None:
    """A cache entry records the recipe hash it was made from; a named entry (`cache_key`) made
    from a different recipe is refused rather than silently reused."""
    stamp, want = folder / "recipe.json", suite.task_hash(task)
    if stamp.exists():
        have = json.loads(stamp.read_text()).get("hash")
        if have != want:
            raise ConfigError(
                f"{folder}: cached for a different recipe of task {task.name!r} ({have}, now {want}); "
                "remove the task's cache_key or that folder"
            )
        return
    folder.mkdir(parents=True, exist_ok=True)
    tmp = stamp.with_name(f".{stamp.name}.tmp")
    tmp.write_text(json.dumps({"hash": want, "suite": suite.name, "task": task.name}))
    tmp.replace(stamp)


def prepare(
    suite: SuiteSpec | str | Path, cache: Path | None = None, *, progress: bool = True, console: Console | None = None
) -> Prepared:
    """Load the backbone and data, build each task's head, and fine-tune each task without a given
    checkpoint (cached under `cache`, default $TASKVEC_CACHE or ~/.cache/taskvec)."""
    suite = suite if isinstance(suite, SuiteSpec) else load_suite(suite)
    console = console or Console()
    cache = (cache or default_cache()) / "bench" / suite.name
    torch.manual_seed(suite.seed)
    loaded = load_backbone(suite.backbone, suite.root)
    backbone = loaded.module
    pretrained = {k: v.detach().clone() for k, v in backbone.state_dict().items()}
    tasks, heads, finetuned, seconds = {}, {}, {}, {}
    for spec in suite.tasks:
        data = load_task(suite, spec, loaded)
        tasks[spec.name] = data
        folder = cache / suite.cache_name(spec)
        _check_recipe(folder, suite, spec)
        backbone.load_state_dict(pretrained)
        heads[spec.name] = build_head(suite.head_of(spec), HeadContext(loaded, data, folder, suite.root))
        ft_path = folder / "finetuned.safetensors"
        if spec.finetuned is not None:
            finetuned[spec.name] = match_state(pretrained, Path(suite.root, spec.finetuned), loaded.prefix)
        elif ft_path.exists():
            finetuned[spec.name] = load_file(ft_path)
            console.print(f"[dim]{spec.name}: fine-tuned weights from cache {ft_path}[/]")
        else:
            backbone.load_state_dict(pretrained)
            t0 = time.perf_counter()
            state = finetune(
                backbone,
                heads[spec.name],
                data.train,
                suite.finetune,
                seed=suite.seed,
                state_path=folder / "state.pt",
                description=f"fine-tuning {spec.name}",
                progress=progress,
            )
            seconds[spec.name] = time.perf_counter() - t0
            save_atomic(state, ft_path)
            (folder / "state.pt").unlink(missing_ok=True)
            finetuned[spec.name] = state
    backbone.load_state_dict(pretrained)
    return Prepared(suite, backbone, pretrained, tasks, heads, finetuned, seconds, loaded)


def _mean(xs: Sequence[float]) -> float:
    return sum(xs) / len(xs)


def choose_lambda(
    prep: Prepared, tv: TaskVector, lambdas: Sequence[float] = LAMBDAS, on_eval: OnEval | None = None
) -> dict[str, object]:
    """theta0 + lambda * tv, lambda chosen on validation (mean accuracy over tasks; ties to the
    smaller lambda; searched coarse to fine, past the grid's edge while the best sits there), then
    scored once on test. `on_eval(done, planned)` follows the validation evaluations."""
    delta = TaskVector.from_tensors(tv.to_state_dict())  # materialise once, reuse for every lambda
    val: dict[float, dict[str, float]] = {}

    def score(lam: float) -> float:
        val[lam] = prep.evaluate(delta.apply_to(prep.pretrained, lam), "val")
        return _mean(list(val[lam].values()))

    best, _ = extend_search(score, lambdas, lo=0.005, on_eval=on_eval)
    test = prep.evaluate(delta.apply_to(prep.pretrained, best), "test")
    return {"lambda": best, "val": {str(k): v for k, v in sorted(val.items())}, "test": test}


def negate(
    prep: Prepared, target: str, tv: TaskVector, pre_val: dict[str, float], lambdas: Sequence[float] = NEG_LAMBDAS
) -> dict[str, object]:
    """theta0 - lambda * tv (tv: the target's task vector or a stand-in for it), lambda chosen on
    validation as the largest drop of the target while every other (control) task keeps >= 95% of
    its pretrained accuracy; 0 if none does."""
    controls = [t for t in prep.tasks if t != target]
    delta = TaskVector.from_tensors(tv.to_state_dict())
    best, best_val = 0.0, dict(pre_val)
    for lam in lambdas:
        v = prep.evaluate(delta.apply_to(prep.pretrained, -lam), "val")
        if all(v[c] >= CONTROL_KEEP * pre_val[c] for c in controls) and v[target] < best_val[target]:
            best, best_val = lam, v
    test = prep.evaluate(delta.apply_to(prep.pretrained, -best), "test")
    return {
        "lambda": best,
        "target": test[target],
        "controls": {c: test[c] for c in controls},
        "val": {"target": best_val[target], "controls": {c: best_val[c] for c in controls}},
    }


def run_method(
    prep: Prepared, method: str, params: dict[str, Any], lambdas: Sequence[float] = LAMBDAS
) -> dict[str, object]:
    """Compose all task vectors once, pick lambda on validation (mean accuracy), report test."""
    t0 = time.perf_counter()
    merged = compose([prep.task_vector(t) for t in prep.tasks], method, **params)
    r = choose_lambda(prep, merged, lambdas)
    return {
        "lambda": r["lambda"],
        "params": params,
        "val": r["val"],
        "test": r["test"],
        "seconds": time.perf_counter() - t0,
    }


def run_negation(
    prep: Prepared, pre_val: dict[str, float], lambdas: Sequence[float] = NEG_LAMBDAS
) -> dict[str, dict[str, object]]:
    """Task negation of every task with its own task vector (see `negate`)."""
    return {t: negate(prep, t, prep.task_vector(t), pre_val, lambdas) for t in prep.tasks}


def run_bank(
    prep: Prepared, options: dict[str, Any], out: Path, lambdas: Sequence[float] = LAMBDAS
) -> dict[str, object]:
    """A bank of M bases (default M = ceil(T/2)) built from the task vectors into `out`, then task
    addition from the bank, lambda chosen on validation; memory is the bank's files on disk."""
    from taskvec.bases import build_bank

    names = list(prep.tasks)
    opts = dict(options)
    m = int(opts.pop("m", None) or -(-len(names) // 2))
    method = str(opts.pop("method", "cluster"))
    if method == "cluster":
        opts.setdefault("merge", "mean")
    t0 = time.perf_counter()
    tvs = [prep.task_vector(t) for t in names]
    bank = build_bank(tvs, names, method, m, out=out, dtype=torch.float32, overwrite=True, **opts)
    r = choose_lambda(prep, bank.addition(names), lambdas)
    return {
        "m": m,
        "method": method,
        "assignments": bank.manifest.assignments,
        "bank_bytes": bank.memory().bank,
        "task_vector_bytes": len(names) * tvs[0].numel() * 4,
        "lambda": r["lambda"],
        "val": r["val"],
        "test": r["test"],
        "seconds": time.perf_counter() - t0,
    }


def _run_key(prep: Prepared, name: str, seed: int, init: float | None) -> str:
    """Hash of everything a learned run depends on: the suite's tasks and items, its settings and seed."""
    from taskvec.bench.compose import learned_config

    cfg = learned_config(prep, name, seed, init, progress=False).model_dump(mode="json")
    tasks = {t: [prep.suite.task_hash(d.spec), d.items_sha256] for t, d in prep.tasks.items()}
    return hashlib.sha256(json.dumps({"cfg": cfg, "tasks": tasks}, sort_keys=True).encode()).hexdigest()[:16]


def _learned_run(
    prep: Prepared,
    name: str,
    seed: int,
    val: Any,
    test: Any,
    init: float | None,
    runs: Path,
    progress: bool,
    console: Console,
) -> dict[str, Any]:
    """One learned run: read back from `runs/` when a finished run with the same key is there
    (an interrupted `bench run` resumes), else trained and saved. A file there that is not a run
    of taskvec's is refused, not replaced."""
    from taskvec.bench.compose import run_learned
    from taskvec.errors import OutputError

    saved = runs / f"{name}-s{seed}.json"
    key = _run_key(prep, name, seed, init)
    if saved.exists():
        try:
            done = json.loads(saved.read_text())
        except (OSError, ValueError):
            done = None
        if not isinstance(done, dict) or "key" not in done or "preset" not in done:
            raise OutputError(f"{saved}: not a learned run written by taskvec's bench run; move it away")
        if done["key"] == key:
            console.print(f"[dim]{name} (seed {seed}): finished run from {saved}[/]")
            return done
    console.print(f"learning [bold]{name}[/] (seed {seed}) ...")
    done = {"key": key, **run_learned(prep, name, seed, val, test, init_coef=init, progress=progress)}
    write_text_atomic(saved, json.dumps(done))
    return done


def run_suite(
    suite_name: str | Path | SuiteSpec,
    methods: Sequence[str] = DEFAULT_METHODS,
    *,
    out_dir: Path = Path("runs"),
    cache: Path | None = None,
    negation: bool = True,
    bases: bool = True,
    learned: Sequence[str] | None = None,
    seeds: int | None = None,
    progress: bool = True,
    console: Console | None = None,
) -> dict[str, object]:
    """The whole benchmark of one suite; writes results.json, results.md and accuracy.png under
    out_dir/suite. Static merges (`methods`), a bank of bases (the suite's `compose.bases`), and
    the learned compositions (`learned`, default the suite's `compose.learned`) over `seeds` seeds
    (default the suite's `compose.seeds`), each learned one starting at task arithmetic's lambda."""
    from taskvec.bench.compose import suite_data
    from taskvec.bench.report import write_reports
    from taskvec.variational import PRESETS

    console = console or Console()
    suite = suite_name if isinstance(suite_name, SuiteSpec) else load_suite(suite_name)
    learned = list(suite.compose.learned if learned is None else learned)
    unknown = [m for m in learned if m not in PRESETS]
    if unknown:  # before any fine-tuning
        raise ConfigError(f"learned: unknown composer preset(s) {', '.join(unknown)}; known: {', '.join(PRESETS)}")
    n_seeds = seeds or suite.compose.seeds
    folder = out_dir / suite.name
    t0 = time.perf_counter()
    prep = prepare(suite, cache, progress=progress, console=console)
    pre_test, pre_val = prep.evaluate(prep.pretrained, "test"), prep.evaluate(prep.pretrained, "val")
    ft_test = prep.finetuned_accuracy()
    results: dict[str, Any] = {
        "suite": suite.model_dump(mode="json"),
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
        "pretrained": pre_test,
        "finetuned": ft_test,
        "finetune_seconds": prep.finetune_seconds,
        "methods": {},
        "learned": {},
    }
    for m in methods:
        console.print(f"composing with [bold]{m}[/] ...")
        results["methods"][m] = run_method(prep, m, dict(DEFAULT_PARAMS.get(m, {})))
    if bases and suite.compose.bases is not None and len(prep.tasks) > 1:
        console.print("building a bank of bases ...")
        results["bases"] = run_bank(prep, suite.compose.bases, folder / "bank")
    if learned:
        val, test = suite_data(prep, "val"), suite_data(prep, "test")
        ta = results["methods"].get("task_arithmetic")
        init = float(ta["lambda"]) if ta else None
        for name in learned:
            results["learned"][name] = [
                _learned_run(prep, name, seed, val, test, init, folder / "runs", progress, console)
                for seed in range(n_seeds)
            ]
    if negation:
        console.print("task negation ...")
        results["negation"] = run_negation(prep, pre_val)
        results["pretrained_val"] = pre_val
    results["seconds"] = time.perf_counter() - t0
    write_reports(results, folder, console=console)
    return results
