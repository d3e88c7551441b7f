"""TaskVector: the difference between fine-tuned and pre-trained weights, as a lazy object.

A task vector reads its tensors on demand from the checkpoints it came from. Arithmetic builds
new lazy task vectors, so `0.5 * tv1 - tv2` costs nothing until a tensor is read, applied or
saved, and then only one slice of one tensor at a time is in memory.
"""

from __future__ import annotations

import copy
import math
import os
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import TypedDict, Unpack, overload

import torch
from torch import nn

from taskvec.core.coef import Coef, check_coef_map, check_patterns, matches, resolve
from taskvec.core.similarity import gram_matrix
from taskvec.core.sources import LinearSource, check_same_tensors, compute_dtype, key_list
from taskvec.core.stream import CHUNK_ELEMS, LastSliceCache, prefetch, read_cast, read_into, write_checkpoint
from taskvec.errors import ConfigError, DtypeError, KeyMismatchError, NonFiniteError
from taskvec.io import CheckpointLike, DictSource, Source, TensorSpec, open_checkpoint
from taskvec.io.hf import hf_output_files
from taskvec.io.peft import open_lora
from taskvec.io.writer import DEFAULT_SHARD_BYTES

TASK_VECTOR_FORMAT = "taskvec/task_vector"


class WriteOptions(TypedDict, total=False):
    """Keyword options of `TaskVector.apply_to` for a checkpoint written to `out` (its signature
    has their defaults)."""

    dtype: torch.dtype | None
    shard_size: int
    overwrite: bool
    progress: bool
    allow_nonfinite: bool


ALLOW_HINT = "allow_nonfinite=True (--allow-nonfinite of extract, apply, merge, similarity) uses it anyway"


def all_finite(x: torch.Tensor) -> bool:
    """Whether every entry of floating `x` is finite. A NaN or an infinity makes the sum non-finite,
    and a sum is one fast pass (`isfinite` is several, with a boolean temporary): the exact test
    runs only when the sum is not finite, which finite entries can also cause by overflowing it."""
    if x.element_size() == 1:  # 8-bit floats have no sum of their own
        x = x.float()
    acc = torch.float32 if x.element_size() < 4 else None  # 16-bit floats: accumulate in float32
    return math.isfinite(x.sum(dtype=acc).item()) or bool(torch.isfinite(x).all())


def _nonfinite(x: torch.Tensor, start: int) -> str | None:
    """None if `x` is all finite, else how many entries are not and where the first one is."""
    if all_finite(x):
        return None
    bad = ~torch.isfinite(x)
    if not bool(bad.any()):
        return None
    first = int(bad.nonzero()[0, 0])
    return f"{int(bad.sum())} NaN/infinite values (the first at flat index {start + first}: {float(x[first])})"


def cast_checked(x: torch.Tensor, dtype: torch.dtype, key: str) -> torch.Tensor:
    """`x` in `dtype`; refuse a down-cast that turns finite values into infinities."""
    y = x.to(dtype)
    if y.dtype != x.dtype and y.is_floating_point() and not all_finite(y):
        over = torch.isfinite(x) & ~torch.isfinite(y)
        if bool(over.any()):
            v = float(x[over].abs().max())
            raise DtypeError(
                f"tensor {key!r}: {int(over.sum())} values (largest |x| = {v:g}) overflow "
                f"{str(dtype).removeprefix('torch.')}; store as float32 or bfloat16"
            )
    return y


def check_overflow(x: torch.Tensor, key: str, what: str) -> torch.Tensor:
    """`x`, a result computed from finite inputs; refuse it if it overflowed to infinity (or NaN).
    `what` names the result, e.g. 'base + 1e+38 x task vector'."""
    if all_finite(x):
        return x
    bad = ~torch.isfinite(x)
    raise NonFiniteError(
        f"tensor {key!r}: {int(bad.sum())} values of {what} overflow {str(x.dtype).removeprefix('torch.')} "
        "although every input is finite; lower the coefficients (--coef, scale, weights). "
        "Refused, nothing was written"
    )


