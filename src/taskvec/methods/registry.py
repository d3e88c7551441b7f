"""The registry of static merge methods.

A method merges, for one slice of one tensor, the stacked task-vector slices `deltas` (T, n)
with per-task weights (T,) into one merged delta (n,). Methods that trim by magnitude declare
it, and receive each task's threshold on |tau| computed over the whole tensor (so results do
not depend on how the tensor is sliced). To add a method: write one file in this folder that
calls `register(MergeMethod(...))`, and add its test; the modules of this folder are found
without a list of imports.

Other installed packages add methods through the entry-point group `taskvec.merge_methods`: each
entry point, named like the method, points to a `MergeMethod` (or a function returning one), e.g.
in the plugin's pyproject.toml `[project.entry-points."taskvec.merge_methods"]`
`my_merge = "my_pkg.merge:METHOD"`. See docs/extending.md.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import cast

import torch
from pydantic import BaseModel, ConfigDict, ValidationError

from taskvec.errors import ConfigError, UnknownMethodError, format_validation_error
from taskvec.registry import Kind, Registry


class MethodParams(BaseModel):
    """Base of every method's parameters: unknown keys and non-finite numbers are errors."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


@dataclass(frozen=True)
class SliceContext:
    """What a method may know about the slice it merges."""

    key: str
    start: int
    stop: int
    numel: int  # of the whole tensor
    thresholds: torch.Tensor | None  # (T, 2): per task, the k-th largest |tau_t| over the whole tensor and the
    # flat index of the last entry equal to it that is kept (ties broken by position), if asked for


MergeFn = Callable[[torch.Tensor, torch.Tensor, MethodParams, SliceContext], torch.Tensor]


@dataclass(frozen=True, init=False)
class MergeMethod(Kind[MergeFn]):
    """A merge method: its name, a one-line summary, its parameters' model and its merge function
    (the registry's `config` and `build`); `magnitude_density` is set when it trims by magnitude."""

    magnitude_density: Callable[[MethodParams], float] | None = None

    def __init__(
        self,
        name: str,
        summary: str,
        params: type[MethodParams],
        merge: MergeFn,
        magnitude_density: Callable[[MethodParams], float] | None = None,
    ) -> None:
        super().__init__(name, params, merge, summary)
        object.__setattr__(self, "magnitude_density", magnitude_density)

    @property
    def summary(self) -> str:
        return self.doc

    @property
    def params(self) -> type[MethodParams]:
        return cast(type[MethodParams], self.config)

    @property
    def merge(self) -> MergeFn:
        return self.build


ENTRY_POINT_GROUP = "taskvec.merge_methods"
METHODS: Registry[MergeFn] = Registry(
    "merge method", key="method", group=ENTRY_POINT_GROUP, package=__name__.rpartition(".")[0]
)
"""Every merge method by name: the modules of this folder and the entry points of other packages."""


def register(method: MergeMethod) -> MergeMethod:
    """Add `method` to `METHODS` (call it at the top level of the method's module)."""
    return METHODS.add(method)


def get_method(name: str) -> MergeMethod:
    if name not in METHODS:
        raise UnknownMethodError(f"unknown merge method {name!r}; known: {', '.join(sorted(METHODS.known()))}")
    method = METHODS.get(name)
    if not isinstance(method, MergeMethod):
        raise ConfigError(f"merge method {name!r} of package {METHODS.source(name)!r} is not a MergeMethod")
    return method


def list_methods() -> list[MergeMethod]:
    """Every merge method: the built-in ones and those of installed packages."""
    return [get_method(k) for k in sorted(METHODS.names())]


def method_source(name: str) -> str:
    """The package a registered method comes from ('taskvec' for the built-in ones)."""
    return METHODS.source(name)


def parse_params(method: MergeMethod, params: dict[str, object]) -> MethodParams:
    """Validate `params` for `method`; the error names the method and the bad option."""
    try:
        return method.params(**params)
    except ValidationError as e:
        raise ConfigError(f"method {method.name!r}: invalid parameter ({format_validation_error(e)})") from None


