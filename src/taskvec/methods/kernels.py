"""Fused CPU kernels of the trimming merges (`kernels.c`), for float32 blocks on the CPU.

Each kernel does in one pass what several torch operations do, with the same per-entry
arithmetic, so the merged output is bit-identical whether it runs or not (the tests compare
both). Sums across tasks are torch's own, except in the fused TIES kernel, which repeats torch's
order of `x.sum(0)` where a check against torch at first use shows it does (`sum_group`). Where
no C compiler is installed, or with TASKVEC_NATIVE=0, `available()` is False and the callers run
the torch operations.
"""

from __future__ import annotations

import ctypes
import threading
from collections.abc import Callable
from pathlib import Path

import torch

from taskvec.core.stream import one_torch_thread
from taskvec.native import describe, load

_P, _I = ctypes.c_void_p, ctypes.c_int64
_SOURCE = Path(__file__).with_name("kernels.c")


_loaded: list[ctypes.CDLL | None] = []  # the library once looked for (None: not available)


def _lib() -> ctypes.CDLL | None:
    if _loaded:
        return _loaded[0]
    lib = load(_SOURCE)
    if lib is not None:
        lib.tv_trim_block.argtypes = [_P, _I, _I, _I, _I, _P, _P, _P, _P, _P, _P, _I, _P]
        lib.tv_trim_block.restype = _I
        lib.tv_elect.argtypes = [_P, _I, _I, _I, _P, _P, _P, _P]
        lib.tv_elect.restype = None
        lib.tv_abs_order_stats.argtypes = [_P, _I, _I, _I, _P, _P]
        lib.tv_abs_order_stats.restype = _I
        lib.tv_candidates.argtypes = [_P, _I, _P, ctypes.c_float, ctypes.c_float, _P, _P]
        lib.tv_candidates.restype = _I
        lib.tv_select.argtypes = [_P, _P, _I, _I, _P, _P]
        lib.tv_select.restype = _I
        lib.tv_exact_trim.argtypes = [_P, _I, _I, _I, _P, _P, _P, _P, _I]
        lib.tv_exact_trim.restype = None
        lib.tv_colsum.argtypes = [_P, _I, _I, _I, _I, _P]
        lib.tv_colsum.restype = _I
        lib.tv_ties_block.argtypes = [_P, _I, _I, _I, _I, _P, _P, _I, _P, _I, _P, _P, _P, _P, _I, _P]
        lib.tv_ties_block.restype = _I
    _loaded[:] = [lib]
    return lib


def available() -> bool:
    """Whether the kernels are built and enabled here."""
    return _lib() is not None


def status() -> str:
    """Whether the kernels are in use here, and why not (`taskvec methods` prints it)."""
    return describe(_SOURCE)


def fits(*tensors: torch.Tensor) -> bool:
    """Whether the kernels can take these 1-D or 2-D tensors: float32 on the CPU, rows contiguous."""
    return all(x.dtype == torch.float32 and x.is_cpu and x.stride(-1) == 1 for x in tensors)


def trim_block(
    d: torch.Tensor,
    lo: torch.Tensor,
    hi: torch.Tensor,
    main: int,
    trimmed: torch.Tensor,
    pos: torch.Tensor,
    vals: torch.Tensor,
) -> tuple[torch.Tensor, int, bool]:
    """Trim block d (T, n) as if each task's threshold were hi[t], into `trimmed` (T, n contiguous):
    d where |d| > hi, else d * 0. Returns (entries above hi per task (T,) int64, m, tail): the m
    columns before `main` where some task has lo <= |d| <= hi, in increasing order, are in
    pos[:m] and their values in vals[:, :m]; `tail` says whether a column from `main` on has one.
    `pos` (int64, n) and `vals` (T, n) are buffers of the caller."""
    lib = _lib()
    assert lib is not None and fits(trimmed) and trimmed.is_contiguous()
    return _block(lib.tv_trim_block, d, lo, hi, main, [trimmed.data_ptr()], pos, vals)


