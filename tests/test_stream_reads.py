"""The reads of a streamed merge: the finiteness check's shortcut, the base's slice cache (read
and cast once per slice, blocks served from it), reads written straight into a caller's buffer,
and the sparse search of the threshold selection, each against the plain computation."""

from __future__ import annotations

import pytest
import torch

from taskvec import TaskVector, compose
from taskvec.core.stream import LastSliceCache, read_cast, read_into
from taskvec.core.taskvector import all_finite
from taskvec.errors import NonFiniteError
from taskvec.io import DictSource
from taskvec.methods.compose import tensor_threshold
from taskvec.methods.selection import _positions, magnitude_threshold


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_all_finite_agrees_with_isfinite(dtype: torch.dtype) -> None:
    big = torch.finfo(dtype).max
    cases = [
        [],
        torch.randn(1000).tolist(),
        [big] * 100_000,  # finite entries whose sum overflows: the exact check decides
        [big, big, -big],
        [1.0, float("nan"), 2.0],
        [float("inf"), 0.0],
        [float("inf"), float("-inf")],  # sums to NaN
        [big, float("-inf")],
    ]
    for values in cases:
        x = torch.tensor(values, dtype=dtype)
        assert all_finite(x) == bool(torch.isfinite(x).all()), x


class CountingSource(DictSource):
    """A source that counts its reads."""

    def __init__(self, tensors: dict[str, torch.Tensor]):
        super().__init__(tensors, name="counted")
        self.reads = 0

    def read_flat(self, key: str, start: int = 0, stop: int | None = None) -> torch.Tensor:
        self.reads += 1
        return super().read_flat(key, start, stop)


def test_last_slice_cache_serves_blocks_and_casts_from_one_read() -> None:
    x = (torch.randn(1000, generator=torch.Generator().manual_seed(0)) * 0.02).half()
    src = CountingSource({"w": x})
    cache = LastSliceCache(src)
    assert torch.equal(cache.read_flat("w", 100, 600), x[100:600])
    for s, e in ((100, 200), (350, 600), (599, 600), (100, 600)):  # blocks inside the remembered slice
        assert torch.equal(cache.read_flat("w", s, e), x[s:e])
        for dt in (torch.float32, torch.float64, torch.float16):
            got = read_cast(cache, "w", s, e, dt)
            assert got.dtype == dt and torch.equal(got, x[s:e].to(dt))
    assert src.reads == 1
    assert torch.equal(cache.read_flat("w", 50, 150), x[50:150])  # not inside: read from the source
    assert torch.equal(read_cast(cache, "w", 0, None, torch.float32), x.float())  # whole tensors are not kept
    assert torch.equal(cache.read_flat("w", 60, 70), x[60:70])
    assert src.reads == 3
    assert torch.equal(read_cast(src, "w", 5, 9, torch.float32), x[5:9].float())  # any source


def test_read_into_equals_read_flat() -> None:
    g = torch.Generator().manual_seed(1)
    pre = {"w": (torch.randn(40, 30, generator=g) * 0.02).half(), "b": torch.randn(30, generator=g)}
    ft = {k: (v.float() + torch.randn(v.shape, generator=g) * 1e-3).to(v.dtype) for k, v in pre.items()}
    tvs = {
        "diff": TaskVector.from_checkpoints(pre, ft),
        "diff, cached base": TaskVector.from_checkpoints(LastSliceCache(DictSource(pre)), ft),
        "stored": TaskVector.from_tensors({k: v.half() for k, v in ft.items()}),
        "filtered": TaskVector.from_checkpoints(pre, ft).filter(["w"]),
        "sum": TaskVector.from_checkpoints(pre, ft) + TaskVector.from_checkpoints(pre, ft),  # no read_into: copied
    }
    for name, tv in tvs.items():
        for key in tv.keys():
            n = tv.spec(key).numel
            for s, e in ((0, n), (7, min(n, 300)), (n - 5, n)):
                want = tv.source.read_flat(key, s, e)
                for dt in (tv.spec(key).dtype, torch.float64):  # a wider buffer: computed as before, then cast
                    out = torch.full((e - s,), float("nan"), dtype=dt)
                    read_into(tv.source, key, s, e, out)
                    assert torch.equal(out, want.to(dt)), (name, key, s, e, dt)


