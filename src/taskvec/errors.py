"""Errors raised by taskvec. Each names the file, tensor or option at fault."""

from __future__ import annotations


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


def format_validation_error(e: object, option: bool = False) -> str:
    """One line from a pydantic `ValidationError`: 'field.sub: message; ...'.

    `option=True` spells fields as command-line options (`--max-m`)."""
    parts = []
    for err in e.errors():  # type: ignore[attr-defined]
        loc = ".".join(str(p) for p in err["loc"])
        if option:
            loc = "--" + loc.replace("_", "-")
        parts.append(f"{loc or '(top level)'}: {err['msg']}")
    return "; ".join(parts)
