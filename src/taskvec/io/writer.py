"""Atomic, streaming writer of (sharded) safetensors checkpoints.

Shapes and dtypes are known before any data is computed, so each shard's header is written
first and tensor data is appended slice by slice: memory holds one slice, never a shard.
Everything goes through `atomic_path`: a hidden temporary file or folder beside the output,
locked against other writers and renamed into place only when complete, so an interrupted run
never leaves a half-written output behind and `overwrite` replaces only what taskvec wrote.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable
from contextlib import AbstractContextManager
from pathlib import Path
from types import TracebackType
from typing import BinaryIO

import torch

from taskvec.errors import ConfigError, ShapeMismatchError
from taskvec.io.atomic import atomic_path, check_output
from taskvec.io.safetensors_file import TensorSpec, encode_header

DEFAULT_SHARD_BYTES = 2 * 1024**3


def parse_size(text: str | int) -> int:
    """'2GB', '500MB', '1.5GiB' or a byte count -> bytes."""
    if isinstance(text, int):
        return text
    t = text.strip().upper().replace(" ", "")
    units = {"KIB": 1024, "MIB": 1024**2, "GIB": 1024**3, "KB": 1000, "MB": 1000**2, "GB": 1000**3, "B": 1}
    for u, m in units.items():
        if t.endswith(u):
            try:
                return int(float(t[: -len(u)]) * m)
            except ValueError:
                break
    try:
        return int(t)
    except ValueError:
        raise ConfigError(f"shard_size: cannot read {text!r} as a size (e.g. '2GB', '500MiB')") from None


def plan_shards(specs: dict[str, TensorSpec], max_bytes: int) -> list[list[str]]:
    """Split tensors, in order, into shards of at most `max_bytes` (a larger tensor gets its own)."""
    shards: list[list[str]] = [[]]
    size = 0
    for key, spec in specs.items():
        if shards[-1] and size + spec.nbytes > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append(key)
        size += spec.nbytes
    return shards


class CheckpointWriter:
    """Write tensors in the planned order; `out` is a folder of shards or one `.safetensors` file.

    Use as a context manager: call `write(key, data)` with the slices of each tensor in order;
    on clean exit the output is renamed into place, on error the temporary files are removed.
    `inputs`: files the caller reads, which the output must not be, contain or lie inside.
    `extra_files(tmp)`, if given, adds files to the temporary folder before the rename (e.g. a
    Hugging Face base's config and tokenizer), so the output appears complete or not at all.
    """

    def __init__(
        self,
        out: str | os.PathLike[str],
        specs: dict[str, TensorSpec],
        *,
        max_shard_bytes: int = DEFAULT_SHARD_BYTES,
        metadata: dict[str, str] | None = None,
        overwrite: bool = False,
        index_name: str = "model.safetensors.index.json",
        prefix: str = "model",
        extra_files: Callable[[Path], None] | None = None,
        inputs: Iterable[str | os.PathLike[str] | None] = (),
    ):
        self.out = Path(out)
        self.specs = dict(specs)
        self.metadata = {"format": "pt", "taskvec": "checkpoint", **(metadata or {})}
        self.single_file = self.out.suffix == ".safetensors"
        self.overwrite = overwrite
        self.inputs = list(inputs)
        check_output(self.out, overwrite=overwrite, inputs=self.inputs)
        self.shards = [list(self.specs)] if self.single_file else plan_shards(self.specs, max_shard_bytes)
        n = len(self.shards)
        self.names = (
            [self.out.name]
            if self.single_file
            else [
                f"{prefix}.safetensors" if n == 1 else f"{prefix}-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)
            ]
        )
        self.index_name = index_name
        self._atomic: AbstractContextManager[Path] | None = None
        self.extra_files = extra_files
        self.tmp = self.out.parent / f".{self.out.name}.partial-{os.getpid()}"
        self._order = [k for shard in self.shards for k in shard]
        self._shard_of = {k: i for i, shard in enumerate(self.shards) for k in shard}
        self._pos = 0  # index in _order of the tensor being written
        self._written = 0  # bytes written of that tensor
        self._fh: BinaryIO | None = None  # open file of the current shard
        self._shard = -1

    @property
    def order(self) -> list[str]:
        """Tensor names in the order they must be written."""
        return list(self._order)

    def __enter__(self) -> CheckpointWriter:
        self._atomic = atomic_path(
            self.out, overwrite=self.overwrite, folder=not self.single_file, marker=False, inputs=self.inputs
        )  # the index marks the folder and lists its files
        self.tmp = self._atomic.__enter__()
        self._fh = None
        return self

    def _open_shard(self, i: int) -> None:
        if self._fh is not None:
            self._fh.close()
        path = self.tmp if self.single_file else self.tmp / self.names[i]
        self._fh = open(path, "wb")  # noqa: SIM115  # stays open across write() calls; closed by _close
        self._fh.write(encode_header({k: self.specs[k] for k in self.shards[i]}, self.metadata))
        self._shard = i

    def write(self, key: str, data: torch.Tensor) -> None:
        """Append `data` (a slice, or the whole tensor, in row-major order) to tensor `key`."""
        if self._pos >= len(self._order) or key != self._order[self._pos]:
            expected = self._order[self._pos] if self._pos < len(self._order) else "nothing more"
            raise ValueError(f"writer expected tensor {expected!r}, got {key!r}")
        spec = self.specs[key]
        if data.dtype != spec.dtype:
            data = data.to(spec.dtype)
        if self._shard != self._shard_of[key]:
            self._open_shard(self._shard_of[key])
        raw = data.detach().contiguous().reshape(-1).view(torch.uint8).numpy()
        if self._written + raw.nbytes > spec.nbytes:
            raise ShapeMismatchError(f"tensor {key!r}: more data written than its shape {spec.shape} holds")
        assert self._fh is not None
        self._fh.write(memoryview(raw))  # type: ignore[arg-type]  # numpy stubs: ndarray is a buffer
        self._written += raw.nbytes
        if self._written == spec.nbytes:
            self._pos += 1
            self._written = 0

    def _finish(self) -> None:
        if self._pos != len(self._order):
            raise RuntimeError(f"writer closed before tensor {self._order[self._pos]!r} was complete")
        if self._fh is None and self._order == []:
            self._open_shard(0)
        self._close()  # atomic_path fsyncs every file before the rename
        for i in range(len(self.shards)):  # shards that hold no data still need their header
            path = self.tmp / self.names[i] if not self.single_file else self.tmp
            if not path.exists():
                self._open_shard(i)
                assert self._fh is not None
                self._fh.close()
                self._fh = None
        if not self.single_file:
            if self.extra_files is not None:
                self.extra_files(self.tmp)
            # every file taskvec put in the folder is listed, so that --force can later replace it
            files = {p.relative_to(self.tmp).as_posix() for p in self.tmp.rglob("*") if p.is_file()}
            listed = sorted({*files, self.index_name})
            index = {
                "metadata": {
                    "total_size": sum(s.nbytes for s in self.specs.values()),
                    **self.metadata,
                    "taskvec_files": json.dumps(listed),
                },
                "weight_map": {k: self.names[self._shard_of[k]] for k in self._order},
            }
            (self.tmp / self.index_name).write_text(json.dumps(index, indent=2))

    def __exit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> bool | None:
        """Finish and rename into place (through `atomic_path`), or remove the temporary on error."""
        assert self._atomic is not None
        atomic, self._atomic = self._atomic, None
        try:
            if et is None:
                self._finish()
        except BaseException as err:
            self._close()
            atomic.__exit__(type(err), err, err.__traceback__)
            raise
        self._close()
        return atomic.__exit__(et, e, tb)

    def _close(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None
