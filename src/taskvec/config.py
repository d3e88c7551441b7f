"""Pydantic models of the YAML configs. A bad key or value gets an error naming it and the file."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar, overload

import torch
import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from taskvec.errors import ConfigError, TaskVecError, format_validation_error
from taskvec.io.readers import read_text
from taskvec.io.writer import parse_size
from taskvec.methods.registry import get_method, parse_params

FLOAT32_MAX = float(torch.finfo(torch.float32).max)


def _not_bool(v: object) -> object:
    if isinstance(v, bool):
        raise ValueError(f"{str(v).lower()} is a boolean, not a number")
    return v


def _float32_range(v: float) -> float:
    if abs(v) > FLOAT32_MAX:
        raise ValueError(f"{v:g} is beyond the float32 range (|x| <= {FLOAT32_MAX:.4g})")
    return v


Number = Annotated[float, BeforeValidator(_not_bool), AfterValidator(_float32_range)]
"""A float config value: booleans are refused (YAML `true` is not 1), and so is a magnitude
beyond float32 (the weights are float32: it could only write infinities)."""

DTYPES: dict[str, torch.dtype] = {
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float32": torch.float32,
    "float64": torch.float64,
}
DtypeName = Literal["float16", "bfloat16", "float32", "float64"]
M = TypeVar("M", bound=BaseModel)


class Strict(BaseModel):
    """Base of every config model: unknown keys are errors, and so are NaN and infinite numbers
    (anywhere: scalars, per-layer maps, nested options)."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


@overload
def dtype_named(name: str, option: str = ...) -> torch.dtype: ...
@overload
def dtype_named(name: None, option: str = ...) -> None: ...
@overload
def dtype_named(name: str | None, option: str = ...) -> torch.dtype | None: ...
def dtype_named(name: str | None, option: str = "--dtype") -> torch.dtype | None:
    """The torch dtype of a name in DTYPES (None stays None: keep the input's); `option` names the
    setting in the error."""
    if name is None:
        return None
    if name not in DTYPES:
        raise ConfigError(f"{option}: unknown dtype {name!r}; choose one of {', '.join(DTYPES)}")
    return DTYPES[name]


def positive_size(text: str | int, what: str = "shard_size") -> int:
    """A size like '2GB' or a byte count, which must be a positive, finite number of bytes."""
    try:
        n = parse_size(text)
    except (OverflowError, ValueError):
        raise ConfigError(f"{what}: {text!r} is not a finite size (e.g. '2GB', '500MiB')") from None
    except ConfigError:
        raise ConfigError(f"{what}: cannot read {text!r} as a size (e.g. '2GB', '500MiB')") from None
    if n <= 0:
        raise ConfigError(f"{what}: must be a positive size, got {text!r}")
    return n


class TaskSource(Strict):
    """One task: a fine-tuned checkpoint (tau = finetuned - base), a saved task vector or a PEFT LoRA adapter."""

    finetuned: str | None = None
    task_vector: str | None = None
    lora: str | None = None
    name: str | None = None

    @model_validator(mode="after")
    def _one_source(self) -> TaskSource:
        if sum(x is not None for x in (self.finetuned, self.task_vector, self.lora)) != 1:
            raise ValueError("give exactly one of 'finetuned', 'task_vector' or 'lora'")
        return self


class ModelEntry(TaskSource):
    """A task of a merge, with its coefficient."""

    weight: Number | dict[str, Number] = Field(1.0, description="coefficient, or a {glob: coefficient} per-layer map")


