"""What `taskvec compose` does with a suite: its config file, training a composer (the variational
one or a learned-coefficient baseline) on the validation splits or on unlabeled test inputs
(AdaMerging's entropy objective) and saving it, scoring a saved one on the test splits, predicting
new inputs of a task, and exporting a task's model. The learned runs of `bench run` and the
stacked splits they learn from are in taskvec.bench.learned."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from pydantic import Field, ValidationError, field_validator

from taskvec.bench.learned import stack_data, suite_composer, suite_data, task_parts
from taskvec.bench.models import forward_features
from taskvec.bench.prepare import Prepared, prepare
from taskvec.bench.sources import IMAGE_SUFFIXES, column, read_npz, read_table
from taskvec.config import Strict, dtype_named, known_name, load_yaml_config
from taskvec.errors import ConfigError, format_validation_error
from taskvec.io import open_checkpoint, read
from taskvec.io.atomic import atomic_path, check_output
from taskvec.io.readers import parse_json
from taskvec.registry import validation_error
from taskvec.variational import (
    PRESETS,
    Composer,
    ComposeTrainConfig,
    EvalResult,
    TrainConfig,
    evaluate_composer,
    load_composer,
    read_composer_info,
    save_composer,
    train_composer,
)

CopyModelFiles = Callable[[Path, Path, torch.dtype | None], object]
"""Copies a Hugging Face folder's config, tokenizer and generation files into an output folder."""


class ComposeRunConfig(Strict):
    """`taskvec compose train` config: a suite (a YAML file, relative to this config, or a built-in
    name), a composer preset with overrides, and training options.

        suite: my-suite.yaml
        preset: variational        # taskvec.variational.PRESETS
        composer: {kl_weight: 0.0001}
        train: {epochs: 5, batch_size: 64, lr: 0.001}
    """

    suite: str
    preset: str = "variational"
    composer: dict[str, Any] = Field(default_factory=dict)
    train: TrainConfig = Field(default_factory=TrainConfig)
    cache: str | None = None

    @field_validator("preset")
    @classmethod
    def _known(cls, v: str) -> str:
        return known_name(v, PRESETS, "composer preset")

    @field_validator("composer")
    @classmethod
    def _composer(cls, v: dict[str, Any], info: Any) -> dict[str, Any]:
        name = info.data.get("preset")
        if name in PRESETS:
            try:
                suite_composer(name, **v)
            except ValidationError as e:
                raise validation_error(format_validation_error(e)) from None
        return v

    def resolve_paths(self, root: Path) -> ComposeRunConfig:
        """A suite given as a file is relative to this config's folder."""
        p = Path(self.suite)
        update: dict[str, Any] = {}
        if (p.suffix in (".yaml", ".yml") or (root / p).exists()) and not p.is_absolute():
            update["suite"] = str(root / p)
        if self.cache is not None and not Path(self.cache).is_absolute():
            update["cache"] = str(root / self.cache)
        return self.model_copy(update=update)

    def train_config(self) -> ComposeTrainConfig:
        return ComposeTrainConfig(composer=suite_composer(self.preset, **self.composer), train=self.train)


def load_run_config(path: str | Path) -> ComposeRunConfig:
    return load_yaml_config(path, ComposeRunConfig)


def train_on_suite(
    cfg: ComposeRunConfig, out: str | Path, *, overwrite: bool = False
) -> tuple[Composer, EvalResult, Prepared]:
    """Train the configured composer on the suite and save it; returns it with its test result."""
    out = check_output(out, overwrite=overwrite)  # before the suite is prepared and the composer trained
    tcfg = cfg.train_config()
    prep = prepare(cfg.suite, Path(cfg.cache) if cfg.cache else None)
    entropy = tcfg.composer.objective == "entropy"
    data = suite_data(prep, "test", labels=False, progress=True) if entropy else suite_data(prep, "val", progress=True)
    tvs, heads = task_parts(prep)
    composer = train_composer(
        prep.backbone, tvs, heads, data, tcfg, forward_fn=forward_features, task_names=list(prep.tasks)
    )
    run: dict[str, object] = {"suite": prep.suite.source, "cache": cfg.cache, "preset": cfg.preset}
    save_composer(composer, out, overwrite=overwrite, run=run)
    return composer, evaluate_on_suite(composer, prep, tcfg.train.eval_mode, tcfg.train.eval_samples), prep


def evaluate_on_suite(composer: Composer, prep: Prepared, mode: str = "deterministic", samples: int = 8) -> EvalResult:
    return evaluate_composer(composer, suite_data(prep, "test"), mode=mode, samples=samples)


