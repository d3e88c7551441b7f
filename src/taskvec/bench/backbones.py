"""The pretrained backbone of a suite: a Hugging Face folder or a `module:function` factory, the
pooling that turns its output into features f0(x), and the encoding of raw inputs for it."""

from __future__ import annotations

import os
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import BaseModel, Field, model_validator
from pydantic_core import PydanticCustomError
from torch import nn

from taskvec.bench import clip
from taskvec.bench.sources import import_object, resolve
from taskvec.config import Strict
from taskvec.errors import ConfigError, KeyMismatchError
from taskvec.io import open_checkpoint, read
from taskvec.registry import Registry, validation_error

Inputs = torch.Tensor | dict[str, torch.Tensor]
Pool = Literal["mean", "cls", "pooler", "none", "image_embeds"]


class TextInputs(Strict):
    """Texts are tokenized to a fixed length (padding is trimmed per batch)."""

    max_length: int = Field(default=128, ge=1)


class ImageInputs(Strict):
    """Images are resized to size x size, scaled to [0, 1] and normalized per channel.
    For a Hugging Face folder, mean and std default to its image processor's. (A CLIP folder
    without `images:` uses its image processor as is: shortest-side resize and center crop.)"""

    size: int = Field(default=64, ge=1)
    mean: tuple[float, float, float] | None = None
    std: tuple[float, float, float] | None = None


class BackboneOptions(Strict):
    """What every built-in kind shares: a `checkpoint` loaded into the model, the pooling `pool`
    that turns its output into features (mean over real tokens or positions, the first token, the
    model's pooler output, or 'none': the model already returns features), and how raw inputs are
    encoded (`text` or `images`)."""

    checkpoint: str | None = None
    pool: Pool | None = Field(
        default=None,
        description="default: 'mean' for a Hugging Face folder ('image_embeds' for a CLIP folder with "
        "the visual projection, else 'pooler'), 'none' for a factory",
    )
    text: TextInputs | None = None
    images: ImageInputs | None = None

    @model_validator(mode="after")
    def _inputs(self) -> BackboneOptions:
        if self.text is not None and self.images is not None:
            raise ValueError("give 'text' or 'images' inputs, not both")
        return self


class HfBackbone(BackboneOptions):
    """A Hugging Face folder `hf`, loaded with AutoModel and its tokenizer (or image processor).
    A CLIP folder (CLIPModel, CLIPVisionModel[WithProjection]) gives its image tower, as kind
    'clip' does. Written `backbone: {hf: path}` (the kind is implied)."""

    kind: Literal["hf"] = "hf"
    hf: str

    @property
    def pooling(self) -> Pool:
        return self.pool or "mean"


class FactoryBackbone(BackboneOptions):
    """A model of your own: 'module:function' `factory` called with `kwargs`, returning an
    nn.Module, or (module, tokenizer) for text. Written `backbone: {factory: ...}` (the kind is
    implied); `text` or `images` says how inputs are encoded."""

    kind: Literal["factory"] = "factory"
    factory: str
    kwargs: dict[str, Any] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _encoded(self) -> FactoryBackbone:
        if self.text is None and self.images is None:
            raise ValueError("a factory backbone needs 'text' or 'images' to say how inputs are encoded")
        return self

    @property
    def pooling(self) -> Pool:
        return self.pool or "none"


class ClipBackbone(Strict):
    """The image tower of a Hugging Face CLIP folder `hf` (CLIPModel, CLIPVisionModel[WithProjection]):
    features 'image_embeds' (through the visual projection) or 'pooler' (see taskvec.bench.clip);
    without `images:` its image processor encodes the inputs as is."""

    kind: Literal["clip"] = "clip"
    hf: str
    checkpoint: str | None = None
    pool: Literal["image_embeds", "pooler"] | None = None
    images: ImageInputs | None = None


BackboneBuilder = Callable[[Any, Path], "Backbone"]
"""Makes the pretrained backbone of a validated config, relative paths read from the suite's folder."""
BACKBONES: Registry[BackboneBuilder] = Registry("backbone kind", group="taskvec.backbones")
"""The backbone kinds by name."""

LEGACY_HASH_FIELDS: dict[str, Any] = {"hf": None, "factory": None, "kwargs": {}}
"""The fields a suite's backbone was hashed with before kinds were named (see `backbone_fields`)."""


