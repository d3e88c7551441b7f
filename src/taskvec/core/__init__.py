"""The task vector core: lazy task vectors, coefficients and the streaming plan. Knows no method."""

from taskvec.core.coef import Coef, resolve
from taskvec.core.stream import CHUNK_ELEMS, write_checkpoint
from taskvec.core.taskvector import TaskVector, apply_streaming, check_same_tensors

__all__ = ["CHUNK_ELEMS", "Coef", "TaskVector", "apply_streaming", "check_same_tensors", "resolve", "write_checkpoint"]