BUFFER_NAMES = ("position_ids", "token_type_ids", "num_batches_tracked", "running_mean", "running_var")
"""Last name parts of tensors that are buffers a model computes or counts, not trained weights."""


def is_buffer(key: str, spec: TensorSpec) -> bool:
    """A non-trainable buffer: an integer or boolean tensor, or one named like a known buffer."""
    return not spec.dtype.is_floating_point or key.rsplit(".", 1)[-1] in BUFFER_NAMES


class RenamedSource:
    """A source under other names: `names` maps each new name to the source's own."""

    def __init__(self, source: Source, names: dict[str, str]):
        self.source, self.names = source, names
        self.name = source.name

    def keys(self) -> list[str]:
        return list(self.names)

    def spec(self, key: str) -> TensorSpec:
        if key not in self.names:
            raise KeyMismatchError(f"{self.name}: no tensor named {key!r}")
        return self.source.spec(self.names[key])

    def read_flat(self, key: str, start: int = 0, stop: int | None = None) -> torch.Tensor:
        self.spec(key)
        return self.source.read_flat(self.names[key], start, stop)

    def prefetch(self, key: str, start: int = 0, stop: int | None = None) -> None:
        if key in self.names:
            prefetch(self.source, self.names[key], start, stop)


def _prefix_map(ours: set[str], theirs: set[str]) -> tuple[dict[str, str], str]:
    """Our names -> their names when theirs carry one more leading module than ours (a wrapped
    model's `model.`, a task model's `bert.`): the most common such module, and the map under it."""
    counts: dict[str, int] = {}
    for k in theirs:
        head, dot, rest = k.partition(".")
        if dot and rest in ours:
            counts[head + "."] = counts.get(head + ".", 0) + 1
    if not counts:
        return {}, ""
    prefix = max(counts, key=lambda p: (counts[p], p))
    return {k: prefix + k for k in ours if prefix + k in theirs}, prefix


def align_names(pretrained: Source, finetuned: Source) -> Source:
    """`finetuned` under `pretrained`'s tensor names, as for a suite's `finetuned:` checkpoint: a
    name is found as is, without a leading module the pretrained names carry (a checkpoint saved
    unwrapped), or under one more leading module (`model.` of the bench cache, `bert.` of a task
    model). When the names only match that way, the finetuned tensors outside the match (a
    classifier) are left out with a warning."""
    pk, fk = set(pretrained.keys()), set(finetuned.keys())
    same = len(pk & fk)
    down, down_prefix = _prefix_map(pk, fk)  # finetuned = prefix + pretrained
    up_rev, up_prefix = _prefix_map(fk, pk)  # pretrained = prefix + finetuned
    up = {p: f for f, p in up_rev.items()}
    names, prefix = max(((down, down_prefix), (up, up_prefix)), key=lambda x: len(x[0]))
    if len(names) <= same:
        return finetuned
    if up is names:
        names.update({k: k for k in pk & fk if k not in names})
    left = sorted(fk - set(names.values()))
    if left:
        warnings.warn(
            f"{finetuned.name}: names matched to {pretrained.name}'s through the leading {prefix!r}; "
            f"{len(left)} other tensors left out ({key_list(left, 3)})",
            stacklevel=3,
        )
    return RenamedSource(finetuned, names)


