"""Data sources of a suite's tasks: where the labelled examples of one task come from.

Each kind is a name, a pydantic config and a loader returning `RawData` (inputs, integer labels,
class names). A suite YAML picks one with `kind:`; a new kind is one `SOURCES.register(...)` call.

    data: {kind: csv, path: reviews.csv, text: review, label: stars}
    data: {kind: images, path: photos/}              # one sub-folder per class
    data: {kind: npz, path: arrays.npz}              # arrays x, y (and optionally classes)
    data: {kind: hf_disk, path: saved/, split: train, text: sentence, label: label}
    data: {kind: function, function: mypkg.data:load, kwargs: {n: 1000}}
"""

from __future__ import annotations

import csv
import importlib
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import Field

from taskvec.config import Strict
from taskvec.errors import ConfigError, TaskVecError
from taskvec.io.readers import check_regular, read_text
from taskvec.registry import Registry

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp")


@dataclass
class RawData:
    """Examples of one task: `x` uint8 images (N, H, W[, 3]) or a list of texts; `y` int64 labels
    in range(len(classes))."""

    x: np.ndarray | list[str]
    y: np.ndarray
    classes: list[str]

    def __len__(self) -> int:
        return len(self.y)

    def take(self, idx: np.ndarray) -> RawData:
        x = [self.x[i] for i in idx] if isinstance(self.x, list) else self.x[idx]
        return RawData(x, self.y[idx], self.classes)


Loader = Callable[[Any, Path], RawData]
SOURCES: Registry[Loader] = Registry("data source kind", group="taskvec.sources")
"""The data source kinds by name."""


def resolve(root: Path, path: str) -> Path:
    """A path of a suite file, relative to the file's folder."""
    p = Path(path).expanduser()
    return p if p.is_absolute() else root / p


def import_object(spec: str) -> Any:
    """The function (or other callable) named by 'package.module:attribute'."""
    module, sep, attr = spec.partition(":")
    if not sep or not module or not attr:
        raise ConfigError(f"{spec!r}: expected 'module:function'")
    try:
        obj: Any = importlib.import_module(module)
    except ImportError as e:
        raise ConfigError(f"{spec!r}: cannot import module {module!r} ({e})") from None
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise ConfigError(f"{spec!r}: module {module!r} has no {attr!r}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise ConfigError(f"{spec!r}: {attr!r} is a {type(obj).__name__}, not a function to call")
    return obj


def labels_to_index(labels: Sequence[Any], classes: Sequence[str] | None, where: str) -> tuple[np.ndarray, list[str]]:
    """Integer labels and class names. String labels are looked up in `classes` (default: their
    sorted set); integer labels must lie in range(len(classes)) (default classes: '0', '1', ...)."""
    values = list(labels)
    if values and all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) for v in values):
        y = np.asarray(values, dtype=np.int64)
        names = list(classes) if classes is not None else [str(i) for i in range(int(y.max()) + 1)]
        if y.min() < 0 or y.max() >= len(names):
            raise ConfigError(
                f"{where}: labels range over {int(y.min())}..{int(y.max())}, but there are {len(names)} classes"
            )
        return y, names
    text = [str(v) for v in values]
    names = list(classes) if classes is not None else sorted(set(text))
    index = {c: i for i, c in enumerate(names)}
    unknown = sorted(set(text) - set(index))
    if unknown:
        raise ConfigError(f"{where}: labels {unknown[:5]} are not among the classes {names}")
    return np.asarray([index[t] for t in text], dtype=np.int64), names


# --------------------------------------------------------------------------- tables


class TableSource(Strict):
    """A CSV, JSON-lines or Parquet table with one text column and one label column."""

    kind: Literal["csv", "jsonl", "parquet"]
    path: str
    text: str = "text"
    label: str = "label"
    classes: list[str] | None = Field(default=None, description="class names in label order (default: sorted labels)")