def composer_suite(path: Path, suite: str | Path | None = None) -> str:
    """The suite a saved composer was trained on (or `suite`), checked before anything is loaded."""
    info = read_composer_info(path)
    if suite is not None:
        return str(suite)
    recorded = info.get("run", {}).get("suite")
    if not recorded:
        raise ConfigError(f"{path}: the composer does not record its suite; pass --suite")
    return str(recorded)


def load_on_suite(path: Path, suite: str | Path | None = None, cache: Path | None = None) -> tuple[Composer, Prepared]:
    """A saved composer rebuilt on its suite (default: the one it records)."""
    name = composer_suite(path, suite)
    if cache is None:
        recorded = read_composer_info(path).get("run", {}).get("cache")
        cache = Path(recorded) if recorded else None
    prep = prepare(name, cache)
    tvs, heads = task_parts(prep)
    return load_composer(path, prep.backbone, tvs, heads, forward_fn=forward_features), prep


# --------------------------------------------------------------------------- new inputs


def check_inputs_file(path: Path) -> None:
    """Read an inputs file (.csv, .jsonl, .npz) strictly, to refuse a damaged one before any work."""
    fmt = {".csv": "csv", ".jsonl": "jsonl", ".json": "jsonl"}.get(path.suffix)
    if path.suffix == ".npz":
        read_npz(path, ["x"], ["y"])
    elif fmt is not None and path.is_file():
        read_table(path, fmt)


def read_inputs(path: Path, prep: Prepared, task: str, text_column: str | None = None) -> tuple[Any, list[Any] | None]:
    """Raw inputs of a file for `task` (texts of a csv/jsonl/parquet column, arrays `x` of an .npz,
    or the images of a folder) and their labels when the file has the task's label column."""
    spec = prep.suite.task(task)
    src = spec.data["train"] if isinstance(spec.data, dict) else spec.data
    text_col = str(text_column or getattr(src, "text", "text"))
    label_col = str(getattr(src, "label", "label"))
    if path.is_dir():
        from PIL import Image

        files = sorted(f for f in path.iterdir() if f.suffix.lower() in IMAGE_SUFFIXES)
        if not files:
            raise ConfigError(f"{path}: no images")
        images = []
        for f in files:
            with Image.open(f) as im:
                images.append(np.asarray(im.convert("RGB"), dtype=np.uint8))
        if len({a.shape for a in images}) > 1:
            raise ConfigError(f"{path}: images of different sizes; resize them to one size first")
        return np.stack(images), None
    if not path.is_file():
        raise ConfigError(f"{path}: no such input file")
    if path.suffix == ".npz":
        z = read_npz(path, ["x"], ["y"])
        x = z["x"]
        labels = z["y"].tolist() if "y" in z else None
        return ([str(t) for t in x] if x.dtype.kind in "US" else x), labels
    fmt = {".csv": "csv", ".jsonl": "jsonl", ".json": "jsonl", ".parquet": "parquet"}.get(path.suffix)
    if fmt is None:
        raise ConfigError(f"{path}: inputs must be a .csv, .jsonl, .parquet or .npz file, or an image folder")
    rows = read_table(path, fmt)
    if not rows:
        raise ConfigError(f"{path}: no rows")
    texts = [str(t) for t in column(rows, text_col, path)]
    return texts, ([r[label_col] for r in rows] if label_col in rows[0] else None)


@torch.no_grad()
def predict(
    composer: Composer, prep: Prepared, task: str, raw: Any, mode: str = "deterministic", samples: int = 8
) -> list[dict[str, Any]]:
    """One record per input of `task`: the predicted class, the per-sample coefficients
    {task vector: [one per block]} and the share of coefficients the gate kept."""
    names = list(prep.tasks)
    if task not in prep.tasks:
        raise ConfigError(f"no task {task!r} in suite {prep.suite.name!r}; tasks: {', '.join(names)}")
    assert prep.loaded is not None
    inputs = prep.loaded.encode(raw)
    n = len(raw)
    data = stack_data(prep, [inputs], torch.full((n,), names.index(task), dtype=torch.long), None)
    result = evaluate_composer(composer, data, mode=mode, samples=samples)
    ref = next(iter(composer.coef.parameters()))
    classes = prep.tasks[task].classes
    records = []
    for index in torch.arange(n).split(256):
        alpha = composer.coefficients(data.features[index].to(ref.device, ref.dtype)).double().cpu()
        if alpha.dim() == 2:
            alpha = alpha.expand(len(index), *alpha.shape)
        for row, i in enumerate(index.tolist()):
            a = alpha[row]
            c = int(result.predictions[i])
            records.append(
                {
                    "index": i,
                    "task": task,
                    "prediction": classes[c],
                    "class_index": c,
                    "kept": float((a != 0).double().mean()),
                    "coefficients": {names[t]: a[t].tolist() for t in range(a.shape[0])},
                }
            )
    return records


