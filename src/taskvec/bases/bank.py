"""A bank of task vector bases on disk: M safetensors files and one JSON manifest.

Layout of a bank folder::

    BANK/manifest.json            method, names, T, M, Gram matrix, decoder, mixing or assignments, bytes
    BANK/basis-000.safetensors    basis 0: same tensor names and shapes as the task vectors
    BANK/basis-001.safetensors    (a basis larger than `shard_size` is a shard folder basis-001/)

One file per basis rather than one file of 'basis{m}/{tensor}' keys: every basis is an ordinary
task-vector checkpoint (`TaskVector.load`, `taskvec apply` and `taskvec info` work on it), a
reconstruction opens only the bases it needs, and a continual `add` rewrites one basis and the
manifest instead of the whole bank. The manifest is the commit point: a build writes everything
into a hidden temporary folder renamed into place; an `add` writes the new basis under a new
name, then atomically replaces the manifest, then deletes the old file.

The manifest records the sha256 and byte size of every basis file; a basis is checked against
them the first time a process reads it, so a flipped byte, a replaced or swapped file is refused
instead of composing wrong weights. Every file name in the manifest must lie inside the bank.

The manifest also records a digest of each task's source file (`source_digest`): a later `add`
that re-merges a basis from those files refuses one that changed since, instead of silently
turning the bank's task into another one. Before an `add` writes a new basis file it records the
name in `.taskvec-pending.json`; only names recorded there are removed as leftovers of an
interrupted `add`, never other files a user keeps in the bank folder.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import shutil
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, Literal, cast

import torch
from pydantic import Field, field_validator, model_validator

from taskvec.bases.analysis import auto_chunk, gram
from taskvec.bases.fit import (
    FIT_OPTIONS,
    BasisFit,
    check_m,
    check_merge,
    check_method,
    check_names,
    fit_structure,
    lsq,
    relative_errors,
    set_cluster_stats,
)
from taskvec.bases.passes import cluster_pass, linear_pass, merged_basis, tapped
from taskvec.config import DTYPES, DtypeName, Strict, model_from
from taskvec.core.taskvector import FloatSource, TaskVector, check_same_tensors
from taskvec.errors import CheckpointError, ConfigError, IntegrityError, TaskVecError
from taskvec.io import SafetensorsSource, ShardedSource
from taskvec.io.atomic import PENDING, atomic_path, check_output, path_lock, write_text_atomic
from taskvec.io.readers import read_json
from taskvec.io.safetensors_file import dtype_size
from taskvec.io.writer import DEFAULT_SHARD_BYTES

BANK_FORMAT: Final = "taskvec/bases-bank"
MANIFEST = "manifest.json"
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}
Matrix = list[list[float | None]]


# ---------------------------------------------------------------- manifest
class BasisEntry(Strict):
    file: str
    bytes: int = Field(ge=0, description="size on disk: the file, or every file of a shard folder")
    members: list[str] | None = None
    sha256: str | None = Field(
        default=None, description="sha256 of the file (of a shard folder: of its files' names and sha256s)"
    )

    @field_validator("file")
    @classmethod
    def _inside_bank(cls, v: str) -> str:
        if not v or v.startswith("/") or "\\" in v or any(part in ("", ".", "..") for part in v.split("/")):
            raise ValueError(f"{v!r} is not a plain file name inside the bank")
        return v


BankMethod = Literal["cluster", "learned", "pca"]


class Manifest(Strict):
    """The bank's JSON manifest. Matrices are row lists; null marks an unknown inner product."""

    format: Literal["taskvec/bases-bank"]
    version: Literal[1]
    method: BankMethod
    dtype: DtypeName
    shard_size: int = Field(gt=0)
    T: int = Field(ge=1, description="number of tasks")
    M: int = Field(ge=1, description="number of bases")
    n_tensors: int = Field(ge=0)
    numel: int = Field(ge=0)
    names: list[str]
    sources: list[str | None]
    source_digests: list[str | None] | None = Field(
        default=None, description="digest of each source when recorded (`source_digest`); absent in older banks"
    )
    task_bytes: list[int]
    bases: list[BasisEntry] = Field(min_length=1)
    gram: Matrix
    cross: Matrix
    basis_gram: Matrix
    decoder: list[list[float]]
    mixing: list[list[float]] | None = None
    assignments: list[int] | None = None
    merge: str | None = None
    merge_params: dict[str, Any] = Field(default_factory=dict)
    info: dict[str, Any] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _consistent(self) -> Manifest:
        t, m = len(self.names), len(self.bases)
        if (t, m) != (self.T, self.M):
            raise ValueError(f"T={self.T}, M={self.M} but the manifest lists {t} names and {m} bases")

        def shape(field: str, rows: int, cols: int) -> None:
            mat = getattr(self, field)
            if len(mat) != rows or any(len(r) != cols for r in mat):
                raise ValueError(f"{field} must be {rows} x {cols} (T={t} tasks, M={m} bases)")

        if len(set(self.names)) != t:
            raise ValueError("names must be unique")
        for f in ("sources", "task_bytes", "source_digests"):
            if getattr(self, f) is not None and len(getattr(self, f)) != t:
                raise ValueError(f"{f} must have one entry per task (T={t})")
        shape("gram", t, t)
        shape("cross", m, t)
        shape("basis_gram", m, m)
        shape("decoder", m, t)
        if self.method == "cluster":
            if self.assignments is None or len(self.assignments) != t or any(not 0 <= a < m for a in self.assignments):
                raise ValueError(f"assignments must give each of the T={t} tasks a basis in 0..{m - 1}")
        elif self.mixing is None or any(len(r) != m for r in self.mixing) or len(self.mixing) > t:
            raise ValueError(f"mixing must be a (tasks at build) x M={m} matrix")
        return self


