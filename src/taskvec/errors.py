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