def parse_backbone(value: Any) -> BaseModel:
    """A suite's `backbone:` validated by its kind's config: `{kind: NAME, ...}`, or the short
    forms `{hf: folder, ...}` and `{factory: 'module:function', ...}` of the built-in kinds."""
    if isinstance(value, Mapping) and BACKBONES.key not in value:
        implied = [k for k in ("hf", "factory") if k in value]
        if len(implied) != 1:
            raise validation_error(
                "give exactly one of 'hf' (a model folder) or 'factory' ('module:function'), or a 'kind'"
            )
        value = {BACKBONES.key: implied[0], **value}
    return BACKBONES.parse(value)


def backbone_spec(**options: Any) -> BaseModel:
    """`parse_backbone` of keyword options, with errors as ConfigError (for code and tests)."""
    try:
        return parse_backbone(options)
    except PydanticCustomError as e:
        raise ConfigError(e.message()) from None


def backbone_fields(spec: BaseModel) -> dict[str, Any]:
    """The backbone's options as hashed into cache keys: the built-in 'hf' and 'factory' kinds
    without their kind and with the fields the other one had, so that suites written before
    kinds were named keep their cached heads and fine-tuned checkpoints."""
    d = spec.model_dump(mode="json")
    if d.get(BACKBONES.key) in ("hf", "factory"):
        d.pop(BACKBONES.key)
        d = {**LEGACY_HASH_FIELDS, **d}
    return d


