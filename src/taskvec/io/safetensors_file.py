"""Read and write safetensors files one tensor (or one slice of a tensor) at a time.

The format is an 8-byte little-endian header length, a JSON header and raw row-major data.
We parse the header ourselves so that a read is a single positioned `readinto` of the bytes
asked for: no memory map stays resident, and a slice of a huge tensor costs only its own bytes.
Files are still written and checked by the `safetensors` library's format (see tests).
"""

from __future__ import annotations

import json
import os
import struct
import threading
from dataclasses import dataclass
from pathlib import Path

import torch

from taskvec.errors import CheckpointError, DtypeError

ST_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}
TORCH_TO_ST: dict[torch.dtype, str] = {v: k for k, v in ST_DTYPES.items()}
MAX_HEADER = 100 * 1024 * 1024


@dataclass(frozen=True)
class TensorSpec:
    """Shape and dtype of one stored tensor."""

    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n

    @property
    def nbytes(self) -> int:
        return self.numel * dtype_size(self.dtype)


def dtype_size(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def read_header(path: Path) -> tuple[dict[str, dict], dict[str, str], int]:
    """Return (tensor entries, metadata, offset of the data section), checking the file is whole."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            raw = f.read(8)
            if len(raw) < 8:
                raise CheckpointError(f"{path}: truncated safetensors file (no header length)")
            (n,) = struct.unpack("<Q", raw)
            if n > MAX_HEADER or 8 + n > size:
                raise CheckpointError(f"{path}: truncated or corrupt safetensors header ({n} bytes announced, file is {size})")
            header = json.loads(f.read(n))
    except FileNotFoundError:
        raise CheckpointError(f"{path}: no such file") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: corrupt safetensors header: {e}") from None
    meta = header.pop("__metadata__", None) or {}
    data_start = 8 + n
    end = max((e["data_offsets"][1] for e in header.values()), default=0)
    if data_start + end > size:
        raise CheckpointError(
            f"{path}: truncated safetensors file: data ends at byte {data_start + end}, file has {size} bytes"
        )
    for key, e in header.items():
        if e.get("dtype") not in ST_DTYPES:
            raise DtypeError(f"{path}: tensor {key!r} has unsupported dtype {e.get('dtype')!r}")
    return header, meta, data_start


class SafetensorsFile:
    """One safetensors file, read tensor by tensor with positioned reads."""

    def __init__(self, path: str | os.PathLike[str]):
        self.path = Path(path)
        self._entries, self.metadata, self._data_start = read_header(self.path)
        self._fd: int | None = None
        self._lock = threading.Lock()
        self._prefetched: tuple[str, int, int | None] | None = None

    def keys(self) -> list[str]:
        return list(self._entries)

    def spec(self, key: str) -> TensorSpec:
        e = self._entries[key]
        return TensorSpec(tuple(e["shape"]), ST_DTYPES[e["dtype"]])

    def _fileno(self) -> int:
        with self._lock:  # slices may be read from several threads
            if self._fd is None:
                self._fd = os.open(self.path, os.O_RDONLY)
            return self._fd

    def read_flat(self, key: str, start: int = 0, stop: int | None = None) -> torch.Tensor:
        """Elements [start, stop) of the flattened tensor, as a new 1-D tensor."""
        spec = self.spec(key)
        stop = spec.numel if stop is None else stop
        item = dtype_size(spec.dtype)
        begin = self._data_start + self._entries[key]["data_offsets"][0] + start * item
        nbytes = (stop - start) * item
        buf = torch.empty(nbytes, dtype=torch.uint8)
        view = memoryview(buf.numpy()).cast("B")
        got = 0
        fd = self._fileno()
        while got < nbytes:
            n = os.preadv(fd, [view[got:]], begin + got)
            if n <= 0:
                raise CheckpointError(f"{self.path}: truncated while reading tensor {key!r}")
            got += n
        return buf.view(spec.dtype)

    def prefetch(self, key: str, start: int = 0, stop: int | None = None) -> None:
        """Ask the operating system to start reading elements [start, stop) into its page cache,
        without waiting: a later `read_flat` of them then finds them in memory."""
        e = self._entries.get(key)
        if e is None or not hasattr(os, "posix_fadvise") or self._prefetched == (key, start, stop):
            return
        self._prefetched = (key, start, stop)  # a base shared by many task vectors is asked many times
        item = dtype_size(ST_DTYPES[e["dtype"]])
        stop = TensorSpec(tuple(e["shape"]), ST_DTYPES[e["dtype"]]).numel if stop is None else stop
        begin = self._data_start + e["data_offsets"][0] + start * item
        os.posix_fadvise(self._fileno(), begin, (stop - start) * item, os.POSIX_FADV_WILLNEED)

    def read(self, key: str) -> torch.Tensor:
        return self.read_flat(key).reshape(self.spec(key).shape)

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:
            pass


def encode_header(specs: dict[str, TensorSpec], metadata: dict[str, str] | None = None) -> bytes:
    """Header bytes (length prefix included) for tensors stored back to back in dict order."""
    header: dict[str, object] = {}
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    offset = 0
    for key, spec in specs.items():
        if spec.dtype not in TORCH_TO_ST:
            raise DtypeError(f"tensor {key!r}: dtype {spec.dtype} cannot be stored in safetensors")
        header[key] = {"dtype": TORCH_TO_ST[spec.dtype], "shape": list(spec.shape), "data_offsets": [offset, offset + spec.nbytes]}
        offset += spec.nbytes
    body = json.dumps(header, separators=(",", ":")).encode()
    body += b" " * (-len(body) % 8)
    return struct.pack("<Q", len(body)) + body