class MergeConfig(Strict):
    """`taskvec merge` config: theta = base + scale * method(tau_1..tau_T; weights, params)."""

    method: str = "task_arithmetic"
    base: str
    models: list[ModelEntry] = Field(min_length=1)
    params: dict[str, Any] = Field(default_factory=dict)
    scale: Number | dict[str, Number] = 1.0
    dtype: DtypeName | None = Field(None, description="output dtype of floating tensors (default: the base's)")
    shard_size: str | int = "2GB"
    include: list[str] | None = None
    exclude: list[str] = Field(default_factory=list, description="tensors copied from the base unchanged")

    @field_validator("method")
    @classmethod
    def _known_method(cls, v: str) -> str:
        get_method(v)
        return v

    @field_validator("shard_size")
    @classmethod
    def _size(cls, v: str | int) -> str | int:
        try:
            positive_size(v)
        except ConfigError as e:
            raise ValueError(str(e).removeprefix("shard_size: ")) from None
        return v

    @model_validator(mode="after")
    def _params(self) -> MergeConfig:
        parse_params(get_method(self.method), self.params)
        return self

    def resolve_paths(self, root: Path) -> MergeConfig:
        """Paths in the config are relative to the config file's folder."""

        def fix(p: str | None) -> str | None:
            return None if p is None else str((root / p) if not Path(p).is_absolute() else Path(p))

        models = [
            m.model_copy(update={"finetuned": fix(m.finetuned), "task_vector": fix(m.task_vector), "lora": fix(m.lora)})
            for m in self.models
        ]
        return self.model_copy(update={"base": fix(self.base), "models": models})


class _UniqueKeyLoader(yaml.SafeLoader):
    """YAML's safe loader, refusing a key given twice in one mapping (YAML would keep the last)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: dict[object, yaml.Node] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            try:
                first = seen.get(key)
            except TypeError:  # an unhashable key: the base loader reports it
                continue
            if first is not None:
                raise yaml.constructor.ConstructorError(
                    None,
                    None,
                    f"key {key!r} appears twice (first on line {first.start_mark.line + 1})",
                    key_node.start_mark,
                )
            seen[key] = key_node
        return super().construct_mapping(node, deep=deep)


def load_yaml(path: str | Path) -> Any:
    """The YAML file `path` parsed safely: UTF-8 text of a regular file, no key twice in a mapping.
    Every problem is a ConfigError naming the file."""
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"{path}: no such config file")
    try:
        text = read_text(path, max_bytes=16 * 2**20)
    except TaskVecError as e:
        raise ConfigError(str(e)) from None
    try:
        return yaml.load(text, Loader=_UniqueKeyLoader)  # noqa: S506  # a SafeLoader subclass
    except yaml.MarkedYAMLError as e:
        where = f" on line {e.problem_mark.line + 1}" if e.problem_mark is not None else ""
        raise ConfigError(f"{path}: not valid YAML ({e.problem or e.context}{where})") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML ({' '.join(str(e).split())})") from None
    except RecursionError:
        raise ConfigError(f"{path}: not valid YAML (nested too deeply)") from None


def load_yaml_config(path: str | Path, model: type[BaseModel]) -> Any:
    """The config `model` read from the YAML file `path` (see `load_yaml`), its paths made
    relative to the file's folder."""
    path = Path(path)
    data = load_yaml(path)
    cfg = model_from(data, model, ConfigError, str(path), "a mapping at the top level")
    return cfg.resolve_paths(path.parent) if hasattr(cfg, "resolve_paths") else cfg


def model_from(data: object, model: type[M], error: type[TaskVecError], where: str, expected: str) -> M:
    """`model(**data)` for the parsed top level of a file. Every complaint is an `error` that starts
    with `where` (the file, and what is wrong with it): `expected` names what the top level must be."""
    if not isinstance(data, dict):
        raise error(f"{where}: expected {expected}")
    try:
        return model(**data)
    except ValidationError as e:
        raise error(f"{where}: {format_validation_error(e)}") from None
    except error as e:
        raise error(f"{where}: {e}") from None


def known_name(value: str, names: Iterable[str], what: str) -> str:
    """`value` when it is one of `names`, else a ValueError listing them (for field validators)."""
    names = list(names)
    if value not in names:
        raise ValueError(f"unknown {what} {value!r}; known: {', '.join(names)}")
    return value


def load_merge_config(path: str | Path) -> MergeConfig:
    return load_yaml_config(path, MergeConfig)
