"""Checkpoint input and output: read one tensor at a time, write atomically."""

from taskvec.io.safetensors_file import SafetensorsFile, TensorSpec
from taskvec.io.sources import (
    CheckpointLike,
    DictSource,
    SafetensorsSource,
    ShardedSource,
    Source,
    open_checkpoint,
    read,
)
from taskvec.io.writer import CheckpointWriter, parse_size, plan_shards

__all__ = [
    "CheckpointLike",
    "CheckpointWriter",
    "DictSource",
    "SafetensorsFile",
    "SafetensorsSource",
    "ShardedSource",
    "Source",
    "TensorSpec",
    "open_checkpoint",
    "parse_size",
    "plan_shards",
    "read",
]