def _mat(x: torch.Tensor) -> Matrix:
    return [[None if math.isnan(v) else v for v in row] for row in x.tolist()]


def _tensor(rows: Sequence[Sequence[float | None]], cols: int | None = None) -> torch.Tensor:
    if not rows:
        return torch.zeros(0, cols or 0, dtype=torch.float64)
    return torch.tensor([[float("nan") if v is None else float(v) for v in r] for r in rows], dtype=torch.float64)


def manifest_text(obj: dict[str, Any]) -> str:
    """Top-level keys one per line (readable), values compact."""
    return "{\n" + ",\n".join(f"  {json.dumps(k)}: {json.dumps(v, allow_nan=False)}" for k, v in obj.items()) + "\n}\n"


# ---------------------------------------------------------------- integrity
_VERIFIED: set[tuple[str, tuple[tuple[str, int, int, int], ...]]] = set()
_BASIS_NAME = re.compile(r"^basis-\d{3}(\.r\d+)?(\.safetensors)?$")


def _files(path: Path) -> list[Path]:
    return [path] if not path.is_dir() else sorted(p for p in path.rglob("*") if p.is_file())


def file_digest(path: Path) -> str:
    """sha256 of a file; of a folder, sha256 of its files' relative names and sha256s."""
    if not path.is_dir():
        with open(path, "rb") as f:
            return hashlib.file_digest(f, "sha256").hexdigest()
    h = hashlib.sha256()
    for p in _files(path):
        h.update(f"{p.relative_to(path).as_posix()}\0{file_digest(p)}\n".encode())
    return h.hexdigest()


SAMPLED_ABOVE = 256 * 2**20  # larger source files are identified by size, mtime and 64 sampled MiB