MAX_TABLE_BYTES = 4 * 2**30
MAX_FIELD = 128 * 1024  # the csv module's default field limit: a longer field is refused, not truncated


def _text(path: Path) -> str:
    try:
        return read_text(path, max_bytes=MAX_TABLE_BYTES)
    except TaskVecError as e:
        raise ConfigError(str(e)) from None


def read_csv(path: Path) -> list[dict[str, Any]]:
    """Rows of a CSV file with a header line, read strictly: an unterminated quote, a row with more
    or fewer fields than the header, a field over 128 KiB or text that is not UTF-8 is a
    ConfigError naming the file and line (never rows silently merged or padded)."""
    import io

    reader = csv.reader(io.StringIO(_text(path), newline=""), strict=True)
    try:
        header = next(reader, None)
        if header is None:
            return []
        if len(set(header)) != len(header):
            raise ConfigError(f"{path}:1: a column name appears twice in the header {header}")
        rows = []
        for row in reader:
            if not row:
                continue
            if len(row) != len(header):
                raise ConfigError(
                    f"{path}:{reader.line_num}: {len(row)} fields, the header has {len(header)} "
                    "(a missing or extra separator, or an unbalanced quote)"
                )
            rows.append(dict(zip(header, row, strict=True)))
    except csv.Error as e:
        msg = str(e)
        if "field larger than field limit" in msg:
            msg = f"a field is longer than {MAX_FIELD // 1024} KiB"
        elif "unexpected end of data" in msg or "EOF" in msg:
            msg = "a quote is never closed"
        raise ConfigError(f"{path}:{reader.line_num}: not a valid CSV file ({msg})") from None
    return rows


def read_npz(path: Path, want: Sequence[str], optional: Sequence[str] = ()) -> dict[str, np.ndarray]:
    """The arrays `want` (required) and `optional` of an .npz file, loaded without pickle: a damaged
    file, a file that is not an .npz, or object arrays are a ConfigError naming the file."""
    if not path.is_file():
        raise ConfigError(f"{path}: no such .npz file")
    try:
        check_regular(path)
        z = np.load(path, allow_pickle=False)
        if not hasattr(z, "files"):
            raise ConfigError(f"{path}: a single .npy array, not an .npz archive of named arrays")
        with z:
            for key in want:
                if key not in z.files:
                    raise ConfigError(f"{path}: no array {key!r}; arrays: {', '.join(z.files) or '(none)'}")
            return {k: z[k] for k in [*want, *optional] if k in z.files}
    except TaskVecError as e:
        raise ConfigError(str(e)) from None
    except ValueError as e:
        if "allow_pickle" in str(e):
            raise ConfigError(
                f"{path}: holds object (pickled) arrays, which could run code when loaded; refused "
                "(save numeric or string arrays)"
            ) from None
        raise ConfigError(f"{path}: not a readable .npz file ({e})") from None
    except Exception as e:  # OSError, EOFError, zipfile.BadZipFile, zlib.error: a damaged archive
        raise ConfigError(f"{path}: not a readable .npz file ({type(e).__name__}: {e})") from None


