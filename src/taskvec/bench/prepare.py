"""A suite ready to compose: the pretrained backbone, every task's data and frozen head, and each
task's fine-tuned weights (given, cached, or fine-tuned here by the suite's recipe and cached)."""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from pathlib import Path

import torch
from rich.console import Console
from torch import nn

from taskvec.bench.backbones import Backbone, load_backbone, match_state
from taskvec.bench.cache import load_cached, save_atomic
from taskvec.bench.finetune import finetune
from taskvec.bench.heads import HeadContext, build_head
from taskvec.bench.models import accuracy
from taskvec.bench.sources import resolve
from taskvec.bench.suite import SuiteSpec, TaskData, TaskSpec, load_suite, load_task
from taskvec.core import TaskVector
from taskvec.errors import ConfigError
from taskvec.io.readers import parse_json
from taskvec.paths import default_cache
from taskvec.progress import Advance, active, bar, sub_bar


@dataclass
class _Counter:
    """The lazily started display of `evaluation_progress`."""

    description: str
    console: Console | None
    stack: ExitStack
    advance: Advance | None = None


_evaluations: ContextVar[_Counter | None] = ContextVar("taskvec_evaluations", default=None)


@contextmanager
def evaluation_progress(description: str, *, enabled: bool = True, console: Console | None = None) -> Iterator[None]:
    """Every `Prepared.evaluate` inside shows a bar (with time remaining) under one counter of
    evaluations, started at the first evaluation (fine-tuning before it shows its own bars)."""
    if not enabled:
        yield
        return
    with ExitStack() as stack:
        token = _evaluations.set(_Counter(description, console, stack))
        try:
            yield
        finally:
            _evaluations.reset(token)


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
    folders: dict[str, Path] = field(default_factory=dict)
    """Each task's cache folder (its head, fine-tuned checkpoint and recipe stamp)."""

    def task_vector(self, task: str) -> TaskVector:
        """tau_task in float64, so theta0 + 1 * tau gives the fine-tuned float32 weights bit for bit."""
        return TaskVector.from_checkpoints(self.pretrained, self.finetuned[task], dtype=torch.float64, name=task)

    def evaluate(
        self,
        state: dict[str, torch.Tensor],
        split: str = "test",
        tasks: Sequence[str] | None = None,
        advance: Callable[[int], None] | None = None,
    ) -> dict[str, float]:
        """Accuracy of backbone weights `state` on each task's `split`, through its frozen head.
        `advance(n)` is told each task's number of items once it is scored."""
        names = list(tasks or self.tasks)
        counter = _evaluations.get()
        if counter is not None and not active():
            counter.advance = counter.stack.enter_context(bar(counter.description, None, console=counter.console))
        self.backbone.load_state_dict(state)
        out = {}
        total = sum(len(getattr(self.tasks[t], split)) for t in names)
        with sub_bar(f"  {split} accuracy", total) as sub:
            for t in names:
                data = getattr(self.tasks[t], split)
                out[t] = accuracy(self.backbone, self.heads[t], data)
                sub(len(data))
                if advance is not None:
                    advance(len(data))
        if counter is not None and counter.advance is not None:
            counter.advance(1)
        return out

    def finetuned_accuracy(self, split: str = "test") -> dict[str, float]:
        """Each task's own fine-tuned model on that task's `split`."""
        return {t: self.evaluate(self.finetuned[t], split, [t])[t] for t in self.tasks}


def _check_recipe(folder: Path, suite: SuiteSpec, task: TaskSpec, *, write: bool = True) -> None:
    """A cache entry records the recipe hash it was made from; a named entry (`cache_key`) made
    from a different recipe is refused rather than silently reused."""
    stamp, want = folder / "recipe.json", suite.task_hash(task)
    if stamp.exists():
        try:
            recorded = parse_json(stamp.read_bytes(), max_bytes=2**20)
        except ValueError:
            recorded = None
        have = recorded.get("hash") if isinstance(recorded, dict) else None
        if have != want:
            raise ConfigError(
                f"{folder}: cached for a different recipe of task {task.name!r} ({have}, now {want}); "
                "remove the task's cache_key or that folder"
            )
        return
    if not write:
        return
    folder.mkdir(parents=True, exist_ok=True)
    tmp = stamp.with_name(f".{stamp.name}.tmp")
    tmp.write_text(json.dumps({"hash": want, "suite": suite.name, "task": task.name}))
    tmp.replace(stamp)


