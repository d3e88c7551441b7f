"""Offline data sets built from packaged sources: letters rendered in packaged fonts, crops of
GIMP's texture patterns, and the pinned file list of the fortune cookies.

A test is skipped (with the install hint) where a Debian package it reads is not installed.
"""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from taskvec.bench import assets as A


def _load(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """Call a loader, skipping the test when its asset is not installed."""
    try:
        return fn(*args, **kwargs)
    except A.AssetNotFoundError as exc:
        pytest.skip(str(exc))


# --------------------------------------------------------------------------- rendered letters


@pytest.fixture(scope="module")
def letters() -> tuple[np.ndarray, np.ndarray, list[str]]:
    return _load(A.load_font_letters, per_font=2)


def test_font_list_is_exact_and_installed() -> None:
    fonts = A.FONT_LETTER_FONTS
    assert len(fonts) == 84 == len(set(fonts))
    assert {p for p, _ in fonts} == {
        "fonts-urw-base35",
        "fonts-liberation",
        "fonts-freefont-ttf",
        "fonts-dejavu-core",
        "matplotlib",
    }
    paths = _load(A._font_files, fonts)
    assert all(p.is_file() for p in paths)
    names = [p.name for p in paths]
    assert "D050000L.otf" not in names and "cmex10.ttf" not in names  # dingbats, delimiters


def test_font_letters(letters: tuple[np.ndarray, np.ndarray, list[str]]) -> None:
    X, y, names = letters
    assert names == list("ABCDEFGHIJ")
    assert X.shape == (84 * 10 * 2, 32, 32) and X.dtype == np.uint8
    assert y.dtype == np.int64 and np.bincount(y).tolist() == [168] * 10
    # font-major order: font 0 holds A A B B ... J J
    assert y[:20].tolist() == [c for c in range(10) for _ in range(2)]
    assert y[20:40].tolist() == y[:20].tolist()
    # white glyph inside a black border, inked but not filled, every image different
    assert max(X[:, 0].max(), X[:, -1].max(), X[:, :, 0].max(), X[:, :, -1].max()) == 0
    ink = (X > 127).mean(axis=(1, 2))
    assert ink.min() > 0.02 and ink.max() < 0.6
    assert len({x.tobytes() for x in X}) == len(X)
    # the mean image of each letter differs from the others (letters, not noise)
    means = np.stack([X[y == c].mean(axis=0) for c in range(10)])
    dist = np.abs(means[:, None] - means[None]).mean(axis=(2, 3))
    assert dist[~np.eye(10, dtype=bool)].min() > 6


def test_every_font_renders_every_letter_distinctly(letters: tuple[np.ndarray, np.ndarray, list[str]]) -> None:
    X, _, _ = letters
    per_font = X.reshape(84, 10, 2, 32, 32)[:, :, 0].astype(np.int16)
    # within a font, each pair of letters differs
    diff = np.abs(per_font[:, :, None] - per_font[:, None]).mean(axis=(3, 4))
    off_diagonal = diff[:, ~np.eye(10, dtype=bool)]
    assert off_diagonal.min() > 5


def test_font_letters_are_deterministic(letters: tuple[np.ndarray, np.ndarray, list[str]]) -> None:
    X, y, _ = letters
    X2, y2, _ = A.load_font_letters(per_font=2)
    assert X2.tobytes() == X.tobytes() and np.array_equal(y2, y)
    X3, _, _ = A.load_font_letters(per_font=2, seed=1)
    assert X3.shape == X.shape and X3.tobytes() != X.tobytes()


def test_font_letters_options() -> None:
    X, y, names = _load(A.load_font_letters, size=20, per_font=1, letters="XQ")
    assert X.shape == (84 * 2, 20, 20) and names == ["X", "Q"] and np.bincount(y).tolist() == [84, 84]
    with pytest.raises(ValueError, match="has no glyph for"):
        A.load_font_letters(per_font=1, letters="A\u4e00")
    with pytest.raises(ValueError, match="distinct"):
        A.load_font_letters(letters="AA")


def test_missing_font_names_the_package(tmp_path: Path) -> None:
    fonts = [("fonts-liberation", str(tmp_path / "Nope.ttf")), ("matplotlib", "mpl-data/fonts/ttf/nope.ttf")]
    with pytest.raises(A.AssetNotFoundError, match="apt-get install fonts-liberation") as err:
        A._font_files(fonts)
    assert "Nope.ttf" in str(err.value) and "pip install matplotlib" in str(err.value)


# --------------------------------------------------------------------------- GIMP textures


def _pattern(name: str) -> Path:
    path = A.GIMP_PATTERNS_DIR / name
    if not path.is_file():
        pytest.skip(f"GIMP pattern {path} not installed: apt-get install gimp-data")
    return path


def test_gimp_pattern_parser_reads_header_size(tmp_path: Path) -> None:
    path = _pattern("Stone/rock.pat")
    raw = path.read_bytes()
    pixels = A.read_gimp_pattern(path)
    assert pixels.shape == (80, 127, 3) and pixels.dtype == np.uint8
    assert raw[24:30] == b"Rocks\x00"
    assert pixels.reshape(-1).tobytes() == raw[-80 * 127 * 3 :]
    assert A.read_gimp_pattern(_pattern("Stone/marble1.pat")).shape == (128, 128, 1)  # grey
    truncated = tmp_path / "rock.pat"
    truncated.write_bytes(raw[:-7])
    with pytest.raises(ValueError, match=r"rock\.pat is truncated"):
        A.read_gimp_pattern(truncated)
    bad = tmp_path / "bad.pat"
    bad.write_bytes(raw[:20] + b"GBRS" + raw[24:])
    with pytest.raises(ValueError, match=r"bad\.pat is not a GIMP pattern"):
        A.read_gimp_pattern(bad)


def test_gimp_textures() -> None:
    X, y, names = _load(A.load_gimp_textures, per_class=20)
    assert names == [Path(f).stem for f in A.GIMP_TEXTURE_PATTERNS] and len(names) == 10
    assert "brick" in names and "leaves" in names
    assert X.shape == (200, 32, 32, 3) and X.dtype == np.uint8
    assert y.dtype == np.int64 and y.tolist() == [c for c in range(10) for _ in range(20)]
    assert len({x.tobytes() for x in X}) == len(X)
    # classes differ in colour: mean RGB of each class is far from every other's
    means = np.stack([X[y == c].reshape(-1, 3).mean(axis=0) for c in range(10)])
    dist = np.linalg.norm(means[:, None] - means[None], axis=-1)
    assert dist[~np.eye(10, dtype=bool)].min() > 8
    # deterministic; another seed crops elsewhere; a class's crops do not depend on the others
    X2, _, _ = A.load_gimp_textures(per_class=20)
    assert X2.tobytes() == X.tobytes()
    assert A.load_gimp_textures(per_class=20, seed=1)[0].tobytes() != X.tobytes()
    Xb, yb, nb = A.load_gimp_textures(per_class=20, classes=["Stone/brick.pat", "Sky/sky.pat"], size=24)
    assert nb == ["brick", "sky"] and Xb.shape == (40, 24, 24, 3) and np.bincount(yb).tolist() == [20, 20]
    Xb32, _, _ = A.load_gimp_textures(per_class=20, classes=["Stone/brick.pat"])
    assert Xb32.tobytes() == X[y == names.index("brick")].tobytes()


def test_gimp_textures_missing_pattern_names_the_package() -> None:
    _pattern("Stone/brick.pat")
    with pytest.raises(A.AssetNotFoundError, match="apt-get install gimp-data") as err:
        A.load_gimp_textures(classes=["Stone/no-such.pat"])
    assert "no-such.pat" in str(err.value)


# --------------------------------------------------------------------------- fortunes


def test_fortune_files_are_those_of_the_debian_package() -> None:
    """The pinned list is what the folder scan used to find: the cookie files of Debian's fortunes
    and fortunes-min, in sorted order."""
    assert list(A.FORTUNES_FILES) == sorted(A.FORTUNES_FILES) and len(A.FORTUNES_FILES) == 43
    if shutil.which("dpkg") is None:
        pytest.skip("dpkg not available")
    listing = subprocess.run(["dpkg", "-L", "fortunes", "fortunes-min"], capture_output=True, text=True)
    if listing.returncode != 0:
        pytest.skip("Debian's fortunes is not installed: apt-get install fortunes")
    shipped = sorted(
        Path(line).name
        for line in listing.stdout.splitlines()
        if Path(line).parent == A.FORTUNES_DIR and Path(line).suffix not in (".dat", ".u8")
    )
    assert shipped == list(A.FORTUNES_FILES)


def test_fortunes_missing_file_is_named(tmp_path: Path) -> None:
    for name in A.FORTUNES_FILES[:-1]:
        (tmp_path / name).write_text("a cookie\n%\n")
    with pytest.raises(A.AssetNotFoundError, match="fortune file 'zippy' not found") as err:
        A.load_fortunes(tmp_path)
    assert "apt-get install fortunes" in str(err.value)
    (tmp_path / "zippy").write_text("Are we having FUN yet?\n%\nYow!\n")
    (tmp_path / "other-package").write_text("not read\n")
    texts, y, names = A.load_fortunes(tmp_path)
    assert names == ["zippy"] and texts == ["Are we having FUN yet?", "Yow!"] and y.tolist() == [0, 0]


# --------------------------------------------------------------------------- text sources of text-5


def test_wordnet_glosses_read_the_database(tmp_path: Path) -> None:
    lines = [
        "  1 This software and database is being provided to you, the LICENSEE | not a gloss",
        '00000001 18 n 01 teacher 0 000 | a person whose occupation is teaching; "she is a teacher"',
        "00000002 06 n 01 ladle 0 000 | a spoon-shaped vessel with a long handle",
        "00000003 05 n 01 dog 0 000 | a domesticated canid",  # animal: not asked for
        "00000004 06 n 01 thing 0 000 | an entity",  # one gloss in two categories: dropped
        "00000005 18 n 01 being 0 000 | an entity",
    ]
    (tmp_path / "data.noun").write_text("\n".join(lines) + "\n")
    texts, y, names = A.load_wordnet_glosses(("person", "artifact"), root=tmp_path)
    assert names == ["person", "artifact"]
    assert texts == ["a person whose occupation is teaching", "a spoon-shaped vessel with a long handle"]
    assert y.tolist() == [0, 1]
    with pytest.raises(ValueError, match="unknown WordNet noun categories"):
        A.load_wordnet_glosses(("animals",), root=tmp_path)
    with pytest.raises(A.AssetNotFoundError, match="apt-get install wordnet-base"):
        A.load_wordnet_glosses(root=tmp_path / "none")


def test_wordnet_glosses_of_the_debian_package() -> None:
    texts, y, names = _load(A.load_wordnet_glosses)
    assert len(texts) == len(set(texts)) == len(y) == 47272
    assert np.bincount(y).tolist() == [6641, 11569, 3030, 2963, 5525, 11046, 3541, 2957]
    assert y[texts.index("a person whose occupation is teaching")] == names.index("person")


def test_wordlist_languages_drop_shared_words(tmp_path: Path) -> None:
    (tmp_path / "french").write_text("Maison\nchat\ntable\ncafé\nélève\n")
    (tmp_path / "spanish").write_text("mesa\ntable\ncasa\nperro\nniño\n")
    texts, y, names = A.load_wordlist_languages(["french", "spanish"], per_class=10, root=tmp_path)
    assert names == ["french", "spanish"]
    # lower-cased, 5-14 letters, "table" is in both lists
    assert list(zip(texts, y.tolist(), strict=True)) == [("maison", 0), ("élève", 0), ("perro", 1)]
    with pytest.raises(A.AssetNotFoundError, match="apt-get install witalian"):
        A.load_wordlist_languages(["italian"], root=tmp_path)


def test_wordlist_languages_of_the_debian_packages() -> None:
    texts, y, names = _load(A.load_wordlist_languages)
    assert names == ["ngerman", "french", "italian", "spanish"]
    assert np.bincount(y).tolist() == [1000] * 4 and len(set(texts)) == 4000
    assert all(t.isalpha() and t == t.lower() and 5 <= len(t) <= 14 for t in texts)
    assert _load(A.load_wordlist_languages)[0] == texts  # drawn with a fixed seed


def test_vader_sentiment_lexicon() -> None:
    texts, y, names = _load(A.load_vader_sentiment)
    assert names == ["negative", "positive"] and len(texts) == 5830
    label = dict(zip(texts, y.tolist(), strict=True))
    assert label[":)"] == 1 and label["hate"] == 0 and label["love"] == 1
    fewer = _load(A.load_vader_sentiment, threshold=2.0)[0]
    assert set(fewer) < set(texts)


def test_text5_items_are_pinned() -> None:
    """Each task of the text-5 suite reads exactly the items its suite file pins (items_sha256)."""
    from taskvec.bench.suite import items_digest, load_suite, raw_splits

    suite = load_suite("text-5")
    assert len({t.data.function for t in suite.tasks}) == len(suite.tasks) == 5  # type: ignore[union-attr]
    for task in suite.tasks:
        raw = _load(raw_splits, suite, task)
        assert items_digest(raw) == task.items_sha256