class DiffSource:
    """finetuned - pretrained, over the floating tensors both hold, computed in at least float32.

    The finetuned names are matched to the pretrained ones (`align_names`); a non-trainable buffer
    (`is_buffer`: position ids, BatchNorm statistics and counters) that only one side holds is
    skipped with a warning."""

    def __init__(
        self,
        pretrained: Source,
        finetuned: Source,
        include: list[str] | None,
        exclude: list[str] | None,
        dtype: torch.dtype | None = None,
        allow_nonfinite: bool = False,
    ):
        finetuned = align_names(pretrained, finetuned)
        self.pretrained, self.finetuned = pretrained, finetuned
        self.allow_nonfinite = allow_nonfinite
        self.name = f"{finetuned.name} - {pretrained.name}"
        pk, fk = set(pretrained.keys()), set(finetuned.keys())
        check_patterns(
            [*pretrained.keys(), *(k for k in finetuned.keys() if k not in pk)], include, exclude, pretrained.name
        )
        wanted = [k for k in pretrained.keys() if matches(k, include, exclude)]
        wanted += [k for k in finetuned.keys() if k not in pk and matches(k, include, exclude)]
        one_side = [
            k for k in wanted if (k in pk) != (k in fk) and is_buffer(k, (pretrained if k in pk else finetuned).spec(k))
        ]
        if one_side:
            warnings.warn(
                f"skipped {len(one_side)} buffers that only one of {pretrained.name} and {finetuned.name} "
                f"holds ({key_list(one_side, 3)}): they are computed or counted, not trained",
                stacklevel=3,
            )
            wanted = [k for k in wanted if k not in set(one_side)]
        check_same_tensors(pretrained, finetuned, wanted)
        self._keys: list[str] = []
        self._dtype: dict[str, torch.dtype] = {}
        for k in wanted:
            dp, df = pretrained.spec(k).dtype, finetuned.spec(k).dtype
            if dp.is_floating_point and df.is_floating_point:
                self._keys.append(k)
                self._dtype[k] = dtype or compute_dtype(dp, df)
            elif dp.is_floating_point or df.is_floating_point:
                raise DtypeError(
                    f"tensor {k!r}: dtype {dp} in {pretrained.name} but {df} in {finetuned.name}; "
                    "a task vector needs floating tensors on both sides"
                )
            # integer buffers (position ids, BatchNorm counters) carry no task vector
        if not self._keys:
            raise ConfigError(f"{self.name}: no floating tensor selected (include={include}, exclude={exclude})")

    def keys(self) -> list[str]:
        return list(self._keys)

    def spec(self, key: str) -> TensorSpec:
        if key not in self._dtype:
            raise KeyMismatchError(f"task vector {self.name}: no tensor named {key!r}")
        return TensorSpec(self.pretrained.spec(key).shape, self._dtype[key])

    def read_flat(self, key: str, start: int = 0, stop: int | None = None) -> torch.Tensor:
        spec = self.spec(key)
        out = torch.empty((spec.numel if stop is None else stop) - start, dtype=spec.dtype)
        self.read_into(key, start, stop, out)  # a whole tensor (stop None) is not remembered by the base's cache
        return out

    def read_into(self, key: str, start: int, stop: int | None, out: torch.Tensor) -> None:
        """`read_flat` written into `out` (cast in place, no temporaries; the base cast once per slice
        when it is a `LastSliceCache`)."""
        dt = self.spec(key).dtype
        if out.dtype != dt or out.device.type != "cpu":  # computed in the task vector's dtype on the CPU, then cast
            out.copy_(self.read_flat(key, start, stop))
            return
        ft = self.finetuned.read_flat(key, start, stop)
        out.copy_(ft)
        out.sub_(read_cast(self.pretrained, key, start, stop, dt))
        if not self.allow_nonfinite:
            bad = _nonfinite(out, start)
            if bad is not None:
                pre = self.pretrained.read_flat(key, start, stop)
                for src, x in ((self.finetuned, ft), (self.pretrained, pre)):
                    where = _nonfinite(x, start)
                    if where is not None:
                        raise NonFiniteError(f"{src.name}: tensor {key!r} has {where}; refused, {ALLOW_HINT}")
                raise NonFiniteError(f"task vector {self.name}: tensor {key!r} has {bad}; refused, {ALLOW_HINT}")