def _block(
    kernel: Callable[..., int],
    d: torch.Tensor,
    lo: torch.Tensor,
    hi: torch.Tensor,
    main: int,
    specific: list[int],
    pos: torch.Tensor,
    vals: torch.Tensor,
) -> tuple[torch.Tensor, int, bool]:
    """Call a block kernel: (d, its row stride, T, n, main, lo, hi, *specific, above, pos, vals,
    vals' row stride, tail flag) -> (above, m, tail)."""
    assert fits(d, lo, hi, vals) and lo.is_contiguous() and hi.is_contiguous() and pos.dtype == torch.int64
    t, n = d.shape
    above = torch.zeros(t, dtype=torch.int64)
    tail = ctypes.c_int64(0)
    m = kernel(
        d.data_ptr(),
        d.stride(0),
        t,
        n,
        main,
        lo.data_ptr(),
        hi.data_ptr(),
        *specific,
        above.data_ptr(),
        pos.data_ptr(),
        vals.data_ptr(),
        vals.stride(0),
        ctypes.addressof(tail),
    )
    if m < 0:
        raise MemoryError("taskvec kernel: out of memory")
    return above, int(m), bool(tail.value)


def elect(trimmed: torch.Tensor, mass: torch.Tensor, weights: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """TIES' sign election and agreement given the per-column `mass`: writes into `out` (T, n
    contiguous) the (weighted) trimmed deltas that agree with the elected sign, zeros elsewhere,
    and returns the per-column count of agreeing tasks (at least 1)."""
    lib = _lib()
    assert lib is not None and fits(trimmed, mass, weights, out) and out.is_contiguous() and mass.is_contiguous()
    t, n = trimmed.shape
    count = torch.empty(n, dtype=torch.float32)
    w = weights.contiguous()
    lib.tv_elect(
        trimmed.data_ptr(),
        trimmed.stride(0),
        t,
        n,
        mass.data_ptr(),
        w.data_ptr(),
        out.data_ptr(),
        count.data_ptr(),
    )
    return count


def abs_order_stats(x: torch.Tensor, r_hi: int, r_lo: int) -> tuple[float, float]:
    """The r_hi-th and r_lo-th largest |x| (1-based ranks, r_hi <= r_lo <= x.numel()) of a
    contiguous float32 vector, by the order of |x|'s bit patterns (a NaN ranks above infinity)."""
    lib = _lib()
    assert lib is not None and fits(x) and x.is_contiguous() and x.dim() == 1
    work = torch.empty(x.numel(), dtype=torch.int32)
    out = torch.empty(2, dtype=torch.float32)
    if lib.tv_abs_order_stats(x.data_ptr(), x.numel(), r_hi, r_lo, work.data_ptr(), out.data_ptr()) != 0:
        raise ValueError(f"ranks {r_hi}, {r_lo} out of range for {x.numel()} entries (or out of memory)")
    hi, lo = out.tolist()
    return hi, lo


def candidates(x: torch.Tensor, pos: torch.Tensor, lo: float, hi: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(|x|, pos) of the entries of the float32 vector x with lo <= |x| <= hi (lo and hi float32
    values), in order; pos (int64) gives each entry's flat position."""
    lib = _lib()
    assert lib is not None and fits(x) and x.dim() == 1 and pos.dtype == torch.int64 and pos.is_contiguous()
    m = x.numel()
    k = lib.tv_candidates(x.data_ptr(), m, pos.data_ptr(), lo, hi, None, None)  # counted first: exact buffers
    cand, cpos = torch.empty(k + 1, dtype=torch.float32), torch.empty(k + 1, dtype=torch.int64)
    lib.tv_candidates(x.data_ptr(), m, pos.data_ptr(), lo, hi, cand.data_ptr(), cpos.data_ptr())
    return cand[:k], cpos[:k]


def select(cand: torch.Tensor, pos: torch.Tensor, r: int) -> tuple[float, float] | None:
    """(threshold, cut) that keeps the top r of the candidates |x| (float32, no NaN) at flat
    positions pos (int64): the r-th largest, and the cut-off position among the entries equal to
    it (see `onepass._select`); None when r is not in [1, len(cand)]."""
    lib = _lib()
    assert lib is not None and fits(cand) and cand.is_contiguous() and pos.is_contiguous()
    assert pos.dtype == torch.int64 and pos.numel() == cand.numel()
    thr, cut = ctypes.c_float(0.0), ctypes.c_int64(0)
    if lib.tv_select(cand.data_ptr(), pos.data_ptr(), cand.numel(), r, ctypes.addressof(thr), ctypes.addressof(cut)):
        return None
    return float(thr.value), float(cut.value)


def exact_trim(d: torch.Tensor, pos: torch.Tensor, thr: torch.Tensor, cut: torch.Tensor, out: torch.Tensor) -> None:
    """out[:, :m] = d * (|d| > thr or (|d| == thr and pos <= cut)), per task (row); thr float32
    (T,), cut int64 (T,), pos int64 (m,) the columns' flat positions."""
    lib = _lib()
    assert lib is not None and fits(d, thr, out) and thr.is_contiguous() and cut.is_contiguous()
    assert pos.dtype == cut.dtype == torch.int64 and pos.is_contiguous()
    t, m = d.shape
    lib.tv_exact_trim(
        d.data_ptr(), d.stride(0), t, m, pos.data_ptr(), thr.data_ptr(), cut.data_ptr(), out.data_ptr(), out.stride(0)
    )


GROUPS = (32, 64, 16)  # torch's column groups of x.sum(0): 4 vector widths (AVX2, AVX-512, 128-bit)
MIN_COLS = 16  # narrower arrays are summed by torch in yet another order
_groups: dict[int, int | None] = {}
_groups_lock = threading.Lock()


def sum_group(t: int) -> int | None:
    """The column group with which `tv_colsum` sums (t, n) arrays over their rows exactly as
    torch's x.sum(0) does on one thread here, or None when it cannot (another torch, another
    CPU): the fused TIES kernel is then not used. Found once per t by comparing both on random
    arrays of a wide range of magnitudes (a different order of the same additions rounds
    differently on them)."""
    with _groups_lock:
        if t in _groups:
            return _groups[t]
    lib = _lib()
    found = None
    if lib is not None and t >= 1:
        gen = torch.Generator().manual_seed(t)
        tries = [
            torch.randn(t, n, generator=gen) * torch.exp(6 * torch.randn(t, n, generator=gen)) for n in (1000, 4133)
        ]
        with one_torch_thread():
            refs = [x.sum(0) for x in tries]
        for group in GROUPS:
            ok = True
            for x, ref in zip(tries, refs, strict=True):
                got = torch.empty(x.shape[1], dtype=torch.float32)
                lib.tv_colsum(x.data_ptr(), x.stride(0), t, x.shape[1], group, got.data_ptr())
                ok = ok and torch.equal(got.view(torch.int32), ref.view(torch.int32))
            if ok:
                found = group
                break
    with _groups_lock:
        _groups[t] = found
    return found


def ties_block(
    d: torch.Tensor,
    lo: torch.Tensor,
    hi: torch.Tensor,
    weights: torch.Tensor,
    by_count: bool,
    group: int,
    main: int,
    out: torch.Tensor,
    pos: torch.Tensor,
    vals: torch.Tensor,
) -> tuple[torch.Tensor, int, bool]:
    """TIES of block d (T, n >= MIN_COLS) as if each threshold were hi[t], merged into `out`
    (n,), bit-identical to `elect_and_merge` of `trim_block`'s output; returns what `trim_block`
    returns. `group` is `sum_group(T)`; `by_count` elects the sign by count instead of mass."""
    lib = _lib()
    assert lib is not None and fits(weights, out) and out.is_contiguous() and weights.is_contiguous()
    assert d.shape[1] >= MIN_COLS
    specific = [group, weights.data_ptr(), int(by_count), out.data_ptr()]
    return _block(lib.tv_ties_block, d, lo, hi, main, specific, pos, vals)
