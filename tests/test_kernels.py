"""The compiled kernels of the trimming merges against the torch operations they replace: the
same values bit for bit, on fp16-quantized deltas (many ties at the thresholds), NaN and zeros,
and task counts across the points where torch changes its order of summation (5 and 16 rows)."""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from taskvec import TaskVector, compose, native
from taskvec.methods import kernels, onepass
from taskvec.methods.compose import ComposedSource
from taskvec.methods.ties import elect_and_merge

compose_module = __import__("taskvec.methods.compose", fromlist=["x"])

pytestmark = pytest.mark.skipif(not kernels.available(), reason="no C compiler here: the kernels are not built")


@pytest.fixture
def torch_only(monkeypatch: pytest.MonkeyPatch) -> None:
    """Run the torch operations instead of the kernels."""
    monkeypatch.setattr(kernels, "_loaded", [None])


def quantized(t: int, n: int, seed: int, nan: int = 0) -> torch.Tensor:
    """(t, n) differences of fp16 weights: many equal magnitudes, some zeros, `nan` NaN entries."""
    g = torch.Generator().manual_seed(seed)
    a = (torch.randn(t, n, generator=g) * 0.02).half()
    b = (a.float() + torch.randn(t, n, generator=g) * 1e-3).half()
    x = b.float() - a.float()
    x[torch.rand(t, n, generator=g) < 0.2] = 0.0
    if nan:
        x.view(-1)[torch.randperm(t * n, generator=g)[:nan]] = float("nan")
    return x


def bits(x: torch.Tensor) -> torch.Tensor:
    return x.contiguous().view(torch.int32)


@pytest.mark.parametrize("t", [*range(1, 41), 64, 100])
def test_sums_in_torch_order(t: int) -> None:
    """The order found at first use reproduces torch's x.sum(0) on other shapes and data."""
    group = kernels.sum_group(t)
    assert group in kernels.GROUPS
    g = torch.Generator().manual_seed(100 + t)
    lib = kernels._lib()
    assert lib is not None
    for n in (16, 777, 65536 + 33):
        x = torch.randn(t, n, generator=g) * torch.exp(5 * torch.randn(t, n, generator=g))
        got = torch.empty(n)
        lib.tv_colsum(x.data_ptr(), n, t, n, group, got.data_ptr())
        assert torch.equal(bits(got), bits(x.sum(0)))
    if t >= 5:  # another order rounds differently: the check at first use can tell them apart
        other = next(k for k in kernels.GROUPS if k != group)
        x = torch.randn(t, 1000, generator=g) * torch.exp(6 * torch.randn(t, 1000, generator=g))
        got = torch.empty(1000)
        lib.tv_colsum(x.data_ptr(), 1000, t, 1000, other, got.data_ptr())
        assert not torch.equal(bits(got), bits(x.sum(0)))


def torch_bookkeeping(d: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, main: int) -> tuple:
    a = d.abs()
    keep = (a > hi[:, None]).float()
    inside = ((a >= lo[:, None]).float() - keep).sum(0) > 0
    idx = inside[:main].nonzero().reshape(-1)
    return d * keep, keep.sum(1).long(), idx, d[:, idx], bool(inside[main:].any())


@pytest.mark.parametrize("t", [1, 3, 8, 17])
def test_trim_block(t: int) -> None:
    d_all = quantized(t, 5000, seed=t, nan=3)
    d = d_all[:, 37:4937]  # rows strided, as a block of a larger buffer
    hi = torch.tensor([float(torch.quantile(r[r == r].abs(), 0.8)) for r in d])
    lo = hi * 0.97
    n = d.shape[1]
    main = n - n % 256
    tr = torch.empty(t, n)
    pos, vals = torch.empty(n, dtype=torch.int64), torch.empty(t, n)
    above, m, tail = kernels.trim_block(d, lo, hi, main, tr, pos, vals)
    want_tr, want_above, want_idx, want_vals, want_tail = torch_bookkeeping(d, lo, hi, main)
    assert torch.equal(bits(tr), bits(want_tr))  # NaN stays NaN, zeros keep their sign
    assert torch.equal(above, want_above) and (m, tail) == (want_idx.numel(), want_tail) and m > 0
    assert torch.equal(pos[:m], want_idx) and torch.equal(bits(vals[:, :m]), bits(want_vals))


@pytest.mark.parametrize("t", [1, 2, 4, 5, 8, 16, 17, 40])
@pytest.mark.parametrize("majority", ["total", "frequency"])
def test_election(t: int, majority: str, monkeypatch: pytest.MonkeyPatch) -> None:
    trimmed = quantized(t, 3000, seed=10 + t, nan=2)
    g = torch.Generator().manual_seed(t)
    for weights in (torch.ones(t), torch.rand(t, generator=g) * 2 - 0.5):
        got = elect_and_merge(trimmed, weights, majority)
        with monkeypatch.context() as m:
            m.setattr(kernels, "_loaded", [None])
            want = elect_and_merge(trimmed, weights, majority)
        assert torch.equal(bits(got), bits(want))


