"""Task vectors stored as factors: each matrix tensor is U diag(s) V^T, other tensors stay dense.

A factored source is a `Source` like any other (dense slices on demand, computing only the rows
a slice covers) that also answers `factors(key)`, so code that can use the factors directly (the
per-sample composed forward, the Gram matrix of a bank) never materialises the dense tensor.

On disk (`taskvec compress`), a low-rank task vector is one safetensors file (or shard folder)
whose metadata says `taskvec: taskvec/low_rank_task_vector`. A tensor `KEY` kept as factors is
stored as `KEY::U` (m, r), `KEY::S` (r,) and `KEY::V` (n, r), with the dense matrix of shape
(m, n) = (shape[0], prod(shape[1:])); the original shapes are the JSON metadata entry
`taskvec_lowrank_shapes`. Tensors kept dense are stored under their own names.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch

from taskvec.errors import CheckpointError, tensor_entry
from taskvec.io.readers import parse_json
from taskvec.io.safetensors_file import TensorSpec

LOWRANK_FORMAT = "taskvec/low_rank_task_vector"
SHAPES_KEY = "taskvec_lowrank_shapes"
PARTS = ("U", "S", "V")
SEP = "::"


@dataclass(frozen=True)
class Factors:
    """tensor = (u @ diag(s) @ v.T).reshape(shape), with u (m, r), s (r,), v (n, r)."""

    u: torch.Tensor
    s: torch.Tensor
    v: torch.Tensor
    shape: tuple[int, ...]

    @property
    def rank(self) -> int:
        return int(self.s.shape[0])

    @property
    def matrix_shape(self) -> tuple[int, int]:
        return int(self.u.shape[0]), int(self.v.shape[0])

    def rows(self, r0: int, r1: int, dtype: torch.dtype | None = None) -> torch.Tensor:
        """Rows [r0, r1) of the (m, n) matrix, computed from those rows of u only."""
        dt = dtype or self.u.dtype
        return (self.u[r0:r1].to(dt) * self.s.to(dt)) @ self.v.to(dt).T

    def dense(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        return self.rows(0, self.u.shape[0], dtype).reshape(self.shape)

    def flat(self, start: int, stop: int, dtype: torch.dtype | None = None) -> torch.Tensor:
        """Elements [start, stop) of the flattened tensor."""
        n = self.v.shape[0]
        if stop <= start:
            return torch.empty(0, dtype=dtype or self.u.dtype)
        r0, r1 = start // n, -(-stop // n)
        return self.rows(r0, r1, dtype).reshape(-1)[start - r0 * n : stop - r0 * n]

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.u, self.s, self.v))


def check_factors(f: Factors, what: str) -> None:
    """Raise unless the factors' shapes agree with each other and with `f.shape`."""
    m, n = f.matrix_shape
    numel = 1
    for d in f.shape:
        numel *= d
    r = f.rank
    if f.u.dim() != 2 or f.v.dim() != 2 or f.s.dim() != 1 or f.u.shape[1] != r or f.v.shape[1] != r:
        raise CheckpointError(
            f"{what}: factors of shapes U {list(f.u.shape)}, S {list(f.s.shape)}, V {list(f.v.shape)} "
            "do not fit together"
        )
    if not f.shape or m != f.shape[0] or m * n != numel:
        raise CheckpointError(
            f"{what}: factors give a {m} x {n} matrix, which is not a tensor of shape {list(f.shape)}"
        )


class FactoredSource:
    """A task vector whose tensors are factors (`factors(key)`) or dense (`factors(key)` is None).

    `get_factors(key)` and `read_dense(key, start, stop)` are called lazily; the last factors read
    are kept, so the slices of one tensor do not reread its factors.
    """

    def __init__(
        self,
        name: str,
        specs: Mapping[str, TensorSpec],
        factored: set[str],
        get_factors: Callable[[str], Factors],
        read_dense: Callable[[str, int, int | None], torch.Tensor],
        metadata: Mapping[str, str] | None = None,
    ):
        self.name = name
        self._specs = dict(specs)
        self._factored = set(factored)
        self._get, self._dense = get_factors, read_dense
        self._last: tuple[str, Factors] | None = None
        self.metadata = dict(metadata or {})

    def keys(self) -> list[str]:
        return list(self._specs)

    def spec(self, key: str) -> TensorSpec:
        return tensor_entry(self._specs, key, self.name)

    def factored_keys(self) -> list[str]:
        return [k for k in self._specs if k in self._factored]

    def factors(self, key: str) -> Factors | None:
        self.spec(key)
        if key not in self._factored:
            return None
        last = self._last
        if last is not None and last[0] == key:
            return last[1]
        f = self._get(key)
        self._last = (key, f)
        return f

    def read_flat(self, key: str, start: int = 0, stop: int | None = None) -> torch.Tensor:
        spec = self.spec(key)
        f = self.factors(key)
        if f is None:
            return self._dense(key, start, stop).to(spec.dtype)
        return f.flat(start, spec.numel if stop is None else stop, spec.dtype)


