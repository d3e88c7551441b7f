"""Hugging Face model folders: carry a base's config, tokenizer and processor files over to an output.

A model written from a Hugging Face base (a folder with `config.json`) gets the base's non-weight
files, so `AutoModel.from_pretrained(out)` and `AutoTokenizer.from_pretrained(out)` load it as they
load the base. Weight files and weight indexes are never copied: the output has its own.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from taskvec.errors import CheckpointError
from taskvec.io.readers import read_json

# Files a model folder holds besides its weights (configs, tokenizers, processors, chat templates).
MODEL_FILE_PATTERNS = (
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.txt",
    "vocab.json",
    "merges.txt",
    "*.model",  # sentencepiece: spiece.model, tokenizer.model, sentencepiece.bpe.model
    "*.tiktoken",
    "preprocessor_config.json",
    "image_processor_config.json",
    "video_preprocessor_config.json",
    "processor_config.json",
    "feature_extractor_config.json",
    "chat_template.json",
    "chat_template.jinja",
)
# Never copied, whatever a pattern matches: the output's weights are its own.
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".onnx", ".gguf")
WEIGHT_INDEXES = ("model.safetensors.index.json", "pytorch_model.bin.index.json", "tf_model.h5.index.json")
DTYPE_KEYS = ("torch_dtype", "dtype")


def is_hf_folder(path: str | os.PathLike[str]) -> bool:
    """True if `path` is a folder with a Hugging Face `config.json`."""
    p = Path(path)
    return p.is_dir() and (p / "config.json").is_file()


def model_files(base: Path) -> list[Path]:
    """The non-weight files of model folder `base` that an output folder should carry."""
    files: set[Path] = set()
    for pattern in MODEL_FILE_PATTERNS:
        files.update(p for p in base.glob(pattern) if p.is_file())
    if _read_json(base / "config.json").get("auto_map"):  # custom code that the config names
        files.update(p for p in base.glob("*.py") if p.is_file())
    return sorted(p for p in files if not p.name.endswith(WEIGHT_SUFFIXES) and p.name not in WEIGHT_INDEXES)


def copy_model_files(
    base: str | os.PathLike[str], out: str | os.PathLike[str], dtype: torch.dtype | None = None
) -> list[str]:
    """Copy the config, generation config and tokenizer/processor files of `base` into folder `out`.

    `dtype`: the output's floating-point dtype; when given, `torch_dtype`/`dtype` in `config.json`
    (and in any nested config, e.g. a `text_config`) is set to it. Returns the names of the files written.
    """
    base, out = Path(base), Path(out)
    written = []
    for src in model_files(base):
        dst = out / src.name
        if src.name == "config.json" and dtype is not None:
            dst.write_text(json.dumps(set_config_dtype(_read_json(src), dtype), indent=2, sort_keys=True) + "\n")
        else:
            shutil.copyfile(src, dst)
        written.append(src.name)
    return written


def set_config_dtype(config: dict[str, Any], dtype: torch.dtype) -> dict[str, Any]:
    """`config` with every dtype entry, at any depth, set to `dtype`'s name (`torch_dtype` is added at the
    top when the config names none: transformers reads it as the dtype to load in)."""
    name = str(dtype).removeprefix("torch.")

    def visit(x: Any) -> Any:
        if isinstance(x, dict):
            return {k: name if k in DTYPE_KEYS else visit(v) for k, v in x.items()}
        if isinstance(x, list):
            return [visit(v) for v in x]
        return x

    new = visit(config)
    if not any(k in new for k in DTYPE_KEYS):
        new["torch_dtype"] = name
    return new


def hf_output_files(
    base: object, out: str | os.PathLike[str], dtype: torch.dtype | None
) -> Callable[[Path], None] | None:
    """A hook for the checkpoint writer that fills its temporary folder with `base`'s model files, or
    None when `base` is not a Hugging Face folder or `out` is a single `.safetensors` file."""
    if not isinstance(base, (str, os.PathLike)) or not is_hf_folder(base) or Path(out).suffix == ".safetensors":
        return None
    base_path = Path(base)
    _read_json(base_path / "config.json")  # a broken config fails before any weight is written

    def extra_files(tmp: Path) -> None:
        copy_model_files(base_path, tmp, dtype)

    return extra_files


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = read_json(path, max_bytes=64 * 2**20)
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{path}: cannot read it as JSON ({e})") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: expected a JSON object")
    return data