@pytest.mark.parametrize("t", [1, 2, 5, 8, 16, 17, 33])
@pytest.mark.parametrize("majority", ["total", "frequency"])
def test_fused_block_equals_the_parts(t: int, majority: str) -> None:
    """One kernel call over a block against the trim, election and torch sums part by part."""
    n = 3 * 1024 + 300  # parts of 1024, then a part that is not a multiple of 32 or 256
    d = quantized(t, n + 64, seed=20 + t, nan=2)[:, 64:]
    hi = torch.tensor([float(torch.quantile(r[r == r].abs(), 0.75)) for r in d])
    lo = hi * 0.98
    combine = onepass.Combine(lambda tr, w, sc: elect_and_merge(tr, w, majority, sc), majority)
    group = kernels.sum_group(t)
    assert group is not None
    for weights in (torch.ones(t), torch.linspace(0.3, 1.7, t)):
        old = onepass.SUB_BLOCK
        onepass.SUB_BLOCK = 1024
        try:
            out_parts = torch.empty(n)
            parts = [
                onepass._merge_block(d[:, a:b], a, lo, hi, weights, combine, out_parts) for a, b in onepass._parts(n)
            ]
        finally:
            onepass.SUB_BLOCK = old
        out_fused = torch.empty(n)
        fused = onepass._merge_block(d, 0, lo, hi, weights, combine, out_fused, group)
        assert torch.equal(bits(out_fused), bits(out_parts))
        assert torch.equal(fused.above, torch.stack([p.above for p in parts]).sum(0))
        assert torch.equal(fused.pos, torch.cat([p.pos for p in parts]))
        assert torch.equal(bits(fused.cols), bits(torch.cat([p.cols for p in parts], 1)))
        tails = [p.tail for p in parts if p.tail is not None]
        assert (fused.tail is None) == (not tails)
        if fused.tail is not None:
            assert fused.tail[0] == tails[0][0] and torch.equal(bits(fused.tail[1]), bits(tails[0][1]))


