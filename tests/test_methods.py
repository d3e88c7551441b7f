"""Every merge method against an exact float64 reference, and against PEFT's merge utilities."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from peft.utils import merge_utils as peft

from taskvec import TaskVector, UnknownMethodError, compose
from taskvec.errors import ConfigError
from taskvec.methods import list_methods
from taskvec.methods.compose import ComposedSource
from taskvec.methods.dare import block_seed

SHAPES = {"w": (40, 30), "b": (17,), "s": (1,)}


def task_vectors(n: int = 4, seed: int = 0) -> tuple[list[TaskVector], list[dict[str, np.ndarray]]]:
    rng = np.random.default_rng(seed)
    raw = [{k: rng.standard_normal(s) for k, s in SHAPES.items()} for _ in range(n)]
    return [TaskVector.from_tensors({k: torch.from_numpy(v) for k, v in r.items()}) for r in raw], raw


# ---- independent numpy references, written from the papers' definitions
def ref_trim(x: np.ndarray, density: float) -> np.ndarray:
    k = int(density * x.size)
    flat = x.ravel()
    keep = np.zeros(x.size, dtype=bool)
    if k > 0:
        keep[np.argsort(-np.abs(flat), kind="stable")[:k]] = True
    return np.where(keep.reshape(x.shape), x, 0.0)


def ref_ties(xs: list[np.ndarray], w: list[float], density: float, majority: str = "total") -> np.ndarray:
    t = np.stack([ref_trim(x, density) for x in xs])
    elected = np.where((t.sum(0) if majority == "total" else np.sign(t).sum(0)) >= 0, 1.0, -1.0)
    agree = np.sign(t) == elected
    num = (t * np.asarray(w).reshape(-1, *[1] * xs[0].ndim) * agree).sum(0)
    return num / np.maximum(agree.sum(0), 1)


def test_task_arithmetic_and_negation_exact() -> None:
    tvs, raw = task_vectors()
    w = [0.3, -0.5, 1.2, 0.0]
    ta, neg = compose(tvs, "task_arithmetic", w), compose(tvs, "negation", w)
    for k in SHAPES:
        ref = sum(wi * r[k] for wi, r in zip(w, raw, strict=False))
        np.testing.assert_allclose(ta[k].numpy(), ref, rtol=1e-13, atol=1e-15)
        np.testing.assert_allclose(neg[k].numpy(), -ref, rtol=1e-13, atol=1e-15)


@pytest.mark.parametrize("density", [0.1, 0.2, 0.5, 1.0])
@pytest.mark.parametrize("majority", ["total", "frequency"])
def test_ties_exact(density: float, majority: str) -> None:
    tvs, raw = task_vectors()
    w = [1.0, 0.5, 0.8, 1.3]
    merged = compose(tvs, "ties", w, density=density, majority=majority)
    for k in SHAPES:
        ref = ref_ties([r[k] for r in raw], w, density, majority)
        np.testing.assert_allclose(merged[k].numpy(), ref, rtol=1e-13, atol=1e-15)


@pytest.mark.parametrize("density", [0.05, 0.3, 1.0])
def test_magnitude_exact(density: float) -> None:
    tvs, raw = task_vectors()
    w = [0.7, 1.0, -0.2, 0.4]
    merged = compose(tvs, "magnitude", w, density=density)
    for k in SHAPES:
        ref = sum(wi * ref_trim(r[k], density) for wi, r in zip(w, raw, strict=False))
        np.testing.assert_allclose(merged[k].numpy(), ref, rtol=1e-13, atol=1e-15)


def test_dare_exact_given_its_masks() -> None:
    """DARE = sum_t w_t m_t * tau_t / p with m_t ~ Bernoulli(p) drawn from task t's own seed (one mask block here)."""
    tvs, raw = task_vectors()
    w, p, seed = [1.0, 0.5, 0.8, 1.3], 0.3, 11
    merged = compose(tvs, "dare", w, density=p, seed=seed)
    for k in SHAPES:
        masks = [
            torch.bernoulli(
                torch.full(SHAPES[k], p), generator=torch.Generator().manual_seed(block_seed(seed, k, t, 0))
            )
            .double()
            .numpy()
            for t in range(len(raw))
        ]
        ref = sum(wi * m * r[k] / p for wi, m, r in zip(w, masks, raw, strict=False))
        np.testing.assert_allclose(merged[k].numpy(), ref, rtol=1e-13, atol=1e-15)
        if k == "w":  # 4 x 1200 draws keep about `density` of the entries
            assert abs(np.mean([m.mean() for m in masks]) - p) < 0.03
    # reproducible for a seed, different for another
    assert torch.equal(compose(tvs, "dare", w, density=p, seed=seed)["w"], merged["w"])
    assert not torch.equal(compose(tvs, "dare", w, density=p, seed=seed + 1)["w"], merged["w"])


# ---- cross-checks against PEFT on the same inputs
def _peft_inputs(key: str):
    tvs, raw = task_vectors(seed=5)
    return tvs, [torch.from_numpy(r[key]) for r in raw], torch.tensor([1.0, 0.6, 0.9, 1.4], dtype=torch.float64)


@pytest.mark.parametrize("majority", ["total", "frequency"])
def test_ties_matches_peft(majority: str) -> None:
    tvs, xs, w = _peft_inputs("w")
    ours = compose(tvs, "ties", w.tolist(), density=0.25, majority=majority)["w"]
    theirs = peft.ties(xs, w, density=0.25, majority_sign_method=majority)
    torch.testing.assert_close(ours, theirs, rtol=1e-13, atol=1e-15)


