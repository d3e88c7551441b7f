"""The fast magnitude threshold (radix select), trimming and TIES election against the previous
implementation, kept here verbatim as the reference: np.partition on a float copy, boolean masks.
The same k entries must be kept (ties at the threshold broken by flat position) and merged
values must be bit-identical."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from taskvec import TaskVector, compose
from taskvec.errors import ConfigError
from taskvec.methods import selection
from taskvec.methods.compose import ComposedSource, tensor_threshold
from taskvec.methods.selection import magnitude_threshold, select_threshold, trim_by_threshold
from taskvec.methods.ties import elect_and_merge

compose_module = __import__("taskvec.methods.compose", fromlist=["x"])


# ---- the previous implementation (float64 / numpy reference)
def ref_magnitude_threshold(x: torch.Tensor, density: float) -> tuple[float, float]:
    n = x.numel()
    k = int(density * n)
    if density >= 1 or k >= n:
        return 0.0, float(n)
    if k <= 0:
        return float("inf"), -1.0
    a = x.detach().reshape(-1).abs().numpy()
    thr = np.partition(a, n - k)[n - k]
    need = k - int(np.count_nonzero(a > thr))
    ties = np.flatnonzero(a == thr)
    return float(thr), float(ties[need - 1])


def ref_trim(deltas: torch.Tensor, thresholds: torch.Tensor, start: int = 0) -> torch.Tensor:
    thr = thresholds[:, 0].to(deltas.dtype)[:, None]
    cut = thresholds[:, 1][:, None]
    a = deltas.abs()
    pos = torch.arange(start, start + deltas.shape[1], dtype=torch.float64)[None, :]
    keep = (a > thr) | ((a == thr) & (pos <= cut))
    return deltas * keep


def ref_elect_and_merge(trimmed: torch.Tensor, weights: torch.Tensor, majority: str) -> torch.Tensor:
    sign = trimmed.sign()
    mass = trimmed.sum(0) if majority == "total" else sign.sum(0)
    elected = torch.where(mass >= 0, 1.0, -1.0).to(trimmed.dtype)
    agree = sign == elected
    weighted = trimmed * weights.to(trimmed.dtype)[:, None]
    total = (weighted * agree).sum(0)
    return total / agree.sum(0).clamp(min=1).to(trimmed.dtype)


def tied(n: int, dtype: torch.dtype, g: torch.Generator, zeros: float = 0.3) -> torch.Tensor:
    """Differences of two low-precision tensors: quantized, so many |x| are equal; some zeros."""
    a = (torch.randn(n, generator=g) * 0.02).to(dtype)
    b = (a.float() + torch.randn(n, generator=g) * 1e-3).to(dtype)
    x = b.float() - a.float()
    x[torch.rand(n, generator=g) < zeros] = 0.0
    return x.to(dtype)


DTYPES = [torch.float16, torch.bfloat16, torch.float32, torch.float64]
DENSITIES = [1e-6, 0.01, 0.2, 0.5, 0.9, 0.999, 1.0]


@pytest.fixture
def small_blocks(monkeypatch: pytest.MonkeyPatch) -> None:
    """Blocks of 1,000 entries, so every pass of the selection spans many blocks."""
    monkeypatch.setattr(selection, "BLOCK", 1000)


@pytest.mark.parametrize("dtype", DTYPES)
def test_threshold_equals_previous_implementation(dtype: torch.dtype, small_blocks: None) -> None:
    g = torch.Generator().manual_seed(0)
    for n in (1, 2, 7, 1000, 4099, 30_000):
        x = tied(n, dtype, g)
        ref_x = x.float() if dtype == torch.bfloat16 else x  # numpy has no bfloat16; the cast is exact
        for d in DENSITIES:
            assert magnitude_threshold(x, d) == ref_magnitude_threshold(ref_x, d), (n, d)
    many_ties = torch.randint(-3, 4, (20_000,), generator=g).to(dtype)  # 7 distinct values only
    for d in DENSITIES:
        ref_x = many_ties.float() if dtype == torch.bfloat16 else many_ties
        assert magnitude_threshold(many_ties, d) == ref_magnitude_threshold(ref_x, d)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_streamed_selection_equals_whole_tensor(dtype: torch.dtype, monkeypatch: pytest.MonkeyPatch) -> None:
    """Tensors too large to hold are selected by re-reading their slices on each pass."""
    monkeypatch.setattr(selection, "CACHE_ELEMS", 100)  # no digits kept between passes
    g = torch.Generator().manual_seed(1)
    x = tied(50_000, torch.float16, g).to(dtype)
    for d in DENSITIES:
        got = select_threshold(lambda: iter(x.split(777)), x.numel(), dtype, d)
        assert got == ref_magnitude_threshold(x, d)


def test_tensor_threshold_whole_or_streamed(monkeypatch: pytest.MonkeyPatch) -> None:
    g = torch.Generator().manual_seed(2)
    pre = {"w": (torch.randn(300, 200, generator=g) * 0.02).half()}
    ft = {"w": (pre["w"].float() + torch.randn(300, 200, generator=g) * 1e-3).half()}
    tv = TaskVector.from_checkpoints(pre, ft)
    want = ref_magnitude_threshold(tv["w"], 0.2)
    assert tensor_threshold(tv.source, "w", 0.2) == want
    monkeypatch.setattr(compose_module, "WHOLE_TENSOR_BYTES", 0)
    monkeypatch.setattr(compose_module, "BLOCK", 5000)
    assert tensor_threshold(tv.source, "w", 0.2) == want


def test_trim_and_election_equal_previous_implementation() -> None:
    g = torch.Generator().manual_seed(3)
    t, n = 5, 20_000
    whole = torch.stack([tied(n, torch.float16, g).float() for _ in range(t)])
    thresholds = torch.tensor([ref_magnitude_threshold(whole[i], 0.3) for i in range(t)], dtype=torch.float64)
    weights = torch.tensor([1.0, 0.5, 2.0, 1.0, 0.25])
    for start, stop in ((0, n), (0, 777), (5000, 9000), (n - 10, n)):
        d = whole[:, start:stop]
        trimmed = trim_by_threshold(d, thresholds, start)
        assert torch.equal(trimmed, ref_trim(d, thresholds, start))
        assert torch.equal((trimmed != 0).sum(1), (ref_trim(d, thresholds, start) != 0).sum(1))
        for majority in ("total", "frequency"):
            for w in (weights, torch.ones(t)):
                assert torch.equal(elect_and_merge(trimmed, w, majority), ref_elect_and_merge(trimmed, w, majority))
    kept = (trim_by_threshold(whole, thresholds, 0) != 0).sum(1)
    nonzero = (whole != 0).sum(1)
    assert torch.equal(kept, torch.minimum(torch.full_like(kept, int(0.3 * n)), nonzero))


@pytest.mark.parametrize("method", ["ties", "magnitude"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_merged_model_bit_identical_to_previous_implementation(method: str, dtype: torch.dtype) -> None:
    """A whole merge, sliced: the fast path against the previous one on fp16/bf16 checkpoints."""
    g = torch.Generator().manual_seed(4)
    shapes = {"emb": (257, 64), "w": (64, 64), "norm": (64,)}
    base = {k: (torch.randn(s, generator=g) * 0.02).to(dtype) for k, s in shapes.items()}
    fts = [
        {k: (v.float() + torch.randn(v.shape, generator=g) * 1e-3 * (i + 1)).to(dtype) for k, v in base.items()}
        for i in range(4)
    ]
    tvs = [TaskVector.from_checkpoints(base, ft) for ft in fts]
    weights = [1.0, 0.7, 1.3, 1.0]
    merged = compose(tvs, method, weights, density=0.2)
    src = merged.source
    assert isinstance(src, ComposedSource)
    for key in shapes:
        n = merged.spec(key).numel
        deltas = torch.stack([tv[key].reshape(-1) for tv in tvs])
        thresholds = torch.tensor([ref_magnitude_threshold(d, 0.2) for d in deltas], dtype=torch.float64)
        w = torch.tensor(weights)
        trimmed = ref_trim(deltas, thresholds)
        want = ref_elect_and_merge(trimmed, w, "total") if method == "ties" else torch.einsum("t,tn->n", w, trimmed)
        got = torch.cat([src.read_flat(key, s, min(n, s + 1000)) for s in range(0, n, 1000)])
        assert torch.equal(got, want)
        applied = (base[key].float().reshape(-1) + got).to(dtype)
        assert torch.equal(
            applied.view(torch.int16), (base[key].float().reshape(-1) + want).to(dtype).view(torch.int16)
        )


def test_device_cpu_is_the_same_path_and_cuda_is_checked() -> None:
    g = torch.Generator().manual_seed(5)
    tvs = [TaskVector.from_tensors({"w": torch.randn(50, 40, generator=g)}) for _ in range(3)]
    for method, params in (("ties", {"density": 0.3}), ("task_arithmetic", {}), ("magnitude", {"density": 0.5})):
        a = compose(tvs, method, **params)["w"]
        b = compose(tvs, method, device="cpu", **params)["w"]
        assert torch.equal(a, b)
        if torch.cuda.is_available():
            torch.testing.assert_close(compose(tvs, method, device="cuda", **params)["w"], a, rtol=1e-6, atol=1e-7)
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="no CUDA device"):
            compose(tvs, "ties", device="cuda")
    with pytest.raises(ConfigError, match="device 'tpu9'"):
        compose(tvs, "ties", device="tpu9")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_one_pass_merge_bit_identical_to_two_passes(monkeypatch: pytest.MonkeyPatch, dtype: torch.dtype) -> None:
    """Each tensor merged whole in one pass (thresholds bracketed from a sample, the columns near
    them recomputed) against the two-pass merge (exact thresholds first, then the blocks)."""
    from taskvec.methods import onepass

    monkeypatch.setattr(onepass, "SMALL_BYTES", 0)  # every tensor through the bracket
    monkeypatch.setattr(compose_module, "MERGE_BLOCK_BYTES", 1)  # blocks of 4096 columns: many blocks, tails
    monkeypatch.setattr(onepass, "SUB_BLOCK", 1024)  # merged in parts of 1024 to 2047 columns
    monkeypatch.setattr(onepass, "SAMPLE_STRIDE", 1)  # the whole sampled blocks: brackets narrow enough here
    outcome: list[tuple[str, bool]] = []  # (tensor, merged in one pass)
    merge_tensor = onepass.merge_tensor

    def recorded(job: onepass.Trim) -> torch.Tensor | None:
        table = merge_tensor(job)
        outcome.append((job.key, table is not None))
        return table

    monkeypatch.setattr(compose_module, "merge_tensor", recorded)
    g = torch.Generator().manual_seed(6)
    shapes = {"w": (700, 480), "v": (333_001,), "shifted": (600, 500)}
    base = {k: (torch.randn(s, generator=g) * 0.02).to(dtype) for k, s in shapes.items()}
    fts = []
    for i in range(4):
        ft = {k: (v.float() + torch.randn(v.shape, generator=g) * 1e-3 * (i + 1)).to(dtype) for k, v in base.items()}
        x = ft["shifted"].float()  # the last rows, between the sampled blocks, change much more: the bracket misses
        x[500:] = base["shifted"][500:].float() + (x[500:] - base["shifted"][500:].float()) * 30
        ft["shifted"] = x.to(dtype)
        fts.append(ft)
    tvs = [TaskVector.from_checkpoints(base, ft) for ft in fts]
    weights = [1.0, 0.7, 1.3, 0.45]
    cases = (("ties", {"density": 0.2}), ("ties", {"density": 0.3, "majority": "frequency"}), ("magnitude", {}))
    for method, params in cases:
        one, two = compose(tvs, method, weights, **params).source, compose(tvs, method, weights, **params).source
        assert isinstance(one, ComposedSource) and isinstance(two, ComposedSource)
        two._combine = None  # the two-pass path
        for key in shapes:
            n = one.spec(key).numel
            got = torch.cat([one.read_flat(key, s, min(n, s + 100_000)) for s in range(0, n, 100_000)])
            want = torch.cat([two.read_flat(key, s, e) for s, e in compose_module.chunks(n)])
            assert torch.equal(got.view(torch.int32), want.view(torch.int32)), (method, key)
            assert torch.equal(one.thresholds(key), two.thresholds(key)), (method, key)
    assert sum(ok for key, ok in outcome if key != "shifted") >= len(cases)  # the one-pass path ran...
    assert not any(ok for key, ok in outcome if key == "shifted")  # ...and fell back where its bracket missed