def mean_pool(hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Average token states (N, T, D) over real tokens only (the sentence-transformers pooling)."""
    mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * mask).sum(1) / mask.sum(1).clamp_min(1e-9)


class PooledEncoder(nn.Module):
    """A model whose output is pooled into one feature vector per input."""

    def __init__(self, model: nn.Module, pool: Pool):
        super().__init__()
        self.model, self.pool = model, pool

    def forward(self, x: Inputs) -> torch.Tensor:
        if isinstance(x, Mapping):
            out = self.model(**x)
            mask = x.get("attention_mask")
        else:
            out = self.model(pixel_values=x) if _is_hf(self.model) else self.model(x)
            mask = None
        if self.pool == "pooler":
            return out.pooler_output.flatten(1)
        hidden = out.last_hidden_state if hasattr(out, "last_hidden_state") else out
        if self.pool == "cls":
            return hidden[:, 0]
        if self.pool == "none":
            return hidden
        if mask is not None:
            return mean_pool(hidden, mask)
        return hidden.flatten(2).mean(2) if hidden.dim() == 4 else hidden.mean(1)  # conv maps or token sequences


def _is_hf(model: nn.Module) -> bool:
    return hasattr(model, "config") and hasattr(model, "base_model_prefix")


def prepare_images(images: np.ndarray, size: int, mean: tuple[float, ...], std: tuple[float, ...]) -> torch.Tensor:
    """uint8 images (N, H, W) or (N, H, W, 3) -> normalized float (N, 3, size, size).

    Grey images are repeated on 3 channels; resizing is bilinear with antialiasing."""
    if images.dtype != np.uint8 or images.ndim not in (3, 4):
        raise ValueError(f"expected uint8 images (N,H,W) or (N,H,W,3), got {images.dtype} {images.shape}")
    x = torch.from_numpy(np.ascontiguousarray(images)).float().div_(255.0)
    x = x.unsqueeze(1).expand(-1, 3, -1, -1) if x.ndim == 3 else x.permute(0, 3, 1, 2)
    if x.shape[-2:] != (size, size):
        x = F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    m = torch.tensor(mean).view(1, 3, 1, 1)
    s = torch.tensor(std).view(1, 3, 1, 1)
    return ((x - m) / s).contiguous()


@dataclass
class Backbone:
    """A loaded backbone: `module` maps encoded inputs to features f0(x); `encode` turns raw inputs
    (a list of texts or uint8 images) into its inputs; `hf_folder` is the folder it came from, and
    `prefix` is what the module's state dict puts before the folder's tensor names."""

    module: nn.Module
    encode: Callable[[Any], Inputs]
    kind: Literal["text", "images"]
    hf_folder: Path | None = None
    prefix: str = ""
    tokenizer: Any = None
    clip: Literal["image_embeds", "pooler"] | None = None
    """For a CLIP folder: whether the features are image embeddings (through the visual
    projection) or the vision tower's pooled output."""
    checkpoint_prefixes: tuple[str, ...] = ()
    """Further leading parts of the module's names that a fine-tuned checkpoint may lack (a
    CLIPVisionModel saved by transformers 5 names its tensors without 'vision_model.')."""
    optional: tuple[str, ...] = ()
    """Tensors a fine-tuned checkpoint may lack; they keep their pretrained values (the visual
    projection, absent from the CLIPVisionModel folders of model pools)."""
    complete_from: Path | None = None
    """A folder whose tensors that the module lacks complete an exported model (a CLIPModel's
    text tower), so that the export loads as that folder's model."""


def _offline() -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def load_backbone(spec: BaseModel, root: Path) -> Backbone:
    """The suite's pretrained backbone in eval mode, with its input encoder (built by its kind)."""
    kind = getattr(spec, BACKBONES.key)
    loaded = BACKBONES.get(kind).build(spec, root)
    if not isinstance(loaded, Backbone):
        raise ConfigError(
            f"backbone kind {kind!r}: its builder must return a taskvec.bench.backbones.Backbone, "
            f"got {type(loaded).__name__}"
        )
    return loaded


def load_hf(spec: HfBackbone, root: Path) -> Backbone:
    """A Hugging Face folder through AutoModel (a CLIP folder: its image tower)."""
    _offline()
    import transformers

    folder = resolve(root, spec.hf)
    if not (folder / "config.json").is_file():
        raise ConfigError(f"{folder}: not a Hugging Face model folder (no config.json)")
    if clip.is_clip_folder(folder):
        return load_clip_backbone(spec, folder, root)
    model: nn.Module = transformers.AutoModel.from_pretrained(str(folder), local_files_only=True)
    tokenizer: Any = None
    processor: Any = None
    if spec.images is None:
        tokenizer = transformers.AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    elif spec.images.mean is None or spec.images.std is None:
        processor = transformers.AutoImageProcessor.from_pretrained(str(folder), local_files_only=True)
    return _encoder(spec, model, root, folder, tokenizer, processor, pooled=True)


def load_factory(spec: FactoryBackbone, root: Path) -> Backbone:
    """`module:function(**kwargs)`: an nn.Module, or (module, tokenizer) for text."""
    out = import_object(spec.factory)(**spec.kwargs)
    model, tokenizer = (out[0], out[1]) if isinstance(out, tuple) else (out, None)
    if not isinstance(model, nn.Module):
        raise ConfigError(
            f"{spec.factory}: must return an nn.Module (or (module, tokenizer)), got {type(model).__name__}"
        )
    if tokenizer is None and spec.images is None:
        raise ConfigError(f"{spec.factory}: text inputs need a tokenizer: return (module, tokenizer)")
    return _encoder(spec, model, root, None, tokenizer, None, pooled=spec.pooling != "none")


def _encoder(
    spec: HfBackbone | FactoryBackbone,
    model: nn.Module,
    root: Path,
    folder: Path | None,
    tokenizer: Any,
    processor: Any,
    *,
    pooled: bool,
) -> Backbone:
    """The model (with its checkpoint, pooled unless it gives features itself) and its input encoder."""
    if spec.pooling == "image_embeds":
        raise ConfigError(
            "backbone.pool: 'image_embeds' is for CLIP folders (model_type 'clip' or 'clip_vision_model')"
        )
    if spec.checkpoint is not None:
        load_into(model, resolve(root, spec.checkpoint))
    module = PooledEncoder(model, spec.pooling) if pooled else model
    prefix = "model." if module is not model else ""
    if spec.images is not None:
        size = spec.images.size
        mean = spec.images.mean or tuple(processor.image_mean)
        std = spec.images.std or tuple(processor.image_std)

        def encode(x: Any) -> Inputs:
            return prepare_images(np.asarray(x), size, mean, std)

        return Backbone(module.eval(), encode, "images", folder, prefix)
    max_length = spec.text.max_length if spec.text is not None else TextInputs.model_fields["max_length"].default

    def encode_text(x: Any) -> Inputs:
        enc = tokenizer(list(x), padding="max_length", truncation=True, max_length=max_length, return_tensors="pt")
        return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}

    return Backbone(module.eval(), encode_text, "text", folder, prefix, tokenizer)