class FloatSource:
    """A stored task vector (e.g. fp16 on disk) read back in at least float32."""

    def __init__(self, source: Source, keys: list[str] | None = None, allow_nonfinite: bool = False):
        self.source = source
        self.allow_nonfinite = allow_nonfinite
        self.name = source.name
        self._keys = keys if keys is not None else source.keys()
        for k in self._keys:
            if not source.spec(k).dtype.is_floating_point:
                raise DtypeError(
                    f"{source.name}: tensor {k!r} has dtype {source.spec(k).dtype}; task vectors are floating"
                )

    def keys(self) -> list[str]:
        return list(self._keys)

    def spec(self, key: str) -> TensorSpec:
        s = self.source.spec(key)
        return TensorSpec(s.shape, compute_dtype(s.dtype))

    def read_flat(self, key: str, start: int = 0, stop: int | None = None) -> torch.Tensor:
        out = self.source.read_flat(key, start, stop).to(self.spec(key).dtype)
        self._check(key, start, out)
        return out

    def read_into(self, key: str, start: int, stop: int | None, out: torch.Tensor) -> None:
        """`read_flat` written into `out`, cast in place."""
        if out.dtype != self.spec(key).dtype or out.device.type != "cpu":
            out.copy_(self.read_flat(key, start, stop))
            return
        out.copy_(self.source.read_flat(key, start, stop))
        self._check(key, start, out)

    def _check(self, key: str, start: int, x: torch.Tensor) -> None:
        if not self.allow_nonfinite:
            bad = _nonfinite(x, start)
            if bad is not None:
                raise NonFiniteError(f"{self.name}: tensor {key!r} has {bad}; refused, {ALLOW_HINT}")