def load_data(suite: SuiteSpec | str | Path, cache: Path | None = None) -> Prepared:
    """The backbone and every task's data, without heads or fine-tuned weights yet (reads only:
    a cache entry made from another recipe is refused here, before any work)."""
    suite = suite if isinstance(suite, SuiteSpec) else load_suite(suite)
    root = (cache or default_cache()) / "bench" / suite.name
    torch.manual_seed(suite.seed)
    loaded = load_backbone(suite.backbone, suite.root)
    backbone = loaded.module
    pretrained = {k: v.detach().clone() for k, v in backbone.state_dict().items()}
    tasks, folders = {}, {}
    for spec in suite.tasks:
        tasks[spec.name] = load_task(suite, spec, loaded)
        folders[spec.name] = root / suite.cache_name(spec)
        _check_recipe(folders[spec.name], suite, spec, write=False)
    return Prepared(suite, backbone, pretrained, tasks, {}, {}, {}, loaded, folders)


def build_heads(prep: Prepared) -> None:
    """Each task's frozen head, on the pretrained backbone (cached where its kind caches)."""
    assert prep.loaded is not None
    for spec in prep.suite.tasks:
        folder = prep.folders[spec.name]
        _check_recipe(folder, prep.suite, spec)
        prep.backbone.load_state_dict(prep.pretrained)
        ctx = HeadContext(prep.loaded, prep.tasks[spec.name], folder, prep.suite.root)
        prep.heads[spec.name] = build_head(prep.suite.head_of(spec), ctx)
    prep.backbone.load_state_dict(prep.pretrained)


def finetuned_source(prep: Prepared, task: str) -> Path:
    """The checkpoint a task's fine-tuned weights come from: the suite's `finetuned:` or the cache's."""
    spec = prep.suite.task(task)
    if spec.finetuned is not None:
        return resolve(prep.suite.root, spec.finetuned)
    return prep.folders[task] / "finetuned.safetensors"


def finetune_task(prep: Prepared, task: str, *, progress: bool = True, console: Console | None = None) -> float | None:
    """Fill `prep.finetuned[task]`: the given checkpoint, the cached one, or a fine-tuning run of
    the suite's recipe (saved to the cache; its seconds are returned, else None)."""
    spec = prep.suite.task(task)
    assert prep.loaded is not None
    folder = prep.folders[task]
    ft_path = folder / "finetuned.safetensors"
    if spec.finetuned is not None:
        prep.finetuned[task] = match_state(
            prep.pretrained,
            Path(prep.suite.root, spec.finetuned),
            (prep.loaded.prefix, *prep.loaded.checkpoint_prefixes),
            optional=prep.loaded.optional,
        )
        return None
    cached = load_cached(ft_path, prep.pretrained) if ft_path.exists() else None
    if cached is not None:
        prep.finetuned[task] = cached
        if console is not None:
            console.print(f"[dim]{task}: fine-tuned weights from cache {ft_path}[/]")
        return None
    _check_recipe(folder, prep.suite, spec)
    prep.backbone.load_state_dict(prep.pretrained)
    t0 = time.perf_counter()
    state = finetune(
        prep.backbone,
        prep.heads[task],
        prep.tasks[task].train,
        prep.suite.finetune,
        seed=prep.suite.seed,
        state_path=folder / "state.pt",
        description=f"fine-tuning {task}",
        progress=progress,
    )
    seconds = time.perf_counter() - t0
    save_atomic(state, ft_path)
    (folder / "state.pt").unlink(missing_ok=True)
    prep.finetuned[task] = state
    prep.finetune_seconds[task] = seconds
    prep.backbone.load_state_dict(prep.pretrained)
    return seconds


def prepare(
    suite: SuiteSpec | str | Path, cache: Path | None = None, *, progress: bool = True, console: Console | None = None
) -> Prepared:
    """Load the backbone and data, build each task's head, and fine-tune each task without a given
    checkpoint (cached under `cache`, default $TASKVEC_CACHE or ~/.cache/taskvec)."""
    console = console or Console()
    prep = load_data(suite, cache)
    build_heads(prep)
    for task in prep.tasks:
        finetune_task(prep, task, progress=progress, console=console)
    prep.backbone.load_state_dict(prep.pretrained)
    return prep
