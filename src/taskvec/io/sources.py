"""Checkpoint sources: one interface over every way a model's weights are held.

A source lists its tensors, tells each one's shape and dtype, and reads a tensor (or a flat
slice of it) on demand. Nothing is loaded before it is asked for, so a merge holds a few
tensors at a time whatever the size of the model.
"""

from __future__ import annotations

import os
import pickle
import warnings
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Protocol, runtime_checkable

import torch
from torch import nn

from taskvec.errors import CheckpointError, tensor_entry
from taskvec.io.lowrank import is_lowrank, open_lowrank
from taskvec.io.peft import is_adapter_folder, open_lora
from taskvec.io.readers import check_regular, note_input, read_json
from taskvec.io.safetensors_file import SafetensorsFile, TensorSpec

INDEX_NAMES = ("model.safetensors.index.json", "taskvec.safetensors.index.json")


@runtime_checkable
class Source(Protocol):
    """Read-only access to named tensors."""

    name: str

    def keys(self) -> list[str]: ...

    def spec(self, key: str) -> TensorSpec: ...

    def read_flat(self, key: str, start: int = 0, stop: int | None = None) -> torch.Tensor: ...


def read(source: Source, key: str) -> torch.Tensor:
    """The whole tensor `key` of `source`, in its own shape."""
    return source.read_flat(key).reshape(source.spec(key).shape)


def _missing(source: Source, key: str) -> CheckpointError:
    return CheckpointError(f"{source.name}: no tensor named {key!r}")


class SafetensorsSource:
    """A single .safetensors file."""

    def __init__(self, path: str | os.PathLike[str]):
        self.file = SafetensorsFile(path)
        self.name = str(path)
        self.metadata = self.file.metadata

    def keys(self) -> list[str]:
        return self.file.keys()

    def spec(self, key: str) -> TensorSpec:
        try:
            return self.file.spec(key)
        except KeyError:
            raise _missing(self, key) from None

    def read_flat(self, key: str, start: int = 0, stop: int | None = None) -> torch.Tensor:
        self.spec(key)
        return self.file.read_flat(key, start, stop)

    def prefetch(self, key: str, start: int = 0, stop: int | None = None) -> None:
        self.file.prefetch(key, start, stop)


def _weight_map(index: Path) -> dict[str, str]:
    """The index's tensor -> shard file map, checked: names are plain file names in the folder."""
    try:
        data = read_json(index)
    except ValueError as e:  # JSON syntax, not UTF-8, nested too deep
        raise CheckpointError(f"{index}: not a valid safetensors index ({e})") from None
    weight_map = data.get("weight_map") if isinstance(data, dict) else None
    if not isinstance(weight_map, dict):
        raise CheckpointError(
            f"{index}: not a valid safetensors index (no 'weight_map' object of tensor -> shard file)"
        )
    for key, fname in weight_map.items():
        if not isinstance(fname, str) or not fname or Path(fname).name != fname or fname in (".", ".."):
            raise CheckpointError(f"{index}: tensor {key!r} names shard {fname!r}, not a file name in the folder")
    return weight_map


class ShardedSource:
    """A folder of safetensors shards with an index (Hugging Face layout), or a folder of shards alone."""

    def __init__(self, folder: str | os.PathLike[str]):
        self.folder = Path(folder)
        self.name = str(folder)
        index = next((self.folder / n for n in INDEX_NAMES if (self.folder / n).exists()), None)
        files: dict[str, SafetensorsFile] = {}
        self._where: dict[str, SafetensorsFile] = {}
        self.metadata: dict[str, str] = {}
        if index is not None:
            weight_map = _weight_map(index)
            for key, fname in weight_map.items():
                if fname not in files:
                    path = self.folder / fname
                    if not path.is_file():
                        raise CheckpointError(f"{index}: shard {fname} listed for tensor {key!r} is missing")
                    files[fname] = SafetensorsFile(path)
                if key not in files[fname].keys():
                    raise CheckpointError(f"{self.folder / fname}: index says it holds {key!r}, but it does not")
                self._where[key] = files[fname]
            for fname, f in files.items():
                unlisted = [k for k in f.keys() if weight_map.get(k) != fname]
                if unlisted:
                    raise CheckpointError(
                        f"{index}: shard {fname} holds {len(unlisted)} tensor(s) the index does not list for it, "
                        f"e.g. {unlisted[0]!r}; the index is incomplete"
                    )
        else:
            shards = sorted(self.folder.glob("*.safetensors"))
            if not shards:
                raise CheckpointError(f"{self.folder}: no *.safetensors files and no index")
            for path in shards:
                f = SafetensorsFile(path)
                for key in f.keys():
                    if key in self._where:
                        raise CheckpointError(f"{self.folder}: tensor {key!r} is in two shards")
                    self._where[key] = f
        first = next(iter(self._where.values()), None)
        if first is not None:
            self.metadata = dict(first.metadata)

    def keys(self) -> list[str]:
        return list(self._where)

    def _file(self, key: str) -> SafetensorsFile:
        return tensor_entry(self._where, key, self.name)

    def spec(self, key: str) -> TensorSpec:
        return self._file(key).spec(key)

    def read_flat(self, key: str, start: int = 0, stop: int | None = None) -> torch.Tensor:
        return self._file(key).read_flat(key, start, stop)

    def prefetch(self, key: str, start: int = 0, stop: int | None = None) -> None:
        if key in self._where:
            self._where[key].prefetch(key, start, stop)