def test_read_into_refuses_nonfinite_inputs() -> None:
    pre = {"w": torch.zeros(10)}
    ft = {"w": torch.zeros(10)}
    ft["w"][3] = float("inf")
    tv = TaskVector.from_checkpoints(DictSource(pre, name="pre"), DictSource(ft, name="ft"))
    with pytest.raises(NonFiniteError, match=r"ft: tensor 'w' has 1 .* index 3: inf"):
        read_into(tv.source, "w", 0, 10, torch.empty(10))
    ok = TaskVector.from_checkpoints(DictSource(pre), DictSource(ft), allow_nonfinite=True)
    out = torch.empty(10)
    read_into(ok.source, "w", 0, 10, out)
    assert torch.equal(out.isinf(), ft["w"].isinf())


def test_positions_equal_nonzero() -> None:
    g = torch.Generator().manual_seed(2)
    for n in (0, 1, 7, 8, 9, 64, 1001, 65_543):
        for p in (0.0, 0.001, 0.1, 0.5, 1.0):
            mask = torch.rand(n, generator=g) < p
            for m in (mask, mask[3:], mask[8:]):  # views at any offset
                assert torch.equal(_positions(m), torch.nonzero(m).reshape(-1)), (n, p)


def test_threshold_buffer_reused_gives_the_same_thresholds() -> None:
    g = torch.Generator().manual_seed(3)
    pre = {"w": (torch.randn(300, 200, generator=g) * 0.02).half(), "v": (torch.randn(7, generator=g)).half()}
    fts = [{k: (v.float() + torch.randn(v.shape, generator=g) * 1e-3).half() for k, v in pre.items()} for _ in range(3)]
    tvs = [TaskVector.from_checkpoints(pre, ft) for ft in fts]
    buffer = torch.full((300 * 200 * 4,), 255, dtype=torch.uint8)  # holds any earlier tensor's bytes
    for key in ("w", "v"):
        for tv in tvs:
            want = magnitude_threshold(tv[key], 0.2)
            assert tensor_threshold(tv.source, key, 0.2) == want
            assert tensor_threshold(tv.source, key, 0.2, buffer=buffer) == want
            assert tensor_threshold(tv.source, key, 0.2, buffer=buffer[:10]) == want  # too small: not used
    merged = compose(tvs, "ties", density=0.2)  # thresholds of both tensors through the shared buffers
    for key in ("w", "v"):
        want_thr = torch.tensor([magnitude_threshold(tv[key], 0.2) for tv in tvs], dtype=torch.float64)
        assert torch.equal(merged.source.thresholds(key), want_thr)  # type: ignore[attr-defined]


def test_frozen_gc_leaves_the_objects_of_the_time_out_and_gives_them_back() -> None:
    import gc

    from taskvec.core.stream import frozen_gc

    # (the frozen count only falls while frozen, as frozen objects are freed: compared with > 0)
    assert gc.get_freeze_count() == 0
    with frozen_gc():
        assert gc.get_freeze_count() > 0
        with frozen_gc():  # nested (a pass inside a pass): still frozen, unfrozen once at the outer exit
            assert gc.get_freeze_count() > 0
        assert gc.get_freeze_count() > 0
    assert gc.get_freeze_count() == 0

    gc.freeze()  # a caller's own freeze is left as it is
    try:
        with frozen_gc():
            pass
        assert gc.get_freeze_count() > 0
    finally:
        gc.unfreeze()
    assert gc.get_freeze_count() == 0


def test_a_streamed_merge_unfreezes_the_collector_even_when_it_fails(tmp_path) -> None:
    import gc

    from taskvec.core.stream import write_checkpoint
    from taskvec.io import TensorSpec

    def broken(key: str, start: int, stop: int) -> torch.Tensor:
        assert gc.get_freeze_count() > 0  # the objects alive before the pass are out of its collections
        raise RuntimeError("slice failed")

    with pytest.raises(RuntimeError, match="slice failed"):
        write_checkpoint(tmp_path / "out.safetensors", {"w": TensorSpec((4,), torch.float32)}, broken)
    assert gc.get_freeze_count() == 0
    assert not (tmp_path / "out.safetensors").exists()