def test_order_statistics_and_selection() -> None:
    g = torch.Generator().manual_seed(7)
    x = quantized(1, 50_000, seed=7)[0]
    x[:5] = torch.tensor([float("inf"), -float("inf"), 0.0, -0.0, 1e-30])
    keys = x.abs().view(torch.int32).sort(descending=True).values.view(torch.float32)
    for r_hi, r_lo in ((1, 1), (2, 3), (9000, 11000), (49_000, 50_000)):
        assert kernels.abs_order_stats(x, r_hi, r_lo) == (float(keys[r_hi - 1]), float(keys[r_lo - 1]))
    with pytest.raises(ValueError, match="out of range"):
        kernels.abs_order_stats(x, 0, 5)
    y = quantized(1, 20_000, seed=8)[0]
    pos = torch.randperm(200_000, generator=g)[:20_000].long()  # positions need not be sorted
    lo, hi = 2e-4, 6e-4
    cand, cpos = kernels.candidates(y, pos, lo, hi)
    inside = (y.abs() >= lo) & (y.abs() <= hi)
    assert torch.equal(cand, y.abs()[inside]) and torch.equal(cpos, pos[inside])
    for r in (1, 7, cand.numel() // 2, cand.numel()):
        assert kernels.select(cand, cpos, r) == onepass._select(cand, cpos, r)
    assert kernels.select(cand, cpos, 0) is None and kernels.select(cand, cpos, cand.numel() + 1) is None


def test_exact_trim() -> None:
    t, m = 6, 4000
    d = quantized(t, m, seed=9, nan=2)
    g = torch.Generator().manual_seed(9)
    pos = torch.randperm(50_000, generator=g)[:m].long()
    table = torch.tensor(
        [[float(torch.quantile(r[r == r].abs(), 0.8)), float(pos[m // 2])] for r in d], dtype=torch.float64
    )
    out = torch.zeros(t, m + 100)
    kernels.exact_trim(d, pos, table[:, 0].float(), table[:, 1].long(), out)
    assert torch.equal(bits(out[:, :m]), bits(onepass.exact_trim(d, table, pos)))
    assert not out[:, m:].any()


@pytest.mark.parametrize("t", [3, 17])
def test_merge_bit_identical_with_and_without_kernels(t: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """Whole one-pass merges of fp16 checkpoints: TIES (fused kernel), magnitude (trim kernel)."""
    monkeypatch.setattr(onepass, "SMALL_BYTES", 0)
    monkeypatch.setattr(compose_module, "MERGE_BLOCK_BYTES", 1)  # many blocks, with tails
    monkeypatch.setattr(onepass, "SAMPLE_STRIDE", 1)
    g = torch.Generator().manual_seed(t)
    shapes = {"w": (300, 400), "v": (50_001,)}
    base = {k: (torch.randn(s, generator=g) * 0.02).half() for k, s in shapes.items()}
    tvs = [
        TaskVector.from_checkpoints(
            base,
            {k: (v.float() + torch.randn(v.shape, generator=g) * 1e-3 * (1 + i % 3)).half() for k, v in base.items()},
        )
        for i in range(t)
    ]
    weights = [1.0 + 0.1 * (i % 4) for i in range(t)]
    calls: list[str] = []  # the kernels the fast runs went through

    def counted(name: str) -> Callable[..., object]:
        kernel = getattr(kernels, name)

        def call(*args: object, **kwargs: object) -> object:
            calls.append(name)
            return kernel(*args, **kwargs)

        return call

    for name in ("ties_block", "trim_block"):
        monkeypatch.setattr(kernels, name, counted(name))
    cases = (("ties", {"density": 0.2}), ("ties", {"density": 0.3, "majority": "frequency"}), ("magnitude", {}))
    for method, params in cases:
        for w in (weights, [1.0] * t):
            fast = compose(tvs, method, w, **params).source
            with monkeypatch.context() as m:
                m.setattr(kernels, "_loaded", [None])
                slow = compose(tvs, method, w, **params).source
                assert isinstance(slow, ComposedSource)
                want = {k: slow.read_flat(k) for k in shapes}
                want_thr = {k: slow.thresholds(k) for k in shapes}
            assert isinstance(fast, ComposedSource)
            for k in shapes:
                assert torch.equal(bits(fast.read_flat(k)), bits(want[k])), (method, k)
                assert torch.equal(fast.thresholds(k), want_thr[k])
    assert calls.count("ties_block") >= 40 and calls.count("trim_block") >= 20  # one pass, many blocks


def test_brackets_equal_with_and_without_kernels(torch_only: None) -> None:
    sample = quantized(4, 40_000, seed=11)
    sample[2, :10] = float("nan")
    want = [onepass._bracket(r, 0.2) for r in sample]
    kernels._loaded[:] = []  # look for the library again
    assert kernels.available()
    assert [onepass._bracket(r, 0.2) for r in sample] == want
    assert want[0] is not None and all(math.isfinite(v) for v in want[0])


def test_build_cache_and_fallbacks(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Built once into $TASKVEC_CACHE/kernels (renamed into place: no temporary left); no
    compiler, TASKVEC_NATIVE=0 or a source that does not compile give None, the last with a
    warning naming the file."""
    monkeypatch.setenv("TASKVEC_CACHE", str(tmp_path))
    monkeypatch.setattr(native, "_loaded", {})
    lib = native.load(kernels._SOURCE)
    assert lib is not None and hasattr(lib, "tv_ties_block")
    built = list((tmp_path / "kernels").iterdir())
    assert len(built) == 1 and built[0].suffix == ".so"
    inode = built[0].stat().st_ino  # a new build is renamed over it: another inode
    monkeypatch.setattr(native, "_loaded", {})
    assert native.load(kernels._SOURCE) is not None  # found in the cache, not built again
    assert list((tmp_path / "kernels").iterdir()) == built and built[0].stat().st_ino == inode
    monkeypatch.setattr(native, "_loaded", {})
    monkeypatch.setenv("TASKVEC_NATIVE", "0")
    assert native.load(kernels._SOURCE) is None
    monkeypatch.delenv("TASKVEC_NATIVE")
    monkeypatch.setenv("CC", str(tmp_path / "no-such-cc"))
    assert native.load(kernels._SOURCE) is None
    monkeypatch.delenv("CC")
    folder = tmp_path / "kernels"
    day = 86400.0
    stale, recent = folder / "kernels-0123456789abcdef.so", folder / "kernels-fedcba9876543210.so"
    others = [folder / "kernels-notes.so", folder / "README.txt", folder / "other-0123456789abcdef.so"]
    for p in [stale, recent, *others]:
        p.write_bytes(b"x")
    now = built[0].stat().st_mtime
    os.utime(stale, (now - 40 * day, now - 40 * day))
    os.utime(recent, (now - 2 * day, now - 2 * day))
    built[0].unlink()  # a new build: the builds no process loaded for 30 days go, nothing else
    monkeypatch.setattr(native, "_loaded", {})
    assert native.load(kernels._SOURCE) is not None
    assert sorted(p.name for p in folder.iterdir()) == sorted([built[0].name, recent.name, *(p.name for p in others)])
    for p in [recent, *others]:
        p.unlink()
    assert "built (" in native.describe(kernels._SOURCE)
    monkeypatch.setenv("TASKVEC_NATIVE", "0")
    assert native.describe(kernels._SOURCE) == "off (TASKVEC_NATIVE=0)"
    monkeypatch.delenv("TASKVEC_NATIVE")
    monkeypatch.setattr(native, "_loaded", {})
    monkeypatch.setenv("CC", str(tmp_path / "no-such-cc"))
    assert native.describe(kernels._SOURCE).startswith("not built: no C compiler")
    monkeypatch.delenv("CC")
    bad = tmp_path / "bad.c"
    bad.write_text("int broken(void) { return }\n")
    with pytest.warns(RuntimeWarning, match="building bad.c"):
        assert native.load(bad) is None
    assert sorted(p.name for p in (tmp_path / "kernels").iterdir()) == [built[0].name]