class DictSource:
    """Tensors already in memory: a state dict, or the parameters and buffers of a module."""

    def __init__(self, tensors: Mapping[str, torch.Tensor], name: str = "<state dict>"):
        self.name = name
        self._t: dict[str, torch.Tensor] = {}
        for k, v in tensors.items():
            if not isinstance(v, torch.Tensor):
                raise CheckpointError(f"{name}: entry {k!r} is a {type(v).__name__}, not a tensor")
            self._t[k] = v.detach()

    def keys(self) -> list[str]:
        return list(self._t)

    def spec(self, key: str) -> TensorSpec:
        t = tensor_entry(self._t, key, self.name)
        return TensorSpec(tuple(t.shape), t.dtype)

    def read_flat(self, key: str, start: int = 0, stop: int | None = None) -> torch.Tensor:
        self.spec(key)
        return self._t[key].reshape(-1)[start:stop]


_WARNED: set[Path] = set()


def _torch_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """The state dict of a `torch.save`d file, unpickling tensors only (weights_only). Zip files
    (torch >= 1.6) are memory-mapped; the legacy format cannot be, so it is read whole into memory."""
    check_regular(path)
    note_input(path)
    legacy = not zipfile.is_zipfile(path)
    try:
        obj = torch.load(path, map_location="cpu", mmap=not legacy, weights_only=True)
    except pickle.UnpicklingError as e:
        what = (
            str(e).split("Unsupported global: ")[-1].split("\n")[0].strip()
            if "Unsupported global" in str(e)
            else "objects"
        )
        raise CheckpointError(
            f"{path}: refused: its pickle holds {what} beyond tensors and plain containers, and loading it "
            "could run code (only weights are unpickled)"
        ) from None
    except Exception as e:  # torch raises many types for a bad file
        raise CheckpointError(
            f"{path}: cannot be read as a torch checkpoint ({type(e).__name__}: {' '.join(str(e).split())})"
        ) from None
    if legacy and path.resolve() not in _WARNED:
        _WARNED.add(path.resolve())
        warnings.warn(f"{path}: legacy (non-zip) torch checkpoint, loaded whole into memory", stacklevel=3)
    if isinstance(obj, Mapping) and "state_dict" in obj and isinstance(obj["state_dict"], Mapping):
        obj = obj["state_dict"]
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"{path}: holds a {type(obj).__name__}, not a state dict")
    return dict(obj)


def _maybe_lowrank(src: SafetensorsSource | ShardedSource) -> Source:
    """A stored low-rank task vector is read through its factors; any other file as it is."""
    return open_lowrank(src) if is_lowrank(src.metadata) else src


CheckpointLike = str | os.PathLike[str] | Mapping[str, torch.Tensor] | nn.Module | Source


def open_checkpoint(x: CheckpointLike) -> Source:
    """Open anything that holds weights as a `Source`.

    Accepts a PEFT LoRA adapter folder (deltas; see `taskvec.io.peft`), a low-rank task vector
    (`taskvec compress`), a .safetensors file, a folder of shards (with or without an index), a `torch.save`d
    state dict (.bin/.pt/.pth: memory-mapped, or read whole in the legacy non-zip format), a dict of tensors,
    an `nn.Module`, or a source.
    """
    if isinstance(x, nn.Module):
        return DictSource(x.state_dict(), name=f"<{type(x).__name__}>")
    if isinstance(x, Mapping):
        return DictSource(x)
    if isinstance(x, Source):
        return x
    path = Path(x)
    if not path.exists():
        raise CheckpointError(f"{path}: no such file or folder")
    check_regular(path)
    if path.is_dir():
        if is_adapter_folder(path):
            return open_lora(path)
        if any((path / n).exists() for n in INDEX_NAMES) or any(path.glob("*.safetensors")):
            return _maybe_lowrank(ShardedSource(path))
        bins = sorted(path.glob("pytorch_model*.bin"))
        if len(bins) == 1:
            return DictSource(_torch_state_dict(bins[0]), name=str(bins[0]))
        raise CheckpointError(f"{path}: folder has no safetensors shards nor a single pytorch_model.bin")
    if path.suffix == ".safetensors":
        return _maybe_lowrank(SafetensorsSource(path))
    if path.suffix in (".bin", ".pt", ".pth", ".ckpt"):
        return DictSource(_torch_state_dict(path), name=str(path))
    raise CheckpointError(f"{path}: unknown checkpoint format (expected .safetensors, a shard folder, .bin/.pt/.pth)")
