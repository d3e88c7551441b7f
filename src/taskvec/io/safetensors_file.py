"""Read and write safetensors files one tensor (or one slice of a tensor) at a time.

The format is an 8-byte little-endian header length, a JSON header and raw row-major data.
We parse the header ourselves so that a read is a single positioned `readinto` of the bytes
asked for: no memory map stays resident, and a slice of a huge tensor costs only its own bytes.
Files are still written and checked by the `safetensors` library's format (see tests).
"""

from __future__ import annotations

import contextlib
import json
import os
import struct
import threading
from dataclasses import dataclass
from pathlib import Path

import torch

from taskvec.errors import CheckpointError, DtypeError
from taskvec.io.readers import check_regular, note_input, parse_json

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
    return dtype.itemsize


def _no_duplicates(pairs: list[tuple[str, object]]) -> dict[str, object]:
    out: dict[str, object] = {}
    for k, v in pairs:
        if k in out:
            raise _Corrupt(f"name {k!r} appears twice")
        out[k] = v
    return out


def _no_constant(name: str) -> object:
    raise _Corrupt(f"{name} is not valid JSON")


class _Corrupt(ValueError):
    """A header rule is broken; read_header turns it into a CheckpointError naming the file."""


class _Truncated(_Corrupt):
    """The data section is shorter than the header says."""


def _is_uint(x: object) -> bool:
    return type(x) is int and x >= 0


def validate_header(header: object, data_size: int) -> tuple[dict[str, dict], dict[str, str]]:
    """(tensor entries, metadata) of a parsed header, checked by the rules the `safetensors` library
    applies: a JSON object of objects with a known `dtype`, a `shape` of integers >= 0 and two
    integer `data_offsets`; entries laid out back to back from byte 0 in offset order, each exactly
    prod(shape) x dtype size bytes, ending exactly at the end of the data section; `__metadata__`
    a map of strings to strings. Raises `_Corrupt` (or `DtypeError` for a dtype taskvec cannot use)."""
    if not isinstance(header, dict):
        raise _Corrupt(f"header is a JSON {type(header).__name__}, not an object")
    meta = header.get("__metadata__")
    if meta is None:
        meta = {}
    elif not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
        raise _Corrupt("__metadata__ must map strings to strings")
    entries: dict[str, dict] = {}
    for key, e in header.items():
        if key == "__metadata__":
            continue
        if not isinstance(e, dict):
            raise _Corrupt(f"tensor {key!r}: entry is a JSON {type(e).__name__}, not an object")
        for field in ("dtype", "shape", "data_offsets"):
            if field not in e:
                raise _Corrupt(f"tensor {key!r}: no {field!r}")
        dtype, shape, offsets = e["dtype"], e["shape"], e["data_offsets"]
        if not isinstance(dtype, str):
            raise _Corrupt(f"tensor {key!r}: dtype {dtype!r} is not a string")
        if not isinstance(shape, list) or not all(_is_uint(d) for d in shape):
            raise _Corrupt(f"tensor {key!r}: shape {shape!r} is not a list of integers >= 0")
        if not isinstance(offsets, list) or len(offsets) != 2 or not all(_is_uint(o) for o in offsets):
            raise _Corrupt(f"tensor {key!r}: data_offsets {offsets!r} is not two integers >= 0")
        if dtype not in ST_DTYPES:
            raise DtypeError(f"tensor {key!r} has unsupported dtype {dtype!r}")
        entries[key] = e
    pos = 0
    for key, e in sorted(entries.items(), key=lambda kv: tuple(kv[1]["data_offsets"])):
        s, end = e["data_offsets"]
        if end < s:
            raise _Corrupt(f"tensor {key!r}: data_offsets {[s, end]} end before they start")
        if s != pos:
            how = "overlap the previous tensor's bytes" if s < pos else "leave a gap after the previous tensor"
            raise _Corrupt(
                f"tensor {key!r}: data_offsets {[s, end]} {how} "
                f"(tensors must lie back to back; the previous ends at byte {pos})"
            )
        n = 1
        for d in e["shape"]:
            n *= d
        want = n * dtype_size(ST_DTYPES[e["dtype"]])
        if end - s != want:
            raise _Corrupt(
                f"tensor {key!r}: data_offsets span {end - s} bytes, shape {e['shape']} of {e['dtype']} needs {want}"
            )
        pos = end
    if pos > data_size:
        raise _Truncated(f"truncated safetensors file: tensors need {pos} bytes of data, the file holds {data_size}")
    if pos != data_size:
        raise _Corrupt(f"tensors cover {pos} bytes of data but the file holds {data_size}")
    return entries, dict(meta)


def read_header(path: Path) -> tuple[dict[str, dict], dict[str, str], int]:
    """Return (tensor entries, metadata, offset of the data section), checking the header as strictly
    as the `safetensors` library does (see `validate_header`) and that the file is whole."""
    try:
        check_regular(path)
        note_input(path)
        size = path.stat().st_size
        with open(path, "rb") as f:
            raw = f.read(8)
            if len(raw) < 8:
                raise CheckpointError(f"{path}: truncated safetensors file (no header length)")
            (n,) = struct.unpack("<Q", raw)
            if n > MAX_HEADER or 8 + n > size:
                raise CheckpointError(
                    f"{path}: truncated or corrupt safetensors header ({n} bytes announced, file is {size})"
                )
            text = f.read(n)
        header = parse_json(text, max_bytes=MAX_HEADER, object_pairs_hook=_no_duplicates, parse_constant=_no_constant)
        entries, meta = validate_header(header, size - 8 - n)
    except FileNotFoundError:
        raise CheckpointError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise CheckpointError(f"{path}: is a folder, not a safetensors file") from None
    except _Truncated as e:
        raise CheckpointError(f"{path}: {e}") from None
    except _Corrupt as e:
        raise CheckpointError(f"{path}: corrupt safetensors header: {e}") from None
    except ValueError as e:  # JSON syntax, not UTF-8, nested too deep
        raise CheckpointError(f"{path}: corrupt safetensors header: {e}") from None
    except DtypeError as e:
        raise DtypeError(f"{path}: {e}") from None
    return entries, meta, 8 + n


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
        view = memoryview(buf.numpy()).cast("B")  # type: ignore[arg-type]  # numpy stubs: ndarray is a buffer
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
        with contextlib.suppress(Exception):
            self.close()


def encode_header(specs: dict[str, TensorSpec], metadata: dict[str, str] | None = None) -> bytes:
    """Header bytes (length prefix included) for tensors stored back to back in dict order."""
    header: dict[str, object] = {}
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    offset = 0
    for key, spec in specs.items():
        if spec.dtype not in TORCH_TO_ST:
            raise DtypeError(f"tensor {key!r}: dtype {spec.dtype} cannot be stored in safetensors")
        header[key] = {
            "dtype": TORCH_TO_ST[spec.dtype],
            "shape": list(spec.shape),
            "data_offsets": [offset, offset + spec.nbytes],
        }
        offset += spec.nbytes
    body = json.dumps(header, separators=(",", ":")).encode()
    body += b" " * (-len(body) % 8)
    return struct.pack("<Q", len(body)) + body
