"""Errors raised by taskvec. Each names the file, tensor or option at fault."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TypeVar

V = TypeVar("V")


class TaskVecError(Exception):
    """Base class of every error taskvec raises on bad input."""


class CheckpointError(TaskVecError):
    """A checkpoint cannot be read: missing, truncated, or of an unknown format."""


class KeyMismatchError(TaskVecError):
    """Two checkpoints or task vectors do not hold the same tensors."""


class ShapeMismatchError(TaskVecError):
    """A tensor has different shapes in two checkpoints."""


class NonFiniteError(CheckpointError):
    """Weights, a task vector or composition coefficients hold NaN or infinite values."""


class DtypeError(TaskVecError):
    """A tensor has a dtype that cannot take part in task vector arithmetic."""


class ConfigError(TaskVecError):
    """A configuration value or option is invalid."""


class UnknownMethodError(ConfigError):
    """A merge method name is not in the registry."""


class OutputError(TaskVecError, OSError):
    """An output cannot be written: the folder is read-only, the disk is full, a parent is a file.

    Also an `OSError`, so code that handles file system errors keeps handling it."""


class OutputBusyError(OutputError):
    """Another taskvec process is writing the same output or bank right now."""


class IntegrityError(CheckpointError):
    """A file no longer holds what was recorded when it was written (checksum, size or dtype differ)."""


def tensor_entry(table: Mapping[str, V], key: str, source: str) -> V:
    """`table[key]` from a checkpoint's table of tensors; a missing key is a CheckpointError naming
    the checkpoint `source` and the tensor."""
    try:
        return table[key]
    except KeyError:
        raise CheckpointError(f"{source}: no tensor named {key!r}") from None


_TYPE_TAGS = {"float", "int", "str", "bool", "none", "dict", "list"}


def _is_union_tag(x: object) -> bool:
    return isinstance(x, str) and (x in _TYPE_TAGS or "[" in x)


def format_validation_error(e: object, option: bool = False) -> str:
    """One line from a pydantic `ValidationError`: 'field.sub: message; ...'.

    For a value that may take several types (`float | dict[str, float]`), only the branch whose
    complaint is about the value itself is kept ("should be a finite number", not also "should be
    a valid dictionary"). `option=True` spells fields as command-line options (`--max-m`)."""
    groups: dict[tuple, list[dict]] = {}
    for err in e.errors():  # type: ignore[attr-defined]
        loc = tuple(err["loc"])
        cut = next((i for i, x in enumerate(loc) if _is_union_tag(x)), len(loc))
        groups.setdefault(loc[:cut], []).append(err)
    parts = []
    for group in groups.values():
        for err in [g for g in group if not str(g["type"]).endswith("_type")] or group:
            field = ".".join(str(x) for x in err["loc"] if not _is_union_tag(x))
            if option:
                field = "--" + field.replace("_", "-")
            parts.append(f"{field or '(top level)'}: {str(err['msg']).removeprefix('Value error, ')}")
    return "; ".join(dict.fromkeys(parts))