def _sampled(path: Path, size: int) -> str:
    st = path.stat()
    h = hashlib.sha256(f"{size}:{st.st_mtime_ns}".encode())
    block = 2**20
    with open(path, "rb") as f:
        for i in range(64):
            f.seek((size - block) * i // 63)
            h.update(f.read(block))
    return h.hexdigest()


def source_digest(path: str | os.PathLike[str]) -> str:
    """A digest of a task's source file (or of every file of a shard folder): 'sha256:HEX' of the
    contents, or for files over 256 MiB 'sampled:HEX' of the size, modification time and 64
    evenly spaced 1 MiB blocks (so recording a large source does not read it whole)."""
    p = Path(path)
    files = _files(p)
    sampled = any(f.stat().st_size > SAMPLED_ABOVE for f in files)
    h = hashlib.sha256()
    for f in files:
        size = f.stat().st_size
        part = _sampled(f, size) if sampled and size > SAMPLED_ABOVE else file_digest(f)
        rel = f.relative_to(p).as_posix() if p.is_dir() else ""
        h.update(f"{rel}\0{part}\n".encode())
    return ("sampled:" if sampled else "sha256:") + h.hexdigest()


def _stamp(path: Path) -> tuple[tuple[str, int, int, int], ...]:
    out = []
    for p in _files(path):
        st = p.stat()
        out.append((str(p), st.st_ino, st.st_size, st.st_mtime_ns))
    return tuple(out)


def _check_inside(bank: Path, entry: BasisEntry, mpath: Path) -> Path:
    """The basis path of `entry`, refused unless it and every file in it resolve inside `bank`."""
    root = bank.resolve()
    f = bank / entry.file
    for p in [f, *(f.rglob("*") if f.is_dir() and not f.is_symlink() else [])]:
        r = p.resolve()
        if p.is_symlink() or (r != root and root not in r.parents):
            raise CheckpointError(
                f"{mpath}: corrupt manifest: basis file {entry.file!r} leads outside the bank "
                f"({p} -> {r}); the bank is refused"
            )
    return f


# ---------------------------------------------------------------- sizes and sources
def storage_dtype(tv: TaskVector, key: str) -> torch.dtype:
    """The dtype a task vector's tensor is stored in (fp16 on disk, though computed in float32)."""
    src = tv.source
    if isinstance(src, FloatSource):
        return src.source.spec(key).dtype
    return tv.spec(key).dtype


def task_bytes(tv: TaskVector) -> int:
    """Bytes of the full task vector's tensor data at its storage dtype."""
    return sum(tv.spec(k).numel * dtype_size(storage_dtype(tv, k)) for k in tv.keys())


def source_path(tv: TaskVector) -> str | None:
    """The file or folder a task vector was loaded from (whole, unfiltered), else None."""
    src = tv.source
    if not isinstance(src, FloatSource) or not isinstance(src.source, (SafetensorsSource, ShardedSource)):
        return None
    if set(src.keys()) == set(src.source.keys()):
        return str(Path(src.source.name).resolve())
    return None


def disk_bytes(path: Path) -> int:
    if path.is_dir():
        return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
    return path.stat().st_size


@dataclass(frozen=True)
class Memory:
    """Exact byte accounting: T full task vectors vs the bank on disk."""

    task_vectors: int  # tensor data of the T task vectors at their storage dtype
    bases_data: int  # tensor data of the M bases: M * numel * itemsize
    bases_files: int  # the basis files on disk (data + safetensors headers)
    manifest: int  # manifest.json on disk

    @property
    def bank(self) -> int:
        return self.bases_files + self.manifest

    @property
    def ratio(self) -> float:
        return self.task_vectors / max(self.bank, 1)


# ---------------------------------------------------------------- the bank
class Bank:
    """A bases bank opened from disk. Bases are read lazily; reconstructions are lazy task vectors."""

    def __init__(self, path: Path, manifest: Manifest):
        self.path, self.manifest = path, manifest
        self.decoder = _tensor(manifest.decoder, len(manifest.names))
        self.cross = _tensor(manifest.cross, len(manifest.names))
        self.basis_gram = _tensor(manifest.basis_gram)
        self.gram = _tensor(manifest.gram)
        self.mixing = _tensor(manifest.mixing) if manifest.mixing is not None else None

    # ----- opening
    @classmethod
    def load(cls, path: str | os.PathLike[str], *, unverified: bool = False) -> Bank:
        """Open a bank folder, checking the manifest and that every basis file is there, inside the
        bank, of the recorded size and dtype. File contents are checked when a basis is first read.
        `unverified=True` accepts bases without a recorded sha256 (to record them)."""
        path = Path(path)
        mpath = path / MANIFEST
        if not path.is_dir():
            raise CheckpointError(f"{path}: no such bank folder")
        if not mpath.exists():
            raise CheckpointError(f"{path}: not a bases bank (no {MANIFEST})")
        try:
            data = read_json(mpath, max_bytes=64 * 2**20)
        except ValueError as e:  # JSON syntax, not UTF-8, nested too deep, too large
            raise CheckpointError(f"{mpath}: corrupt manifest, not valid JSON ({e})") from None
        manifest = model_from(data, Manifest, CheckpointError, f"{mpath}: corrupt manifest", "a JSON object")
        bank = cls(path, manifest)
        if len({b.file for b in manifest.bases}) != len(manifest.bases):
            raise CheckpointError(f"{mpath}: corrupt manifest: two bases name the same file")
        for k, entry in enumerate(manifest.bases):
            f = _check_inside(path, entry, mpath)
            if not f.exists():
                raise CheckpointError(f"{mpath}: basis {k} file {entry.file!r} is missing from the bank")
            if entry.sha256 is None and not unverified:
                raise IntegrityError(
                    f"{mpath}: basis {k} ({entry.file}) has no recorded sha256 (a bank written by an "
                    f"older taskvec); if you trust its files, record them with "
                    f"`taskvec bases verify --rehash {path}`"
                )
            size = disk_bytes(f)
            if size != entry.bytes:
                raise IntegrityError(
                    f"{f}: is {size:,} bytes, the manifest recorded {entry.bytes:,}; the bank is corrupt"
                )
            tv = bank.basis(k, verify=False)
            src = tv.source
            numel = sum(src.spec(key).numel for key in src.keys())
            if numel != manifest.numel or len(src.keys()) != manifest.n_tensors:
                raise CheckpointError(
                    f"{f}: holds {len(src.keys())} tensors of {numel:,} parameters, the manifest says "
                    f"{manifest.n_tensors} of {manifest.numel:,}"
                )
            dtypes = {DTYPE_NAMES.get(storage_dtype(tv, key), str(storage_dtype(tv, key))) for key in src.keys()}
            if dtypes - {manifest.dtype}:
                raise IntegrityError(
                    f"{f}: holds {', '.join(sorted(dtypes))} tensors, the manifest says "
                    f"{manifest.dtype}; the bank is corrupt"
                )
        return bank

    def verify_basis(self, k: int, *, force: bool = False) -> None:
        """Check basis `k`'s files against the sha256 in the manifest (once per process unless `force`)."""
        entry = self.manifest.bases[k]
        f = _check_inside(self.path, entry, self.path / MANIFEST)
        key = (str(f.resolve()), _stamp(f))
        if not force and key in _VERIFIED:
            return
        if entry.sha256 is None:
            raise IntegrityError(
                f"{f}: no sha256 recorded in the manifest; run `taskvec bases verify --rehash {self.path}`"
            )
        digest = file_digest(f)
        if digest != entry.sha256:
            raise IntegrityError(
                f"{f}: sha256 {digest[:16]}... does not match the manifest's {entry.sha256[:16]}... "
                f"(basis {k} was changed, replaced or swapped); the bank is corrupt"
            )
        _VERIFIED.add(key)

    def verify(self) -> None:
        """Check every basis file in full against the manifest; raises naming the first bad file."""
        for k in range(self.m):
            self.verify_basis(k, force=True)

    def source_changed(self, i: int) -> str | None:
        """Why task `i`'s recorded source file can no longer be trusted to re-merge it (changed since
        it was recorded, or gone), or None if it is as recorded or nothing was recorded."""
        src = self.manifest.sources[i]
        digests = self.manifest.source_digests
        recorded = digests[i] if digests is not None else None
        if src is None or recorded is None:
            return None
        if not Path(src).exists():
            return f"{src} is gone"
        now = source_digest(src)
        if now != recorded:
            return (
                f"{src} changed since it was recorded (digest {now[-64:][:12]}..., recorded {recorded[-64:][:12]}...)"
            )
        return None

    def changed_sources(self) -> dict[str, str]:
        """Task name -> why its recorded source is no longer as recorded (see `source_changed`)."""
        out = {}
        for i, name in enumerate(self.manifest.names):
            why = self.source_changed(i)
            if why is not None:
                out[name] = why
        return out

    # ----- facts
    @property
    def names(self) -> list[str]:
        return list(self.manifest.names)

    @property
    def method(self) -> str:
        return self.manifest.method

    @property
    def t(self) -> int:
        return len(self.manifest.names)

    @property
    def m(self) -> int:
        return len(self.manifest.bases)

    @property
    def dtype(self) -> torch.dtype:
        return DTYPES[self.manifest.dtype]

    def __repr__(self) -> str:
        return f"Bank({str(self.path)!r}, {self.method}, T={self.t}, M={self.m}, {self.manifest.dtype})"

    def index(self, name: str) -> int:
        try:
            return self.manifest.names.index(name)
        except ValueError:
            known = ", ".join(self.manifest.names[:10]) + (" ..." if self.t > 10 else "")
            raise ConfigError(f"task {name!r} is not in the bank {self.path} (tasks: {known})") from None

    def basis(self, k: int, *, verify: bool = True) -> TaskVector:
        """Basis `k` as a lazy task vector, its file checked against the manifest's sha256 first."""
        if verify:
            self.verify_basis(k)
        tv = TaskVector.load(self.path / self.manifest.bases[k].file)
        tv.name = f"basis {k}"
        return tv

    def relative_errors(self) -> dict[str, float]:
        """||tau_i - reconstruct(i)|| / ||tau_i|| of every task, exact from the stored statistics."""
        errs = relative_errors(self.gram.diagonal(), self.cross, self.basis_gram, self.decoder)
        return dict(zip(self.names, errs.tolist(), strict=False))

    def memory(self) -> Memory:
        mf = self.manifest
        return Memory(
            task_vectors=sum(mf.task_bytes),
            bases_data=self.m * mf.numel * dtype_size(self.dtype),
            bases_files=sum(b.bytes for b in mf.bases),
            manifest=(self.path / MANIFEST).stat().st_size,
        )

    # ----- reconstruction and arithmetic
    def _combination(self, coefs: torch.Tensor, name: str) -> TaskVector:
        ks = [k for k in range(self.m) if float(coefs[k]) != 0.0]
        if not ks:
            raise ConfigError(f"{name}: all its coefficients on the bases are zero")
        tv = TaskVector.sum([self.basis(k) for k in ks], [float(coefs[k]) for k in ks])
        tv.name = name
        return tv

    def reconstruct(self, name: str) -> TaskVector:
        """Task `name` as sum_m decoder[m, i] * basis_m: a lazy task vector reading only its bases."""
        i = self.index(name)
        return self._combination(self.decoder[:, i], f"{name} (from {self.method} bases)")

    def combine(self, add: Sequence[str] = (), negate: Sequence[str] = ()) -> TaskVector:
        """sum of the reconstructions of `add` minus those of `negate`, as one lazy task vector
        (each basis slice is read once, whatever the number of tasks). Apply with `.apply_to(base, coef)`."""
        add, negate = list(add), list(negate)
        if not add and not negate:
            raise ConfigError("combine: give at least one task to --add or --negate")
        both = set(add) & set(negate)
        if both:
            raise ConfigError(f"combine: {', '.join(sorted(both))} both added and negated")
        c = torch.zeros(self.m, dtype=torch.float64)
        for n in add:
            c += self.decoder[:, self.index(n)]
        for n in negate:
            c -= self.decoder[:, self.index(n)]
        label = " ".join([f"+{n}" for n in add] + [f"-{n}" for n in negate])
        return self._combination(c, f"bank {label}")

    def addition(self, names: Sequence[str]) -> TaskVector:
        """Task addition of `names` through their reconstructions."""
        return self.combine(add=names)

    def negation(self, name: str) -> TaskVector:
        """Negation (forgetting) of one task through its reconstruction."""
        return self.combine(negate=[name])

    # ----- continual
    def _new_file(self, k: int) -> str:
        big = self.manifest.numel * dtype_size(self.dtype) > self.manifest.shard_size
        for r in range(1, 1 << 20):
            f = basis_file(k, big, r if k < self.m else 0)
            if not (self.path / f).exists():
                return f
        raise RuntimeError("no free basis file name")  # pragma: no cover

    def add(
        self,
        task_vector: TaskVector,
        name: str,
        *,
        members: Mapping[str, TaskVector] | None = None,
        new_basis_below: float | None = None,
        chunk_elems: int | None = None,
        progress: bool = False,
        allow_changed_sources: bool = False,
    ) -> int | None:
        """Add one task vector to the bank; returns the basis it went to ('cluster'), else None.

        'cluster': it joins the basis of highest cosine similarity (or a new basis of its own if
        that is below `new_basis_below`), and that basis is re-merged from its members and the new
        task. The members' task vectors come from `members` (name -> TaskVector) or from the files
        recorded at build time. 'learned'/'pca': the bases stay, the new task gets least-squares
        coefficients on them. Everything it needs of the old tasks is streamed, then the manifest is
        replaced atomically. The bank is locked meanwhile: a second writer fails at once.

        A member's recorded source file that changed since it was recorded is refused (re-merging it
        would silently change that task) unless `allow_changed_sources`, which re-merges it as it is
        now and records its new digest. If anything fails, the bank is left as it was.
        """
        with path_lock(self.path, "changed"):
            fresh = Bank.load(self.path)  # what another process committed before we took the lock
            self.__dict__.update(fresh.__dict__)
            self._remove_orphans()
            return self._add(
                task_vector,
                name,
                members=members,
                new_basis_below=new_basis_below,
                chunk_elems=chunk_elems,
                progress=progress,
                allow_changed=allow_changed_sources,
            )

    def _remove_orphans(self) -> None:
        """Remove the basis files an interrupted `add` recorded (in `.taskvec-pending.json`) that the
        manifest does not name; any other file in the bank folder is the user's and stays."""
        pending = self.path / PENDING
        if not (pending.exists() or pending.is_symlink()):
            return
        try:
            data = read_json(pending, max_bytes=2**20)
        except (OSError, ValueError, CheckpointError):
            data = None
        files = data.get("files") if isinstance(data, dict) else None
        named = {b.file for b in self.manifest.bases}
        for f in files if isinstance(files, list) else []:
            if isinstance(f, str) and _BASIS_NAME.match(f) and f not in named and (self.path / f).exists():
                _delete_inside(self.path, f)
        pending.unlink(missing_ok=True)

    def _add(
        self,
        task_vector: TaskVector,
        name: str,
        *,
        members: Mapping[str, TaskVector] | None,
        new_basis_below: float | None,
        chunk_elems: int | None,
        progress: bool,
        allow_changed: bool = False,
    ) -> int | None:
        """Add `task_vector` under `name`; a basis file this add wrote is removed again if it fails
        (see `_undo`)."""
        new_file: list[str] = []  # a basis file this add wrote
        try:
            mf = self.manifest
            digests: list[str | None] = list(mf.source_digests) if mf.source_digests is not None else [None] * self.t
            check_names([*mf.names, name], [task_vector] * (self.t + 1))
            check_same_tensors(self.basis(0).source, task_vector.source)
            if new_basis_below is not None and self.method != "cluster":
                raise ConfigError("new_basis_below: only the 'cluster' method can open a new basis")
            g1 = gram(
                [task_vector] + [self.basis(k) for k in range(self.m)], chunk_elems=chunk_elems, progress=progress
            )
            vv, cnew = float(g1[0, 0]), g1[1:, 0]
            if vv <= 0:
                raise ConfigError(f"task vector {name!r} is zero")
            t, m = self.t, self.m
            gram_ = _pad(self.gram, t + 1, t + 1)
            gram_[t, t] = vv
            cross = _pad(self.cross, m, t + 1)
            cross[:, t] = cnew
            decoder = _pad(self.decoder, m, t + 1, fill=0.0)
            hgram = self.basis_gram.clone()
            bases = [b.model_copy() for b in mf.bases]
            assignments = list(mf.assignments) if mf.assignments is not None else None
            old_file: str | None = None
            if self.method == "cluster":
                assert assignments is not None
                cos = cnew / (hgram.diagonal() * vv).sqrt()
                k = int(torch.argmax(cos))
                if new_basis_below is not None and float(cos[k]) < new_basis_below:
                    k = m
                idx = [i for i, a in enumerate(assignments) if a == k]
                tvs = [self._member(i, members, allow_changed, digests) for i in idx] + [task_vector]
                cluster = [tapped(tv) for tv in tvs]
                basis = merged_basis(cluster, mf.merge or "mean", mf.merge_params)
                f = self._new_file(k)
                write_text_atomic(self.path / PENDING, json.dumps({"files": [f]}) + "\n")
                new_file.append(f)
                chunk = chunk_elems or auto_chunk(len(cluster) + 1)
                h, c, lg = cluster_pass(
                    basis,
                    cluster,
                    self.dtype,
                    chunk_elems=chunk,
                    out=self.path / f,
                    shard_size=mf.shard_size,
                    progress=progress,
                    description=f"re-merging basis {k}",
                )
                idx.append(t)
                assignments.append(k)
                gram_[t, idx[:-1]] = lg[-1, :-1]
                gram_[idx[:-1], t] = lg[-1, :-1]
                if k == m:
                    cross, hgram, decoder = (
                        _pad(cross, m + 1, t + 1),
                        _pad(hgram, m + 1, m + 1),
                        _pad(decoder, m + 1, t + 1, fill=0.0),
                    )
                    bases.append(BasisEntry(file=f, bytes=0))
                else:
                    old_file = bases[k].file
                cross[k, :] = float("nan")
                hgram[k, :] = float("nan")
                hgram[:, k] = float("nan")
                cross[k, idx] = c
                hgram[k, k] = h
                decoder[:, idx] = 0.0
                decoder[k, idx] = c / h
                bases[k] = BasisEntry(
                    file=f,
                    bytes=disk_bytes(self.path / f),
                    members=[*(mf.names[i] for i in idx[:-1]), name],
                    sha256=file_digest(self.path / f),
                )
            else:
                k = None
                decoder[:, t] = lsq(hgram, cnew[:, None])[:, 0]
            info = dict(mf.info)
            info["added"] = [*info.get("added", []), name]
            new = mf.model_copy(
                update={
                    "T": t + 1,
                    "M": len(bases),
                    "names": [*mf.names, name],
                    "sources": [*mf.sources, source_path(task_vector)],
                    "source_digests": [*digests, _digest_of(source_path(task_vector))],
                    "task_bytes": [*mf.task_bytes, task_bytes(task_vector)],
                    "bases": bases,
                    "gram": _mat(gram_),
                    "cross": _mat(cross),
                    "basis_gram": _mat(hgram),
                    "decoder": decoder.tolist(),
                    "assignments": assignments,
                    "info": info,
                }
            )
            Manifest(**new.model_dump())  # validate before committing
            write_text_atomic(self.path / MANIFEST, manifest_text(new.model_dump()))
            (self.path / PENDING).unlink(missing_ok=True)
            if old_file is not None:
                _delete_inside(self.path, old_file)
            loaded = Bank.load(self.path)
            self.__dict__.update(loaded.__dict__)
            return k
        except BaseException:
            self._undo(new_file)
            raise

    def _undo(self, new_file: list[str]) -> None:
        """After a failed `add`: remove the basis file it wrote unless the manifest names it."""
        try:
            committed = {b.file for b in Bank.load(self.path, unverified=True).manifest.bases}
        except (TaskVecError, OSError):
            return  # the manifest is unreadable: touch nothing more (the pending record stays)
        for f in new_file:
            if f not in committed and (self.path / f).exists():
                _delete_inside(self.path, f)
        if not any(f in committed for f in new_file):
            (self.path / PENDING).unlink(missing_ok=True)

    def _member(
        self, i: int, members: Mapping[str, TaskVector] | None, allow_changed: bool, digests: list[str | None]
    ) -> TaskVector:
        name = self.manifest.names[i]
        if members is not None and name in members:
            return members[name]
        src = self.manifest.sources[i]
        if src is None:
            raise ConfigError(
                f"add: re-merging needs the task vector of member {name!r}, which has no recorded source "
                f"file; pass members={{{name!r}: task_vector}}"
            )
        if not Path(src).exists():
            raise CheckpointError(
                f"add: the task vector of member {name!r} recorded at {src} is gone; "
                f"pass members={{{name!r}: task_vector}}"
            )
        why = self.source_changed(i)
        if why is not None:
            if not allow_changed:
                raise IntegrityError(
                    f"add: re-merging basis of task {name!r} needs its source, but {why}; re-merging it would "
                    f"silently change task {name!r}. Put the original back, or pass --allow-changed-sources "
                    "(allow_changed_sources=True) to re-merge it as it is now"
                )
            digests[i] = source_digest(src)
        return TaskVector.load(src)


def _digest_of(src: str | None) -> str | None:
    return source_digest(src) if src is not None else None


def _delete_inside(bank: Path, name: str) -> None:
    """Delete the basis file or folder `name` of `bank`, only if it lies inside the bank."""
    p = _check_inside(bank, BasisEntry(file=name, bytes=0), bank / MANIFEST)
    if p.is_symlink() or not p.is_dir():
        p.unlink(missing_ok=True)
    else:
        shutil.rmtree(p)


def _pad(x: torch.Tensor, rows: int, cols: int, fill: float = float("nan")) -> torch.Tensor:
    out = torch.full((rows, cols), fill, dtype=torch.float64)
    out[: x.shape[0], : x.shape[1]] = x
    return out


def basis_file(k: int, sharded: bool, revision: int = 0) -> str:
    stem = f"basis-{k:03d}" + (f".r{revision}" if revision else "")
    return stem if sharded else f"{stem}.safetensors"


# ---------------------------------------------------------------- building
def build_bank(
    task_vectors: Sequence[TaskVector],
    names: Sequence[str] | None = None,
    method: str = "cluster",
    m: int | None = None,
    *,
    out: str | os.PathLike[str],
    gram_matrix: torch.Tensor | None = None,
    dtype: torch.dtype | str | None = None,
    shard_size: int = DEFAULT_SHARD_BYTES,
    overwrite: bool = False,
    chunk_elems: int | None = None,
    progress: bool = False,
    **options: Any,
) -> Bank:
    """Fit M bases to the task vectors and write them as a bank folder `out`; returns it opened.

    `method`: 'cluster' (spectral clustering on cosine similarity, each cluster merged with
    `merge` = 'mean', 'task_arithmetic', 'ties', ... and `merge_params`), 'learned' (convex bases
    trained on the Gram matrix: `temperature`, `steps`, `lr`, `seed`, `normalize`) or 'pca'.
    `m=None` takes M from the eigengap of the normalized Laplacian (`affinity`, `max_m`).
    `dtype`: the bases' storage dtype (default: the task vectors' storage dtype). Two streamed
    reads of the task vectors: one for the Gram matrix (skipped if `gram_matrix` is given), one
    that computes and writes all bases.
    """
    check_method(method)
    tvs = list(task_vectors)
    names_ = check_names(names, tvs)
    check_m(m, len(tvs))
    unknown = set(options) - FIT_OPTIONS
    if unknown:
        raise ConfigError(
            f"build_bank: unknown option(s) {', '.join(sorted(unknown))}; known: {', '.join(sorted(FIT_OPTIONS))}"
        )
    if method == "cluster":
        check_merge(options.get("merge", "mean"), dict(options.get("merge_params") or {}))
    out = check_output(out, overwrite=overwrite, inputs=[source_path(tv) for tv in tvs])  # before the expensive work
    if isinstance(dtype, str):
        if dtype not in DTYPES:
            raise ConfigError(f"dtype: unknown {dtype!r}; choose one of {', '.join(DTYPES)}")
        dtype = DTYPES[dtype]
    for tv in tvs[1:]:
        check_same_tensors(tvs[0].source, tv.source)
    keys = tvs[0].keys()
    if dtype is None:
        dtype = torch.float16
        for d in {storage_dtype(tv, k) for tv in tvs for k in keys}:
            dtype = torch.promote_types(dtype, d)
    if dtype not in DTYPE_NAMES:
        raise ConfigError(f"dtype: bases cannot be stored as {dtype}; choose one of {', '.join(DTYPES)}")
    g = (
        gram_matrix.to(torch.float64)
        if gram_matrix is not None
        else gram(tvs, chunk_elems=chunk_elems, progress=progress)
    )
    if g.shape != (len(tvs), len(tvs)):
        raise ConfigError(f"gram_matrix: shape {list(g.shape)} does not match {len(tvs)} task vectors")
    fit = fit_structure(g, names_, method, m, **options)
    numel = sum(tvs[0].spec(k).numel for k in keys)
    sharded = numel * dtype_size(dtype) > shard_size
    files = [basis_file(k, sharded) for k in range(fit.m)]
    inputs = [source_path(tv) for tv in tvs]
    with atomic_path(out, overwrite=overwrite, folder=True, marker=False, inputs=inputs) as tmp:
        _write_bases(fit, tvs, tmp, files, dtype, shard_size, chunk_elems, progress)
        manifest = Manifest(
            format=BANK_FORMAT,
            version=1,
            method=cast(BankMethod, method),  # validated by the model
            dtype=cast(DtypeName, DTYPE_NAMES[dtype]),
            shard_size=shard_size,
            T=len(tvs),
            M=fit.m,
            n_tensors=len(keys),
            numel=numel,
            names=names_,
            sources=[source_path(tv) for tv in tvs],
            source_digests=[_digest_of(source_path(tv)) for tv in tvs],
            task_bytes=[task_bytes(tv) for tv in tvs],
            bases=[
                BasisEntry(
                    file=f,
                    bytes=disk_bytes(tmp / f),
                    members=[names_[i] for i in fit.members(k)] if fit.assignments else None,
                    sha256=file_digest(tmp / f),
                )
                for k, f in enumerate(files)
            ],
            gram=_mat(g),
            cross=_mat(fit.cross),
            basis_gram=_mat(fit.basis_gram),
            decoder=fit.decoder.tolist(),
            mixing=fit.mixing.tolist() if fit.mixing is not None else None,
            assignments=fit.assignments,
            merge=fit.merge,
            merge_params=fit.merge_params,
            info=fit.info,
        )
        (tmp / MANIFEST).write_text(manifest_text(manifest.model_dump()))
    return Bank.load(out)


def _write_bases(
    fit: BasisFit,
    tvs: list[TaskVector],
    folder: Path,
    files: list[str],
    dtype: torch.dtype,
    shard_size: int,
    chunk_elems: int | None,
    progress: bool,
) -> None:
    """Compute, write and measure the bases; fills the fit's decoder and statistics."""
    if fit.mixing is None:  # cluster: one basis at a time; the clusters partition the tasks, so each is read once
        for k, f in enumerate(files):
            cluster = [tapped(tvs[i]) for i in fit.members(k)]
            basis = merged_basis(cluster, fit.merge or "mean", fit.merge_params)
            h, c, _ = cluster_pass(
                basis,
                cluster,
                dtype,
                chunk_elems=chunk_elems or auto_chunk(len(cluster) + 1),
                out=folder / f,
                shard_size=shard_size,
                progress=progress,
                description=f"basis {k} ({len(cluster)} tasks)",
            )
            set_cluster_stats(fit, k, h, c)
    else:  # linear: every basis mixes all tasks, so all M are written together in one read of the T task vectors
        cross, hgram = linear_pass(
            tvs,
            fit.mixing,
            dtype,
            chunk_elems=chunk_elems or auto_chunk(len(tvs) + fit.m),
            outs=[folder / f for f in files],
            shard_size=shard_size,
            progress=progress,
        )
        fit.cross, fit.basis_gram = cross, (hgram + hgram.T) / 2
        fit.decoder = lsq(fit.basis_gram, cross)


def verify_bank(path: str | os.PathLike[str], *, rehash: bool = False) -> Bank:
    """Check a bank's manifest and every basis file in full; raises naming the first bad file.

    `rehash=True` instead records the sha256 of the basis files as they are now (for a bank written
    by an older taskvec, without checksums): run it only on a bank you trust.
    """
    path = Path(path)
    if not rehash:
        bank = Bank.load(path)
        bank.verify()
        return bank
    with path_lock(path, "changed"):
        bank = Bank.load(path, unverified=True)
        bases = [b.model_copy(update={"sha256": file_digest(path / b.file)}) for b in bank.manifest.bases]
        new = bank.manifest.model_copy(update={"bases": bases})
        write_text_atomic(path / MANIFEST, manifest_text(new.model_dump()))
    return Bank.load(path)