def predictions_owned(path: Path) -> str | None:
    """None if `path` is a predictions file taskvec wrote (JSON lines of its prediction records)."""
    try:
        with open(path) as f:
            first = parse_json(f.readline(2**20) or "null")
    except (OSError, ValueError):
        first = None
    if isinstance(first, dict) and {"prediction", "coefficients", "kept"} <= first.keys():
        return None
    return "is a file that taskvec did not write"


def write_jsonl(records: list[dict[str, Any]], out: Path, *, overwrite: bool = False) -> Path:
    """Write records one JSON object per line, atomically."""
    with atomic_path(out, overwrite=overwrite, owned=predictions_owned) as tmp:
        tmp.write_text("".join(json.dumps(r) + "\n" for r in records))
    return out


# --------------------------------------------------------------------------- export


def task_coefficients(composer: Composer, prep: Prepared, task: str, split: str = "val") -> torch.Tensor:
    """(T, B) mean of the deterministic coefficients alpha*(x) over the task's `split` inputs."""
    if task not in prep.tasks:
        raise ConfigError(f"no task {task!r} in suite {prep.suite.name!r}; tasks: {', '.join(prep.tasks)}")
    data = suite_data(prep, split, labels=False, tasks=[task])
    return evaluate_composer(composer, data).coef_mean[list(prep.tasks).index(task)]


def composed_state(composer: Composer, prep: Prepared, alpha: torch.Tensor) -> dict[str, torch.Tensor]:
    """theta0 + sum_tb alpha_tb tau_tb for every tensor of the backbone (computed in float64)."""
    m = composer.model
    names = list(prep.tasks)
    state = dict(prep.pretrained)
    for k in m.keys:
        b = m.blocks.index[k]
        base = prep.pretrained[k].double()
        acc = base.clone()
        for t, name in enumerate(names):
            acc += float(alpha[t, b]) * (prep.finetuned[name][k].double() - base)
        state[k] = acc.to(prep.pretrained[k].dtype)
    return state


def export_task(
    composer: Composer,
    prep: Prepared,
    task: str,
    out: Path,
    *,
    split: str = "val",
    dtype: torch.dtype | None = None,
    overwrite: bool = False,
    copy_model_files: CopyModelFiles | None = None,
) -> tuple[Path, torch.Tensor]:
    """Write the static model of `task`: its mean coefficients over the `split` inputs applied once.

    `out/model.safetensors` holds the backbone's tensors under the names of the model it was loaded
    from (a Hugging Face folder's own names; a CLIPModel's text tower is copied from its folder, so
    the export is a whole CLIPModel); when the backbone is a Hugging Face folder,
    `copy_model_files(folder, out, dtype)` adds its config and tokenizer files. Atomic. Returns the
    folder and the (T, B) coefficients used."""
    from safetensors.torch import save_file

    check_output(out, overwrite=overwrite)
    alpha = task_coefficients(composer, prep, task, split)
    state = composed_state(composer, prep, alpha)
    assert prep.loaded is not None
    prefix = prep.loaded.prefix
    tensors = {
        (k[len(prefix) :] if prefix and k.startswith(prefix) else k): v.to(dtype)
        if dtype and v.is_floating_point()
        else v
        for k, v in state.items()
    }
    if prep.loaded.complete_from is not None:  # e.g. a CLIPModel's text tower: the export loads as a CLIPModel
        src = open_checkpoint(prep.loaded.complete_from)
        for k in src.keys():
            if k not in tensors:
                t = read(src, k)
                tensors[k] = t.to(dtype) if dtype and t.is_floating_point() else t
    with atomic_path(out, overwrite=overwrite, folder=True) as tmp:
        save_file(
            {k: v.contiguous() for k, v in tensors.items()}, str(tmp / "model.safetensors"), metadata={"format": "pt"}
        )
        info = {
            "task": task,
            "split": split,
            "task_vectors": list(prep.tasks),
            "coefficients": alpha.tolist(),
            "blocks": list(composer.model.blocks.names),
            "suite": prep.suite.source,
        }
        (tmp / "taskvec_export.json").write_text(json.dumps(info, indent=1))
        if prep.loaded.hf_folder is not None and copy_model_files is not None:
            copy_model_files(prep.loaded.hf_folder, tmp, dtype)
    return out, alpha


dtype_of = dtype_named
