"""CLIP in a suite: the image tower of a Hugging Face CLIP folder as the backbone, and zero-shot
heads made from class names by CLIP's text tower (the setting of the task arithmetic papers).

    backbone: {hf: clip-vit-base-patch32}          # a CLIPModel, CLIPVisionModel(WithProjection) folder
    head: {kind: clip_zero_shot, templates: ["a photo of a {}.", "a photo of the {}."]}

The backbone is the vision tower; its features are the image embeddings through the visual
projection (`pool: image_embeds`, the default when the folder has the projection: a CLIPModel or
CLIPVisionModelWithProjection) or the vision tower's pooled output without it (`pool: pooler`, the
default for a bare CLIPVisionModel). With `pool: pooler` the projection is not fine-tuned or
composed: a zero-shot head applies the pretrained CLIPModel's projection, frozen, as FusionBench
does for its CLIPVisionModel pools.

Images are encoded by the folder's image processor (preprocessor_config.json: resize of the
shortest side, center crop, mean and std), kept as uint8 crops and normalized inside the backbone;
`images: {size, mean, std}` in the suite replaces that by a plain square resize.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from functools import lru_cache
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from taskvec.errors import ConfigError

CLIP_TYPES = ("clip", "clip_vision_model")
"""The `model_type`s of the config.json of the Hugging Face CLIP folders a suite accepts."""
ClipFeatures = Literal["image_embeds", "pooler"]


def model_type(folder: Path) -> str | None:
    """The `model_type` of a Hugging Face folder's config.json (None if it names none)."""
    try:
        cfg = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError) as e:
        raise ConfigError(f"{folder / 'config.json'}: cannot read it ({e})") from None
    mt = cfg.get("model_type") if isinstance(cfg, dict) else None
    return str(mt) if mt is not None else None


def is_clip_folder(folder: Path) -> bool:
    return (folder / "config.json").is_file() and model_type(folder) in CLIP_TYPES


class ClipImageEncoder(nn.Module):
    """CLIP's vision tower, optionally followed by its visual projection: images -> features.

    The tensors keep the names of a CLIPModel (`vision_model.*`, `visual_projection.weight`), so
    checkpoints of CLIPModel, CLIPVisionModel and CLIPVisionModelWithProjection folders load by
    name. With `normalize` (rescale factor, mean, std) the inputs are uint8-valued crops, scaled
    and normalized here (not stored: the statistics are no weights of the model)."""

    def __init__(
        self,
        vision_model: nn.Module,
        visual_projection: nn.Module | None,
        normalize: tuple[float, Sequence[float], Sequence[float]] | None = None,
    ):
        super().__init__()
        self.vision_model = vision_model
        self.visual_projection = visual_projection
        self.rescale = normalize[0] if normalize else None
        mean, std = (normalize[1], normalize[2]) if normalize else ((0.0,) * 3, (1.0,) * 3)
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.rescale is not None:
            dtype = next(self.vision_model.parameters()).dtype
            mean, std = self.get_buffer("mean").to(dtype), self.get_buffer("std").to(dtype)
            x = (x.to(dtype) * self.rescale - mean) / std
        pooled: torch.Tensor = self.vision_model(pixel_values=x).pooler_output
        return self.visual_projection(pooled) if self.visual_projection is not None else pooled


def _architectures(folder: Path) -> list[str]:
    cfg = json.loads((folder / "config.json").read_text())
    return [str(a) for a in cfg.get("architectures") or []]


def load_clip_vision(folder: Path, pool: str | None) -> tuple[ClipImageEncoder, ClipFeatures]:
    """The vision tower of a CLIP folder, with its projection when `pool` is image_embeds (the
    default when the folder has one)."""
    import transformers

    if pool not in (None, "image_embeds", "pooler"):
        raise ConfigError(
            f"backbone.pool: {pool!r} for the CLIP folder {folder}; choose 'image_embeds' (through the "
            "visual projection) or 'pooler' (the vision tower's pooled output)"
        )
    mt = model_type(folder)
    arch = _architectures(folder)
    if mt == "clip":
        full = transformers.CLIPModel.from_pretrained(str(folder), local_files_only=True)
        vision, proj = full.vision_model, full.visual_projection
    elif "CLIPVisionModelWithProjection" in arch:
        with_proj = transformers.CLIPVisionModelWithProjection.from_pretrained(str(folder), local_files_only=True)
        vision, proj = with_proj.vision_model, with_proj.visual_projection
    else:
        bare = transformers.CLIPVisionModel.from_pretrained(str(folder), local_files_only=True)
        vision, proj = getattr(bare, "vision_model", bare), None  # transformers < 5 wraps the tower once more
    if pool == "image_embeds" and proj is None:
        raise ConfigError(
            f"backbone.pool: 'image_embeds' needs the visual projection, but {folder} is a bare CLIPVisionModel; "
            "use pool: pooler (a clip_zero_shot head then applies the projection of its text_model folder)"
        )
    features: ClipFeatures = "pooler" if pool == "pooler" or proj is None else "image_embeds"
    return ClipImageEncoder(vision, proj if features == "image_embeds" else None), features


