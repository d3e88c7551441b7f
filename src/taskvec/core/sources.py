"""Sources built from other sources (a `Source` is a table of named tensors read in slices; see
taskvec.io): the checks they share and the linear combination behind sums of task vectors."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch

from taskvec.core.coef import Coef, check_coef_map, resolve
from taskvec.errors import KeyMismatchError, ShapeMismatchError
from taskvec.io import Source, TensorSpec


def compute_dtype(*dtypes: torch.dtype) -> torch.dtype:
    """The dtype arithmetic on tensors of `dtypes` runs in: float32 at least, wider if one is wider.
    8-bit floats (float8_e4m3fn, float8_e5m2) are computed in float32."""
    out = torch.float32
    for d in dtypes:
        if d.is_floating_point and d.itemsize == 1:
            continue
        out = torch.promote_types(out, d)
    return out


def key_list(keys: Iterable[str], limit: int = 5) -> str:
    """The first `limit` tensor names, sorted and quoted, for error messages ('and N more')."""
    keys = sorted(keys)
    more = f" and {len(keys) - limit} more" if len(keys) > limit else ""
    return ", ".join(repr(k) for k in keys[:limit]) + more


def check_same_tensors(a: Source, b: Source, keys: Sequence[str] | None = None) -> None:
    """Raise if `a` and `b` differ in their tensor names (or in `keys`) or shapes."""
    ka, kb = set(a.keys()), set(b.keys())
    if keys is None:
        if ka != kb:
            parts = []
            if ka - kb:
                parts.append(f"only in {a.name}: {key_list(ka - kb)}")
            if kb - ka:
                parts.append(f"only in {b.name}: {key_list(kb - ka)}")
            raise KeyMismatchError("tensors differ: " + "; ".join(parts))
        keys = a.keys()
    for k in keys:
        for src, names in ((a, ka), (b, kb)):
            if k not in names:
                raise KeyMismatchError(f"tensor {k!r} is missing from {src.name}")
        sa, sb = a.spec(k).shape, b.spec(k).shape
        if sa != sb:
            raise ShapeMismatchError(f"tensor {k!r}: shape {list(sa)} in {a.name} but {list(sb)} in {b.name}")


class LinearSource:
    """sum_i coef_i * tv_i, with per-tensor coefficients; all terms must hold the same tensors."""

    def __init__(self, terms: list[tuple[Coef, Source]]):
        if not terms:
            raise ValueError("a linear combination needs at least one task vector")
        self.terms = terms
        first = terms[0][1]
        for _, src in terms[1:]:
            check_same_tensors(first, src)
        for coef, _ in terms:
            check_coef_map(coef, first.keys())
        self.name = " + ".join(s.name for _, s in terms) if len(terms) < 4 else f"sum of {len(terms)} task vectors"

    def keys(self) -> list[str]:
        return self.terms[0][1].keys()

    def spec(self, key: str) -> TensorSpec:
        specs = [s.spec(key) for _, s in self.terms]
        return TensorSpec(specs[0].shape, compute_dtype(*(s.dtype for s in specs)))

    def read_flat(self, key: str, start: int = 0, stop: int | None = None) -> torch.Tensor:
        dt = self.spec(key).dtype
        out: torch.Tensor | None = None
        for coef, src in self.terms:
            c = resolve(coef, key)
            if c == 0.0 and out is not None:
                continue
            x = src.read_flat(key, start, stop).to(dt)
            out = x * c if out is None else out.add_(x, alpha=c)
        assert out is not None
        return out