def load_clip(spec: ClipBackbone, root: Path) -> Backbone:
    """The image tower of a CLIP folder (refused if `hf` is not one)."""
    folder = resolve(root, spec.hf)
    if not (folder / "config.json").is_file() or not clip.is_clip_folder(folder):
        raise ConfigError(f"{folder}: not a CLIP folder (model_type 'clip' or 'clip_vision_model')")
    return load_clip_backbone(spec, folder, root)


def load_clip_backbone(spec: HfBackbone | ClipBackbone, folder: Path, root: Path) -> Backbone:
    """The image tower of a Hugging Face CLIP folder (see taskvec.bench.clip)."""
    if getattr(spec, "text", None) is not None:
        raise ConfigError(f"backbone: {folder} is a CLIP folder, whose backbone is its image tower; remove 'text:'")
    module, features = clip.load_clip_vision(folder, spec.pool)
    if spec.images is None:
        encode_images, normalize = clip.image_processor_encoder(folder)
        module = clip.ClipImageEncoder(module.vision_model, module.visual_projection, normalize)
        encode: Callable[[Any], Inputs] = encode_images
    else:
        size = spec.images.size
        mean, std = spec.images.mean, spec.images.std
        if mean is None or std is None:
            processor = clip.image_processor(folder)
            mean, std = mean or tuple(processor.image_mean), std or tuple(processor.image_std)
        m, s = mean, std

        def encode(x: Any) -> Inputs:
            return prepare_images(np.asarray(x), size, m, s)

    prefixes = ("vision_model.",)
    if spec.checkpoint is not None:
        path = resolve(root, spec.checkpoint)
        module.load_state_dict(match_state(module.state_dict(), path, prefixes, optional=("visual_projection.weight",)))
    return Backbone(
        module.eval(),
        encode,
        "images",
        folder,
        clip=features,
        checkpoint_prefixes=prefixes,
        optional=("visual_projection.weight",) if features == "image_embeds" else (),
        complete_from=folder if clip.model_type(folder) == "clip" else None,
    )


def load_into(model: nn.Module, path: Path) -> None:
    """Load a checkpoint file or folder (any format taskvec reads) into `model`."""
    model.load_state_dict(match_state(model.state_dict(), path), strict=True)


def match_state(
    target: Mapping[str, torch.Tensor],
    path: Path,
    prefix: str | Sequence[str] = "",
    *,
    optional: Collection[str] = (),
) -> dict[str, torch.Tensor]:
    """The tensors of checkpoint `path` under the names of `target`.

    A name is found as is, without a `prefix` (a wrapped model's checkpoint saved unwrapped), or under
    one more leading module (e.g. 'bert.' of a task model with a classifier); extra tensors (a
    classifier) are ignored; a missing one is an error naming the file, unless it is `optional`
    (it then keeps its value in `target`)."""
    src = open_checkpoint(path)
    have = set(src.keys())
    prefixes = [prefix] if isinstance(prefix, str) else list(prefix)
    out, missing = {}, []
    for k, ref in target.items():
        bares = [k[len(p) :] for p in prefixes if p and k.startswith(p)] or [k]
        found = next((c for c in (k, *bares) if c in have), None)
        bare = bares[0]
        if found is None:
            found = next((c for c in have if c.endswith("." + bare) and c.count(".") == bare.count(".") + 1), None)
        if found is None and k in optional:
            out[k] = ref.detach().clone()
            continue
        if found is None:
            missing.append(k)
            continue
        t = read(src, found)
        if tuple(t.shape) != tuple(ref.shape):
            raise KeyMismatchError(
                f"{path}: tensor {found!r} has shape {tuple(t.shape)}, the backbone's has {tuple(ref.shape)}"
            )
        out[k] = t.to(ref.dtype)
    if missing:
        raise KeyMismatchError(f"{path}: lacks {len(missing)} tensors of the backbone, e.g. {missing[:3]}")
    return out


BACKBONES.register("hf", HfBackbone, load_hf)
BACKBONES.register("factory", FactoryBackbone, load_factory)
BACKBONES.register("clip", ClipBackbone, load_clip)