def _float(dt: torch.dtype) -> torch.dtype:
    return torch.promote_types(dt, torch.float32)


def factored_from_tensors(
    factors: Mapping[str, Factors],
    dense: Mapping[str, torch.Tensor] | None = None,
    name: str = "<low-rank task vector>",
) -> FactoredSource:
    """A factored source over tensors in memory (factors for some keys, dense tensors for others)."""
    dense = dict(dense or {})
    specs: dict[str, TensorSpec] = {}
    for k, f in factors.items():
        check_factors(f, f"{name}: tensor {k!r}")
        specs[k] = TensorSpec(tuple(f.shape), _float(f.u.dtype))
    for k, t in dense.items():
        if k in specs:
            raise CheckpointError(f"{name}: tensor {k!r} given both as factors and dense")
        specs[k] = TensorSpec(tuple(t.shape), _float(t.dtype))
    return FactoredSource(
        name,
        specs,
        set(factors),
        factors.__getitem__,
        lambda k, s, e: dense[k].reshape(-1)[s:e],
    )


def is_lowrank(metadata: Mapping[str, str]) -> bool:
    return metadata.get("taskvec") == LOWRANK_FORMAT


def part_key(key: str, part: str) -> str:
    return f"{key}{SEP}{part}"


def open_lowrank(source: object) -> FactoredSource:
    """A stored low-rank task vector (a source whose metadata marks the format) as a factored source."""
    src = source  # a Source: keys/spec/read_flat/name/metadata
    name: str = src.name  # type: ignore[attr-defined]
    meta: dict[str, str] = dict(getattr(src, "metadata", {}) or {})
    try:
        shapes: dict[str, list[int]] = parse_json(meta.get(SHAPES_KEY, "{}"))
    except ValueError as e:  # JSON syntax, nested too deep
        raise CheckpointError(f"{name}: metadata {SHAPES_KEY} is not valid JSON ({e})") from None
    stored = set(src.keys())  # type: ignore[attr-defined]
    specs: dict[str, TensorSpec] = {}
    factored: set[str] = set()
    parts = {part_key(k, p) for k in shapes for p in PARTS}
    for key in src.keys():  # type: ignore[attr-defined]
        if SEP in key:
            base, _, p = key.rpartition(SEP)
            if key not in parts:
                raise CheckpointError(
                    f"{name}: tensor {key!r} looks like a factor, but {base!r} is not listed in {SHAPES_KEY}"
                )
            if p == "U":
                specs[base] = TensorSpec(tuple(shapes[base]), _float(src.spec(key).dtype))  # type: ignore[attr-defined]
                factored.add(base)
            continue
        specs[key] = TensorSpec(src.spec(key).shape, _float(src.spec(key).dtype))  # type: ignore[attr-defined]
    for k in shapes:
        missing = [p for p in PARTS if part_key(k, p) not in stored]
        if missing:
            raise CheckpointError(f"{name}: low-rank tensor {k!r} lacks its factor(s) {', '.join(missing)}")

    def get(key: str) -> Factors:
        u, s, v = (src.read_flat(part_key(key, p)).reshape(src.spec(part_key(key, p)).shape) for p in PARTS)  # type: ignore[attr-defined]
        f = Factors(u, s, v, tuple(shapes[key]))
        check_factors(f, f"{name}: tensor {key!r}")
        return f

    return FactoredSource(name, specs, factored, get, src.read_flat, meta)  # type: ignore[attr-defined]