def image_processor(folder: Path) -> Any:
    """The image processor of a Hugging Face folder (its preprocessor_config.json)."""
    import transformers

    try:
        return transformers.AutoImageProcessor.from_pretrained(str(folder), local_files_only=True)
    except (OSError, ValueError) as e:
        raise ConfigError(
            f"{folder}: no image processor (preprocessor_config.json) to take the image size, mean and std "
            f"from ({e}); add the pretrained CLIP's preprocessor_config.json, or give backbone.images: "
            "{size, mean, std}"
        ) from None


def image_processor_encoder(
    folder: Path,
) -> tuple[Callable[[Any], torch.Tensor], tuple[float, list[float], list[float]]]:
    """The folder's image processor as an encoder of uint8 images (N, H, W[, 3]) into uint8-valued
    crops (N, 3, h, w), and the (rescale factor, mean, std) that normalize them."""
    processor = image_processor(folder)
    rescale = float(getattr(processor, "rescale_factor", 1 / 255))
    mean = [float(v) for v in processor.image_mean]
    std = [float(v) for v in processor.image_std]

    def encode(images: Any) -> torch.Tensor:
        x = np.asarray(images)
        if x.dtype != np.uint8 or x.ndim not in (3, 4):
            raise ValueError(f"expected uint8 images (N,H,W) or (N,H,W,3), got {x.dtype} {x.shape}")
        if x.ndim == 3:
            x = np.repeat(x[..., None], 3, axis=-1)
        out: list[torch.Tensor] = []
        for i in range(0, len(x), 256):
            batch = processor(images=list(x[i : i + 256]), do_rescale=False, do_normalize=False, return_tensors="pt")[
                "pixel_values"
            ]
            out.append(batch.round().clamp(0, 255).to(torch.uint8))
        return torch.cat(out) if out else torch.zeros(0, 3, 1, 1, dtype=torch.uint8)

    return encode, (rescale, mean, std)


# --------------------------------------------------------------------------- zero-shot heads


@lru_cache(maxsize=2)
def _text_tower(folder: str) -> tuple[Any, Any]:
    """A CLIPModel folder's model (eval, float32) and tokenizer, loaded once per process."""
    import transformers

    model = transformers.CLIPModel.from_pretrained(folder, local_files_only=True).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder, local_files_only=True)
    return model, tokenizer


def clip_text_folder(folder: Path) -> tuple[Any, Any]:
    """The CLIPModel and tokenizer of `folder`, refused with a clear error for other folders."""
    if not (folder / "config.json").is_file():
        raise ConfigError(f"{folder}: not a Hugging Face model folder (no config.json)")
    if model_type(folder) != "clip":
        raise ConfigError(
            f"{folder}: a clip_zero_shot head needs a CLIPModel folder (model_type 'clip', with the text tower), "
            f"this one is {model_type(folder)!r}; set head.text_model to the pretrained CLIPModel folder"
        )
    try:
        return _text_tower(str(folder))
    except (OSError, ValueError) as e:
        raise ConfigError(f"{folder}: cannot load the CLIP text tower or its tokenizer ({e})") from None


@torch.no_grad()
def hf_text_embeddings(model: Any, tokenizer: Any, texts: list[str], batch_size: int = 256) -> torch.Tensor:
    """text_projection(text tower's pooled output) of every text, as CLIPModel.get_text_features."""
    max_length = int(model.config.text_config.max_position_embeddings)
    out = []
    for i in range(0, len(texts), batch_size):
        enc = tokenizer(
            texts[i : i + batch_size], padding=True, truncation=True, max_length=max_length, return_tensors="pt"
        )
        pooled = model.text_model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]).pooler_output
        out.append(model.text_projection(pooled))
    return torch.cat(out)


def class_embeddings(text_emb: torch.Tensor, n_classes: int, n_templates: int) -> torch.Tensor:
    """(C, D) class embeddings from (C * n_templates, D) text embeddings in class-major order: each
    normalized, averaged over the templates, normalized again."""
    e = F.normalize(text_emb.double(), dim=-1).view(n_classes, n_templates, -1).mean(1)
    return F.normalize(e, dim=-1).float()


class ClipZeroShotHead(nn.Module):
    """logits = scale * cos(image embedding, class embedding); a frozen `projection` first maps the
    vision tower's pooled output into the joint space when the backbone's features are not projected."""

    def __init__(self, weight: torch.Tensor, scale: float, projection: nn.Module | None = None):
        super().__init__()
        self.weight = nn.Parameter(F.normalize(weight.float(), dim=-1), requires_grad=False)
        self.scale = scale
        self.projection = projection

    def forward(self, f: torch.Tensor) -> torch.Tensor:
        if self.projection is not None:
            f = self.projection(f)
        return self.scale * F.normalize(f, dim=-1) @ self.weight.T.to(f.dtype)


def frozen_projection(model: Any) -> nn.Linear:
    """A copy of a CLIPModel's visual projection, frozen."""
    w = model.visual_projection.weight.detach().clone()
    proj = nn.Linear(w.shape[1], w.shape[0], bias=False)
    with torch.no_grad():
        proj.weight.copy_(w)
    return proj.requires_grad_(False)