def read_table(path: Path, fmt: str) -> list[dict[str, Any]]:
    """Rows of a csv, jsonl or parquet file as dicts."""
    if not path.is_file():
        raise ConfigError(f"{path}: no such {fmt} file")
    if fmt == "csv":
        return read_csv(path)
    if fmt == "jsonl":
        rows = []
        for i, line in enumerate(_text(path).splitlines(), 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except (json.JSONDecodeError, RecursionError) as e:
                    msg = e.msg if isinstance(e, json.JSONDecodeError) else "nested too deeply"
                    raise ConfigError(f"{path}:{i}: not valid JSON ({msg})") from None
        return rows
    try:
        import pandas as pd  # type: ignore[import-untyped]
    except ImportError:
        raise ConfigError(f"{path}: reading parquet needs pandas and pyarrow (pip install pandas pyarrow)") from None
    return pd.read_parquet(path).to_dict("records")


def column(rows: list[dict[str, Any]], name: str, path: Path) -> list[Any]:
    if rows and name not in rows[0]:
        raise ConfigError(f"{path}: no column {name!r}; columns: {', '.join(map(str, rows[0]))}")
    return [r[name] for r in rows]


def _csv_label(v: Any) -> Any:
    """CSV cells are strings: '3' is the integer label 3."""
    return int(v) if isinstance(v, str) and v.strip().lstrip("-").isdigit() else v


def load_table(cfg: TableSource, root: Path) -> RawData:
    """Texts and labels from the named columns."""
    path = resolve(root, cfg.path)
    rows = read_table(path, cfg.kind)
    if not rows:
        raise ConfigError(f"{path}: no rows")
    texts = [str(t) for t in column(rows, cfg.text, path)]
    labels = column(rows, cfg.label, path)
    if cfg.kind == "csv":
        labels = [_csv_label(v) for v in labels]
    y, classes = labels_to_index(labels, cfg.classes, str(path))
    return RawData(texts, y, classes)


for _fmt in ("csv", "jsonl", "parquet"):
    SOURCES.register(_fmt, TableSource, load_table, f"a {_fmt} table: text and label columns")


# --------------------------------------------------------------------------- images


class ImageFolderSource(Strict):
    """A folder with one sub-folder of images per class (the sub-folder's name is the class)."""

    kind: Literal["images"]
    path: str
    size: int | None = Field(default=None, ge=1, description="resize every image to size x size on load")
    mode: Literal["rgb", "grey"] = "rgb"
    classes: list[str] | None = Field(default=None, description="class sub-folders in label order (default: sorted)")


def load_image_folder(cfg: ImageFolderSource, root: Path) -> RawData:
    """uint8 images of every class sub-folder."""
    from PIL import Image

    path = resolve(root, cfg.path)
    if not path.is_dir():
        raise ConfigError(f"{path}: no such image folder")
    classes = cfg.classes or sorted(p.name for p in path.iterdir() if p.is_dir())
    if not classes:
        raise ConfigError(f"{path}: no class sub-folders")
    images, labels = [], []
    for label, name in enumerate(classes):
        files = (
            sorted(f for f in (path / name).iterdir() if f.suffix.lower() in IMAGE_SUFFIXES)
            if (path / name).is_dir()
            else []
        )
        if not files:
            raise ConfigError(f"{path / name}: no images")
        for f in files:
            with Image.open(f) as opened:
                im = opened.convert("RGB" if cfg.mode == "rgb" else "L")
            if cfg.size is not None:
                im = im.resize((cfg.size, cfg.size), Image.Resampling.BILINEAR)
            images.append(np.asarray(im, dtype=np.uint8))
            labels.append(label)
    shapes = {a.shape for a in images}
    if len(shapes) > 1:
        raise ConfigError(f"{path}: images of different sizes {sorted(shapes)[:3]}; set 'size' to resize them")
    return RawData(np.stack(images), np.asarray(labels, dtype=np.int64), list(classes))


SOURCES.register("images", ImageFolderSource, load_image_folder)


# --------------------------------------------------------------------------- arrays


class NpzSource(Strict):
    """A `.npz` file of arrays: inputs (images uint8 or strings), labels, optional class names."""

    kind: Literal["npz"]
    path: str
    x: str = "x"
    y: str = "y"
    classes: list[str] | str | None = Field(default="classes", description="class names, or the array holding them")


def from_arrays(x: Any, y: Any, classes: Sequence[str] | None, where: str) -> RawData:
    """RawData from array-likes: string inputs become a list of texts, images stay uint8 arrays."""
    x_arr = np.asarray(x) if not isinstance(x, list) else x
    if isinstance(x_arr, np.ndarray) and x_arr.dtype.kind in "USO":
        x_arr = [str(t) for t in x_arr]
    elif isinstance(x_arr, np.ndarray) and x_arr.dtype != np.uint8:
        raise ConfigError(
            f"{where}: image inputs must be uint8 (N, H, W) or (N, H, W, 3), got {x_arr.dtype} {x_arr.shape}"
        )
    y_list = np.asarray(y).tolist()
    labels, names = labels_to_index(y_list, None if classes is None else [str(c) for c in classes], where)
    if len(labels) != len(x_arr):
        raise ConfigError(f"{where}: {len(x_arr)} inputs but {len(labels)} labels")
    return RawData(x_arr, labels, names)


def load_npz(cfg: NpzSource, root: Path) -> RawData:
    """Arrays `x` and `y` of the file."""
    path = resolve(root, cfg.path)
    classes = cfg.classes
    z = read_npz(path, [cfg.x, cfg.y], [classes] if isinstance(classes, str) else [])
    if isinstance(classes, str):
        classes = [str(c) for c in z[classes]] if classes in z else None
    return from_arrays(z[cfg.x], z[cfg.y], classes, str(path))


SOURCES.register("npz", NpzSource, load_npz)


# --------------------------------------------------------------------------- Hugging Face datasets


class DiskDatasetSource(Strict):
    """A folder written by `datasets.Dataset.save_to_disk` (or a DatasetDict, with `split`)."""

    kind: Literal["hf_disk"]
    path: str
    split: str | None = None
    text: str = "text"
    label: str = "label"
    classes: list[str] | None = None


def load_disk_dataset(cfg: DiskDatasetSource, root: Path) -> RawData:
    """Columns `text` and `label` of a saved data set; class names from its ClassLabel feature."""
    try:
        import datasets  # type: ignore[import-not-found]
    except ImportError:
        raise ConfigError("data kind 'hf_disk' needs the datasets package (pip install datasets)") from None
    path = resolve(root, cfg.path)
    if not path.is_dir():
        raise ConfigError(f"{path}: no such data set folder")
    ds = datasets.load_from_disk(str(path))
    if isinstance(ds, datasets.DatasetDict):
        if cfg.split is None or cfg.split not in ds:
            raise ConfigError(f"{path}: a DatasetDict; set 'split' to one of {', '.join(ds)}")
        ds = ds[cfg.split]
    for name in (cfg.text, cfg.label):
        if name not in ds.column_names:
            raise ConfigError(f"{path}: no column {name!r}; columns: {', '.join(ds.column_names)}")
    classes = cfg.classes
    feature = ds.features[cfg.label]
    if classes is None and hasattr(feature, "names"):
        classes = list(feature.names)
    x = ds[cfg.text]
    if x and not isinstance(x[0], str):  # an image column
        x = np.stack([np.asarray(im, dtype=np.uint8) for im in x])
    return from_arrays(x, ds[cfg.label], classes, str(path))


SOURCES.register("hf_disk", DiskDatasetSource, load_disk_dataset)


# --------------------------------------------------------------------------- Python function


class FunctionSource(Strict):
    """`module:function` called with `kwargs`; returns (x, y) or (x, y, class names)."""

    kind: Literal["function"]
    function: str
    kwargs: dict[str, Any] = Field(default_factory=dict)
    classes: list[str] | None = None


def load_function(cfg: FunctionSource, root: Path) -> RawData:
    """The arrays a user function returns."""
    out = import_object(cfg.function)(**cfg.kwargs)
    if not isinstance(out, tuple) or len(out) not in (2, 3):
        raise ConfigError(f"{cfg.function}: must return (x, y) or (x, y, class_names)")
    classes = cfg.classes or (list(out[2]) if len(out) == 3 else None)
    return from_arrays(out[0], out[1], classes, cfg.function)


SOURCES.register("function", FunctionSource, load_function)


def load_source(cfg: Any, root: Path) -> RawData:
    """Load a validated source config (see SOURCES)."""
    return SOURCES.get(cfg.kind).build(cfg, root)