class TaskVector:
    """A lazy task vector tau = theta_finetuned - theta_pretrained over named tensors."""

    def __init__(self, source: Source, name: str | None = None):
        self.source = source
        self.name = name or source.name

    # ----- construction
    @classmethod
    def from_checkpoints(
        cls,
        pretrained: CheckpointLike,
        finetuned: CheckpointLike,
        *,
        include: list[str] | None = None,
        exclude: list[str] | None = None,
        name: str | None = None,
        dtype: torch.dtype | None = None,
        allow_nonfinite: bool = False,
    ) -> TaskVector:
        """tau = finetuned - pretrained over floating tensors; `include`/`exclude` are globs, each of
        which must match some tensor.

        `dtype` is the compute dtype (default: float32, or wider if the inputs are); float64 makes
        `tau.apply_to(pretrained, 1.0)` give back float32 fine-tuned weights bit for bit.
        A NaN or infinite value in either checkpoint is an error naming the tensor when it is read,
        unless `allow_nonfinite` (it then flows into every result that uses it).
        """
        pre, ft = open_checkpoint(pretrained), open_checkpoint(finetuned)
        return cls(DiffSource(pre, ft, include, exclude, dtype, allow_nonfinite), name=name)

    @classmethod
    def from_tensors(
        cls, tensors: Mapping[str, torch.Tensor], name: str = "<task vector>", *, allow_nonfinite: bool = False
    ) -> TaskVector:
        return cls(FloatSource(DictSource(tensors, name=name), allow_nonfinite=allow_nonfinite), name=name)

    @classmethod
    def load(cls, path: CheckpointLike, *, allow_nonfinite: bool = False) -> TaskVector:
        """A task vector saved by `save` or `taskvec compress`, or a LoRA adapter folder (any checkpoint
        format of deltas works); NaN or infinite values are an error naming the tensor when read,
        unless `allow_nonfinite`."""
        src = open_checkpoint(path)
        return cls(FloatSource(src, allow_nonfinite=allow_nonfinite), name=src.name)

    @classmethod
    def from_lora(
        cls,
        adapter: str | os.PathLike[str],
        base: CheckpointLike | None = None,
        *,
        name: str | None = None,
        allow_nonfinite: bool = False,
    ) -> TaskVector:
        """A PEFT LoRA adapter folder as a task vector (scale * B @ A per adapted weight), lazy.

        `base` is the model the adapter belongs to: the adapter is checked against it (tensor names
        and shapes), and tensors the adapter saves whole (`modules_to_save`) become deltas against it.
        """
        src = open_lora(adapter, open_checkpoint(base) if base is not None else None)
        return cls(FloatSource(src, allow_nonfinite=allow_nonfinite), name=name or src.name)

    # ----- access
    def keys(self) -> list[str]:
        return self.source.keys()

    def spec(self, key: str) -> TensorSpec:
        return self.source.spec(key)

    def __getitem__(self, key: str) -> torch.Tensor:
        return self.source.read_flat(key).reshape(self.spec(key).shape)

    def __contains__(self, key: str) -> bool:
        return key in set(self.keys())

    def __len__(self) -> int:
        return len(self.keys())

    def __repr__(self) -> str:
        return f"TaskVector({self.name!r}, {len(self)} tensors, {self.numel():,} parameters)"

    def numel(self) -> int:
        return sum(self.spec(k).numel for k in self.keys())

    def items(self) -> Iterable[tuple[str, torch.Tensor]]:
        """(key, tensor) pairs, one tensor in memory at a time."""
        for k in self.keys():
            yield k, self[k]

    # ----- arithmetic
    def _terms(self, coef: Coef = 1.0) -> list[tuple[Coef, Source]]:
        if isinstance(self.source, LinearSource) and isinstance(coef, (int, float)):
            return [(_times(c, coef), s) for c, s in self.source.terms]
        return [(coef, self.source)]

    def scale(self, coef: Coef) -> TaskVector:
        """coef * tau; `coef` is a number, a {glob: number} map, or a callable of the tensor name."""
        return TaskVector(LinearSource(self._terms(coef)), name=f"{_fmt(coef)}*({self.name})")

    def __add__(self, other: TaskVector) -> TaskVector:
        if not isinstance(other, TaskVector):
            return NotImplemented
        return TaskVector(LinearSource(self._terms() + other._terms()))

    def __radd__(self, other: object) -> TaskVector:
        if isinstance(other, (int, float)) and other == 0:  # lets the builtin sum() work
            return self
        return NotImplemented

    def __sub__(self, other: TaskVector) -> TaskVector:
        if not isinstance(other, TaskVector):
            return NotImplemented
        return TaskVector(LinearSource(self._terms() + other._terms(-1.0)))

    def __neg__(self) -> TaskVector:
        return self.scale(-1.0)

    def __mul__(self, coef: Coef) -> TaskVector:
        return self.scale(coef)

    __rmul__ = __mul__

    def __truediv__(self, x: float) -> TaskVector:
        return self.scale(1.0 / x)

    @staticmethod
    def sum(task_vectors: Sequence[TaskVector], weights: Sequence[Coef] | None = None) -> TaskVector:
        """sum_k w_k tau_k (weights default to 1)."""
        weights = list(weights) if weights is not None else [1.0] * len(task_vectors)
        if len(weights) != len(task_vectors):
            raise ValueError(f"{len(task_vectors)} task vectors but {len(weights)} weights")
        terms = [t for tv, w in zip(task_vectors, weights, strict=False) for t in tv._terms(w)]
        return TaskVector(LinearSource(terms), name=f"sum of {len(task_vectors)}")

    def filter(self, include: list[str] | None = None, exclude: list[str] | None = None) -> TaskVector:
        """Keep only the tensors matching `include` globs and none of `exclude`; keeping none is an error."""
        keys = [k for k in self.keys() if matches(k, include, exclude)]
        if not keys:
            raise ConfigError(f"{self.name}: include={include} exclude={exclude} keep no tensor")
        return TaskVector(_Subset(self.source, keys), name=self.name)

    # ----- reductions (streamed)
    def dot(self, other: TaskVector) -> float:
        return float(gram_matrix([self, other])[0, 1])

    def norm(self) -> float:
        return float(gram_matrix([self])[0, 0]) ** 0.5

    def cosine(self, other: TaskVector) -> float:
        """Cosine similarity; NaN when either task vector is zero (its direction is undefined)."""
        denom = self.norm() * other.norm()
        return self.dot(other) / denom if denom > 0 else float("nan")

    # ----- materialise, apply, save
    def to_state_dict(self, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
        return {k: (v.to(dtype) if dtype else v) for k, v in self.items()}

    # The overloads give each kind of base its result type; the write options, the same for all,
    # are typed once by WriteOptions (defaults as in the implementation below).
    @overload
    def apply_to(
        self,
        base: nn.Module,
        coef: Coef = 1.0,
        *,
        out: str | os.PathLike[str] | None = None,
        **kw: Unpack[WriteOptions],
    ) -> nn.Module: ...
    @overload
    def apply_to(
        self, base: Mapping[str, torch.Tensor], coef: Coef = 1.0, *, out: None = None, **kw: Unpack[WriteOptions]
    ) -> dict[str, torch.Tensor]: ...
    @overload
    def apply_to(
        self,
        base: str | os.PathLike[str] | Mapping[str, torch.Tensor] | Source,
        coef: Coef = 1.0,
        *,
        out: str | os.PathLike[str],
        **kw: Unpack[WriteOptions],
    ) -> Path: ...
    def apply_to(
        self,
        base: CheckpointLike,
        coef: Coef = 1.0,
        *,
        out: str | os.PathLike[str] | None = None,
        dtype: torch.dtype | None = None,
        shard_size: int = DEFAULT_SHARD_BYTES,
        overwrite: bool = False,
        progress: bool = False,
        allow_nonfinite: bool = False,
    ) -> nn.Module | dict[str, torch.Tensor] | Path:
        """theta0 + coef * tau.

        An `nn.Module` base gives a new module (the base is left untouched); a state dict gives a new
        state dict; a checkpoint on disk needs `out` and is streamed to it tensor by tensor. A Hugging
        Face base folder gives a folder `from_pretrained` loads: its config (with the new dtype) and
        tokenizer/processor files come along. A result written to `out` that overflows to infinity
        is refused unless `allow_nonfinite` (for inputs already allowed to hold NaN/inf).
        """
        if isinstance(base, nn.Module):
            model = copy.deepcopy(base)
            sd = model.state_dict()
            new = self._apply_dict(sd, coef)
            model.load_state_dict(new)
            return model
        if isinstance(base, Mapping) and out is None:
            return self._apply_dict(base, coef)
        if out is None:
            raise ValueError("apply_to a checkpoint on disk needs `out`, the path to write to")
        src = open_checkpoint(base)
        return apply_streaming(
            src,
            self,
            coef,
            out,
            dtype=dtype,
            shard_size=shard_size,
            overwrite=overwrite,
            progress=progress,
            extra_files=hf_output_files(base, out, dtype),
            allow_nonfinite=allow_nonfinite,
        )

    def _apply_dict(self, base: Mapping[str, torch.Tensor], coef: Coef) -> dict[str, torch.Tensor]:
        check_same_tensors(DictSource(base, name="base"), self.source, self.keys())
        out = dict(base)
        check_coef_map(coef, self.keys())
        for k in self.keys():
            b = base[k]
            out[k] = cast_checked(add_scaled(b, self[k], resolve(coef, k)), b.dtype, k)
        return out

    def save(
        self,
        path: str | os.PathLike[str],
        *,
        dtype: torch.dtype | None = torch.float32,
        shard_size: int = DEFAULT_SHARD_BYTES,
        overwrite: bool = False,
        progress: bool = False,
        allow_nonfinite: bool = False,
    ) -> Path:
        """Write to a .safetensors file or a shard folder, streamed and atomic; `dtype` is the storage dtype.

        Values that overflowed to infinity in the arithmetic (e.g. a sum of huge coefficients) are
        refused, naming the tensor, unless `allow_nonfinite`."""
        specs = {k: TensorSpec(self.spec(k).shape, dtype or self.spec(k).dtype) for k in self.keys()}

        def slice_fn(k: str, s: int, e: int) -> torch.Tensor:
            x = self.source.read_flat(k, s, e)
            if not allow_nonfinite:
                check_overflow(x, k, "the task vector")
            return cast_checked(x, specs[k].dtype, k)

        return write_checkpoint(
            path,
            specs,
            slice_fn,
            max_shard_bytes=shard_size,
            metadata={"taskvec": TASK_VECTOR_FORMAT},
            overwrite=overwrite,
            progress=progress,
            description="saving task vector",
        )


def add_scaled(base: torch.Tensor, delta: torch.Tensor, coef: float) -> torch.Tensor:
    """base + coef * delta in the delta's dtype, as a new tensor (sources may share memory: never in place)."""
    return torch.add(base.to(delta.dtype), delta, alpha=coef) if coef != 0.0 else base.to(delta.dtype)


class _Subset:
    def __init__(self, source: Source, keys: list[str]):
        self.source, self._keys, self.name = source, keys, source.name

    def keys(self) -> list[str]:
        return list(self._keys)

    def spec(self, key: str) -> TensorSpec:
        return self.source.spec(key)

    def read_flat(self, key: str, start: int = 0, stop: int | None = None) -> torch.Tensor:
        return self.source.read_flat(key, start, stop)

    def read_into(self, key: str, start: int, stop: int | None, out: torch.Tensor) -> None:
        read_into(self.source, key, start, stop, out)


def _times(c: Coef, x: float) -> Coef:
    if isinstance(c, (int, float)):
        return float(c) * x
    if isinstance(c, Mapping):
        return {p: float(v) * x for p, v in c.items()}
    return lambda k: resolve(c, k) * x


def _fmt(c: Coef) -> str:
    return f"{c:g}" if isinstance(c, (int, float)) else "coef"


def apply_streaming(
    base: Source,
    tv: TaskVector,
    coef: Coef,
    out: str | os.PathLike[str],
    *,
    dtype: torch.dtype | None = None,
    shard_size: int = DEFAULT_SHARD_BYTES,
    overwrite: bool = False,
    progress: bool = False,
    chunk_elems: int = CHUNK_ELEMS,
    metadata: dict[str, str] | None = None,
    extra_files: Callable[[Path], None] | None = None,
    allow_nonfinite: bool = False,
) -> Path:
    """Write theta0 + coef * tau to `out`, slice by slice. Tensors outside tau are copied from the base.

    `extra_files(tmp)` adds non-weight files (see `taskvec.io.hf.hf_output_files`) before the rename.
    A result that overflows to infinity is refused, naming the tensor, unless `allow_nonfinite`."""
    base = base if isinstance(base, LastSliceCache) else LastSliceCache(base)
    delta_keys = set(tv.keys())
    check_same_tensors(base, tv.source, sorted(delta_keys))
    check_coef_map(coef, tv.keys(), "coefficient (scale) map")
    specs: dict[str, TensorSpec] = {}
    for k in base.keys():
        s = base.spec(k)
        specs[k] = TensorSpec(s.shape, dtype if (dtype is not None and s.dtype.is_floating_point) else s.dtype)

    def slice_fn(k: str, s: int, e: int) -> torch.Tensor:
        b = base.read_flat(k, s, e)
        if k not in delta_keys:
            return b
        c = resolve(coef, k)
        x = add_scaled(b, tv.source.read_flat(k, s, e), c)
        if not allow_nonfinite:
            check_overflow(x, k, f"base + {c:g} x task vector")
        return cast_checked(x, specs[k].dtype, k)

    def prefetch_fn(k: str, s: int, e: int) -> None:
        prefetch(base, k, s, e)
        if k in delta_keys:
            prefetch(tv.source, k, s, e)

    return write_checkpoint(
        out,
        specs,
        slice_fn,
        max_shard_bytes=shard_size,
        overwrite=overwrite,
        progress=progress,
        chunk_elems=chunk_elems,
        metadata=metadata,
        description="writing model",
        extra_files=extra_files,
        prefetch_fn=prefetch_fn,
    )
