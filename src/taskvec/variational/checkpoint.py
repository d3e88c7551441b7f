"""Save and reload a trained composer: a folder with config.json and coefficients.safetensors.

Only the learned coefficient model is stored; the backbone, task vectors and heads are given
again at load time and checked against what was recorded (tensor names, shapes, task vector
norms), so a composer is never silently reloaded onto different task vectors. Writes are atomic:
everything goes to a hidden temporary folder renamed into place when complete.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pydantic import ValidationError
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from taskvec.errors import CheckpointError, ConfigError, KeyMismatchError, format_validation_error
from taskvec.io.atomic import atomic_path, check_output
from taskvec.io.readers import read_json
from taskvec.variational.blocks import BlockSpec
from taskvec.variational.engine import ForwardFn, TaskVectorLike, default_forward
from taskvec.variational.methods import COMPOSERS, ComposerConfig, composer_config
from taskvec.variational.train import Composer, build_composer

FORMAT = "taskvec/composer"
VERSION = 1


def _norms(composer: Composer) -> list[float]:
    m = composer.model
    return [math.sqrt(sum(float(m.tau(k)[i].double().square().sum()) for k in m.keys)) for i in range(m.num_tasks)]


def save_composer(
    composer: Composer, path: str | os.PathLike[str], *, overwrite: bool = False, run: dict[str, object] | None = None
) -> Path:
    """Write `path/` = config.json + coefficients.safetensors, atomically. `run` records where the
    composer comes from (e.g. its suite), so later commands can rebuild it without being told."""
    out = Path(path)
    check_output(out, overwrite=overwrite)
    m = composer.model
    base = m.named_base()
    meta = {
        "format": FORMAT,
        "version": VERSION,
        "composer": composer.config.model_dump(mode="json"),
        "feature_dim": composer.feature_dim,
        "task_names": m.task_names,
        "num_heads": len(composer.heads),
        "blocks": m.blocks.to_json(),
        "tensors": {k: list(base[k].shape) for k in m.keys},
        "task_vector_norms": _norms(composer),
        "history": composer.history,
        "run": run or {},
    }
    with atomic_path(out, overwrite=overwrite, folder=True, marker=False) as tmp:  # config.json marks it
        state = {k: v.detach().cpu().contiguous() for k, v in composer.coef.state_dict().items()}
        save_file(state, str(tmp / "coefficients.safetensors"), metadata={"format": FORMAT})
        (tmp / "config.json").write_text(json.dumps(meta, indent=2))
    return out


def load_composer(
    path: str | os.PathLike[str],
    backbone: nn.Module,
    task_vectors: Sequence[TaskVectorLike],
    heads: Sequence[nn.Module],
    *,
    forward_fn: ForwardFn = default_forward,
    rtol: float = 1e-4,
) -> Composer:
    """A composer saved by `save_composer`, rebuilt on the given backbone, task vectors and heads."""
    path = Path(path)
    meta = read_composer_info(path)
    config = saved_config(meta["composer"])
    composer = build_composer(
        backbone,
        task_vectors,
        heads,
        meta["feature_dim"],
        config,
        forward_fn=forward_fn,
        task_names=meta["task_names"],
        blocks=BlockSpec.from_json(meta["blocks"]),
    )
    m = composer.model
    base = m.named_base()
    saved = meta["tensors"]
    if set(saved) != set(m.keys) or any(list(base[k].shape) != saved[k] for k in m.keys):
        raise KeyMismatchError(
            f"{path}: the backbone/task vectors do not hold the tensors this composer was trained on"
        )
    if len(heads) != meta["num_heads"]:
        raise KeyMismatchError(f"{path}: trained with {meta['num_heads']} heads, got {len(heads)}")
    for i, (a, b) in enumerate(zip(_norms(composer), meta["task_vector_norms"], strict=False)):
        if not math.isclose(a, b, rel_tol=rtol, abs_tol=1e-12):
            raise KeyMismatchError(f"{path}: task vector {i} has norm {a:.6g}, the composer was trained with {b:.6g}")
    try:
        state = load_file(str(path / "coefficients.safetensors"))
    except (SafetensorError, OSError) as e:
        raise ConfigError(f"{path / 'coefficients.safetensors'}: unreadable ({e})") from None
    if set(state) != set(composer.coef.state_dict()):
        raise KeyMismatchError(
            f"{path / 'coefficients.safetensors'}: holds {sorted(state)[:4]}, "
            f"the composer needs {sorted(composer.coef.state_dict())[:4]}"
        )
    ref = next(iter(composer.coef.parameters()))
    composer.coef.load_state_dict({k: v.to(device=ref.device, dtype=ref.dtype) for k, v in state.items()})
    composer.history = list(meta.get("history", []))
    return composer


def read_composer_info(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The checked config.json of a saved composer (no tensors are read): one-line errors when the
    folder, the file or a required entry is missing or corrupt."""
    path = Path(path)
    if not path.is_dir():
        raise ConfigError(f"{path}: no such composer folder")
    try:
        meta = read_json(path / "config.json", max_bytes=64 * 2**20)
    except FileNotFoundError:
        raise ConfigError(f"{path}: not a saved composer (no config.json)") from None
    except (ValueError, CheckpointError) as e:  # JSON syntax, not UTF-8, nested too deep, not a regular file
        raise ConfigError(f"{path / 'config.json'}: corrupt ({e})") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise ConfigError(f"{path}: config.json is not a taskvec composer")
    missing = [
        k
        for k in ("composer", "feature_dim", "task_names", "num_heads", "blocks", "tensors", "task_vector_norms")
        if k not in meta
    ]
    if missing:
        raise ConfigError(f"{path / 'config.json'}: lacks {', '.join(missing)}")
    if not (path / "coefficients.safetensors").is_file():
        raise ConfigError(f"{path}: no coefficients.safetensors")
    try:
        saved_config(meta["composer"])
    except (ValidationError, ConfigError) as e:
        raise ConfigError(f"{path / 'config.json'}: composer: {format_validation_error(e)}") from None
    return meta


def saved_config(options: dict[str, Any]) -> ComposerConfig:
    """The config of a saved composer. Files of earlier versions record every kind's options for
    each kind; those the kind does not have are dropped."""
    kind = COMPOSERS.get(str(options.get("method", "variational")))
    return composer_config({k: v for k, v in options.items() if k in kind.config.model_fields})
