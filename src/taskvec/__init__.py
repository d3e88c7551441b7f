"""taskvec: task vector composition.

Extract task vectors from checkpoints, stream them tensor by tensor, compose them with static
methods, store many as a few bases, and learn sample-specific compositions.
"""

from taskvec.core import Coef, TaskVector
from taskvec.errors import (
    CheckpointError,
    ConfigError,
    DtypeError,
    KeyMismatchError,
    ShapeMismatchError,
    TaskVecError,
    UnknownMethodError,
)
from taskvec.io import open_checkpoint
from taskvec.methods import compose, list_methods

__version__ = "0.1.0"

__all__ = [
    "CheckpointError",
    "Coef",
    "ConfigError",
    "DtypeError",
    "KeyMismatchError",
    "ShapeMismatchError",
    "TaskVecError",
    "TaskVector",
    "UnknownMethodError",
    "compose",
    "list_methods",
    "open_checkpoint",
]