def test_magnitude_and_task_arithmetic_match_peft() -> None:
    tvs, xs, w = _peft_inputs("w")
    torch.testing.assert_close(
        compose(tvs, "magnitude", w.tolist(), density=0.4)["w"], peft.magnitude_prune(xs, w, density=0.4)
    )
    torch.testing.assert_close(compose(tvs, "task_arithmetic", w.tolist())["w"], peft.task_arithmetic(xs, w))


@pytest.mark.parametrize("ours", ["dare", "dare_ties"])
def test_dare_matches_peft_with_the_same_random_streams(ours: str) -> None:
    """PEFT's `dare_linear`/`dare_ties` steps (random prune, [sign election, disjoint merge] or weighted sum)
    on float32 inputs, each task's prune drawn from the global generator seeded as taskvec seeds that task."""
    tvs64, xs64, w = _peft_inputs("w")
    xs = [x.float() for x in xs64]
    tvs = [TaskVector.from_tensors({"w": x}) for x in xs]
    merged = compose(tvs, ours, w.tolist(), density=0.4, seed=3)["w"]
    pruned = []
    for t, x in enumerate(xs):
        torch.manual_seed(block_seed(3, "w", t, 0))  # PEFT draws from the global generator
        pruned.append(peft.prune(x, 0.4, "random", rescale=True))
    stacked = torch.stack(pruned)
    weighted = stacked * peft.reshape_weight_task_tensors(stacked, w.float())
    if ours == "dare":
        theirs = weighted.sum(0)
    else:
        theirs = peft.disjoint_merge(weighted, peft.calculate_majority_sign_mask(stacked, method="total"))
    torch.testing.assert_close(merged, theirs, rtol=1e-6, atol=1e-6)


# ---- streaming: slicing a tensor does not change trimming methods
@pytest.mark.parametrize("method", ["ties", "magnitude", "task_arithmetic", "negation"])
def test_sliced_reads_equal_whole_tensor(method: str) -> None:
    tvs, _ = task_vectors()
    src = compose(tvs, method, [1.0, 0.5, 0.3, 2.0]).source
    assert isinstance(src, ComposedSource)
    whole = src.read_flat("w")
    parts = torch.cat([src.read_flat("w", s, min(s + 97, 1200)) for s in range(0, 1200, 97)])
    assert torch.equal(whole, parts)


@pytest.mark.parametrize("method", ["ties", "magnitude"])
def test_ties_at_threshold_keep_exactly_k(method: str) -> None:
    """Quantized deltas (as from fp16 weights) tie at the threshold: still exactly k entries are kept,
    the first ones by position, whatever the slicing."""
    g = torch.Generator().manual_seed(0)
    raw = [torch.randint(-3, 4, (50, 20), generator=g).double() for _ in range(3)]
    tvs = [TaskVector.from_tensors({"w": r}) for r in raw]
    src = compose(tvs, method, density=0.3).source
    assert isinstance(src, ComposedSource)
    n, k = 1000, 300
    for t, r in enumerate(raw):
        thr, cut = src.thresholds("w")[t].tolist()
        a = r.abs().reshape(-1)
        keep = (a > thr) | ((a == thr) & (torch.arange(n) <= cut))
        assert int(keep.sum()) == k
        # the kept set is the top k by |x|, ties broken by position (a stable sort)
        order = sorted(range(n), key=lambda i: (-float(a[i]), i))[:k]
        assert set(torch.nonzero(keep).reshape(-1).tolist()) == set(order)
    whole = src.read_flat("w")
    parts = torch.cat([src.read_flat("w", s, min(s + 77, n)) for s in range(0, n, 77)])
    assert torch.equal(whole, parts)
    if method == "magnitude":
        ref = sum(
            r.reshape(-1)
            * (
                (r.abs().reshape(-1) > src.thresholds("w")[i, 0])
                | ((r.abs().reshape(-1) == src.thresholds("w")[i, 0]) & (torch.arange(n) <= src.thresholds("w")[i, 1]))
            )
            for i, r in enumerate(raw)
        )
        assert torch.equal(whole, ref)


def test_per_layer_weights() -> None:
    tvs, raw = task_vectors(2)
    merged = compose(tvs, "task_arithmetic", [{"w": 2.0, "*": 0.0}, 1.0])
    np.testing.assert_allclose(merged["w"].numpy(), 2 * raw[0]["w"] + raw[1]["w"], rtol=1e-13)
    np.testing.assert_allclose(merged["b"].numpy(), raw[1]["b"], rtol=1e-13)


def test_bad_method_and_params_are_named() -> None:
    tvs, _ = task_vectors(2)
    with pytest.raises(UnknownMethodError, match="'tie'.*known: dare, dare_ties, magnitude"):
        compose(tvs, "tie")
    with pytest.raises(ConfigError, match=r"'ties'.*density"):
        compose(tvs, "ties", density=1.5)
    with pytest.raises(ConfigError, match=r"'dare'.*dens"):
        compose(tvs, "dare", dens=0.3)
    with pytest.raises(ValueError, match="2 task vectors but 3 weights"):
        compose(tvs, "ties", [1.0, 1.0, 1.0])


def test_every_registered_method_is_tested() -> None:
    here = Path(__file__).read_text()
    for m in list_methods():
        assert f'"{m.name}"' in here, f"method {m.name} has no test"