def weighted_sum(deltas: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """sum_t w_t * delta_t over the first dimension."""
    return torch.einsum("t,tn->n", weights.to(deltas.dtype), deltas) if deltas.shape[0] else deltas.sum(0)


def trim_by_threshold(deltas: torch.Tensor, thresholds: torch.Tensor, start: int = 0) -> torch.Tensor:
    """Keep exactly the top-k entries of each task by |delta| (see `magnitude_threshold`) in the
    slice of flat positions [start, start + n): entries above the threshold, and entries equal to
    it up to the task's cut-off position."""
    thr = thresholds[:, 0].to(deltas.dtype)[:, None]
    keep = deltas.abs().sub_(thr)  # |delta| - threshold, turned into 0/1 factors in place (float ops: fast on CPU)
    n = deltas.shape[1]
    for t, cut in enumerate(thresholds[:, 1].tolist()):
        last = min(n, int(cut) - start + 1)  # positions [start, cut] also keep entries equal to the threshold
        if last > 0:
            prefix = keep[t, :last]
            torch.ge(prefix, 0, out=prefix)  # 1 where |delta| >= threshold, else 0
    torch.gt(keep, 0, out=keep)  # 1 where |delta| > threshold, else 0 (the patched prefixes stay as they are)
    return torch.mul(deltas, keep, out=keep)  # deltas * keep, in the buffer of the factors


BLOCK = 1 << 20  # elements per block of a selection pass: small enough to stay in cache
_KEY = {2: (torch.int16, 0x7FFF), 4: (torch.int32, 0x7FFFFFFF), 8: (torch.int64, 0x7FFFFFFFFFFFFFFF)}
Blocks = Callable[[], Iterator[torch.Tensor]]


def magnitude_threshold(x: torch.Tensor, density: float) -> tuple[float, float]:
    """(threshold, cut): keeping |x| > threshold, and |x| == threshold at flat positions <= cut,
    keeps exactly k = int(density * numel) entries, as TIES and PEFT's top-k do.

    Ties at the threshold are common in task vectors of fp16/bf16 weights (their deltas are
    quantized); they are broken by position, so the result does not depend on how the tensor is
    sliced.
    """
    flat = x.detach().reshape(-1)
    return select_threshold(lambda: iter(flat.split(BLOCK)), flat.numel(), flat.dtype, density)


def select_threshold(blocks: Blocks, n: int, dtype: torch.dtype, density: float) -> tuple[float, float]:
    """`magnitude_threshold` of a tensor of `n` elements given as consecutive flat blocks.

    `blocks()` is called once per pass (two for 16-bit floats, three for 32-bit, five for
    64-bit), so a tensor too large for memory can be re-read slice by slice. The k-th largest
    |x| is found by a radix select over the float's bit pattern with the sign bit cleared (its
    order is that of |x|): a 65,536-bin histogram of the top 16 bits, then of the next 16 bits of
    the entries that share the selected prefix; linear time, no sort, no copy of the tensor.
    """
    k = int(density * n)
    if density >= 1 or k >= n:
        return 0.0, float(n)
    if k <= 0:
        return float("inf"), -1.0
    size = torch.empty((), dtype=dtype).element_size()
    if not dtype.is_floating_point or size not in _KEY:
        raise TypeError(f"magnitude threshold of a {dtype} tensor: expected a float tensor")
    if size == 4 and sys.byteorder == "little":
        return _select32(blocks, n, k, dtype)
    kdt, mask = _KEY[size]
    bits = 8 * size
    rank = n - k  # 0-based rank, from the smallest, of the threshold's key
    prefix, above = 0, 0  # the key's bits found so far; entries with a larger key
    for level in range(bits // 16):
        hist = torch.zeros(65536, dtype=torch.int64)
        for b in blocks():
            hist += torch.bincount(_digits(b.reshape(-1), kdt, mask, level, prefix), minlength=65536).cpu()
        cum = hist.cumsum(0)
        d = int(torch.searchsorted(cum, rank, right=True))
        rank -= int(cum[d - 1]) if d else 0
        above += int(cum[-1] - cum[d])
        prefix = (prefix << 16) | d
    need = k - above  # entries equal to the threshold that are kept, the first ones by position
    thr = torch.tensor([prefix], dtype=kdt).view(dtype)
    seen, offset, cut = 0, 0, -1
    for b in blocks():
        eq = b.reshape(-1).abs() == thr.to(b.device)
        c = int(eq.count_nonzero())
        if seen + c >= need:
            cut = offset + int(torch.nonzero(eq)[need - seen - 1])
            break
        seen += c
        offset += b.numel()
    return float(thr), float(cut)


def _digits(b: torch.Tensor, kdt: torch.dtype, mask: int, level: int, prefix: int) -> torch.Tensor:
    """The 16-bit digit number `level` (from the top) of the keys of `b` whose higher digits equal `prefix`."""
    size = b.element_size()
    if size == 2:
        return b.view(torch.int16) & 0x7FFF
    if size == 4 and sys.byteorder == "little":  # halves of the key as int16 views: no shifts of the whole block
        halves = b.view(torch.int16)
        hi = halves[1::2] & 0x7FFF
        if level == 0:
            return hi
        return halves[0::2][hi == prefix].to(torch.int32) & 0xFFFF
    keys = b.contiguous().view(kdt) & mask
    shift = 8 * size - 16 * (level + 1)
    if level:
        keys = keys[(keys >> (shift + 16)) == prefix]
    return (keys >> shift) & 0xFFFF


def _positions(mask: torch.Tensor) -> torch.Tensor:
    """`torch.nonzero(mask)` of a 1-D boolean mask with few True entries, in increasing order: the
    mask's bytes are searched 8 at a time, as 64-bit words, then the words found are unpacked
    (several times faster than a search of each entry)."""
    n = mask.numel()
    head = n - n % 8
    if mask.device.type != "cpu" or head == 0 or mask.storage_offset() % 8 or not mask.is_contiguous():
        return torch.nonzero(mask).reshape(-1)
    words = torch.nonzero(mask[:head].view(torch.int64)).reshape(-1)
    pos = (words[:, None] * 8 + torch.arange(8)).reshape(-1)
    pos = pos[mask[pos]]
    if head < n:
        pos = torch.cat([pos, torch.nonzero(mask[head:]).reshape(-1) + head])
    return pos


CACHE_ELEMS = 1 << 26  # tensors up to this size keep their top digits between passes (2 bytes each)


def _select32(blocks: Blocks, n: int, k: int, dtype: torch.dtype) -> tuple[float, float]:
    """`select_threshold` for 32-bit floats on a little-endian machine: the two 16-bit halves of
    each key are int16 views, the top digits are kept for the second pass, and the second pass
    (and the search for the ties' cut-off) looks only at the entries that share the top digit."""
    hist = torch.zeros(65536, dtype=torch.int64)
    tops: list[torch.Tensor] | None = [] if n <= CACHE_ELEMS else None
    for b in blocks():
        top = b.reshape(-1).view(torch.int16)[1::2] & 0x7FFF
        hist += torch.bincount(top, minlength=65536).cpu()
        if tops is not None:
            tops.append(top)
    cum = hist.cumsum(0)
    rank = n - k
    d0 = int(torch.searchsorted(cum, rank, right=True))
    rank -= int(cum[d0 - 1]) if d0 else 0
    above = int(cum[-1] - cum[d0])

    def candidates() -> Iterator[tuple[int, torch.Tensor, torch.Tensor]]:
        """(offset, positions in the block, low digits) of the entries whose top digit is d0."""
        offset = 0
        for i, b in enumerate(blocks()):
            halves = b.reshape(-1).view(torch.int16)
            top = tops[i] if tops is not None else halves[1::2] & 0x7FFF
            idx = _positions(top == d0)
            yield offset, idx, halves[0::2][idx].to(torch.int32) & 0xFFFF
            offset += top.numel()

    keep = int(hist[d0]) <= CACHE_ELEMS
    cands = list(candidates()) if keep else None
    hist1 = torch.zeros(65536, dtype=torch.int64)
    for _, _, low in cands if cands is not None else candidates():
        hist1 += torch.bincount(low, minlength=65536).cpu()
    cum1 = hist1.cumsum(0)
    d1 = int(torch.searchsorted(cum1, rank, right=True))
    above += int(cum1[-1] - cum1[d1])
    need = k - above  # entries equal to the threshold that are kept, the first ones by position
    seen, cut = 0, -1
    for offset, idx, low in cands if cands is not None else candidates():
        ties = idx[low == d1]
        if seen + ties.numel() >= need:
            cut = offset + int(ties[need - seen - 1])
            break
        seen += ties.numel()
    thr = torch.tensor([(d0 << 16) | d1], dtype=torch.int32).view(dtype)
    return float(thr), float(cut)
