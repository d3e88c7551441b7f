"""Frozen task heads on top of the backbone's features: each kind is a name, a pydantic config and
a builder. A suite picks one per task (or one for all) with `head: {kind: ...}`.

    head: {kind: linear_probe, c: 1.0}              # logistic regression on frozen pretrained features
    head: {kind: zero_shot, template: "a review that is {}."}   # text encoders: embeddings of label texts
    head: {kind: prototype, shots: 16}              # any encoder: class means of a few labelled examples
    head: {kind: file, path: heads/sentiment.safetensors}       # weight (C, D) and bias (C) of your own
    head: {kind: clip_zero_shot, templates: ["a photo of a {}."]}  # CLIP: class names by its text tower
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from pydantic import Field, field_validator, model_validator
from torch import nn

from taskvec.bench import clip
from taskvec.bench.cache import load_cached, save_atomic
from taskvec.bench.models import features, fit_head
from taskvec.bench.sources import import_object, resolve
from taskvec.config import Strict
from taskvec.errors import ConfigError
from taskvec.io.safetensors_file import SafetensorsFile
from taskvec.registry import Registry


@dataclass
class HeadContext:
    """What a head builder may use: the pretrained backbone, the task's data, its cache folder."""

    backbone: Any  # taskvec.bench.backbones.Backbone, with pretrained weights loaded
    task: Any  # taskvec.bench.suite.TaskData
    cache: Path
    root: Path


HeadBuilder = Callable[[Any, HeadContext], nn.Module]
HEADS: Registry[HeadBuilder] = Registry("head kind", group="taskvec.heads")
"""The head kinds by name."""


def linear(weight: torch.Tensor, bias: torch.Tensor) -> nn.Linear:
    """A frozen nn.Linear holding `weight` (C, D) and `bias` (C)."""
    head = nn.Linear(weight.shape[1], weight.shape[0])
    with torch.no_grad():
        head.weight.copy_(weight)
        head.bias.copy_(bias)
    return head.requires_grad_(False)


class LinearProbe(Strict):
    """Multinomial logistic regression fitted on frozen pretrained features of the train split."""

    kind: Literal["linear_probe"]
    c: float = Field(default=1.0, gt=0, description="inverse L2 strength")
    standardize: bool = False


def build_linear_probe(cfg: LinearProbe, ctx: HeadContext) -> nn.Module:
    """Fitted once and cached beside the task's fine-tuned checkpoint."""
    path = ctx.cache / "head.safetensors"
    h = load_cached(path, keys=("weight", "bias")) if path.exists() else None
    if h is not None:
        return linear(h["weight"], h["bias"])
    train = ctx.task.train
    head = fit_head(features(ctx.backbone.module, train), train.y, len(ctx.task.classes), cfg.c, cfg.standardize)
    save_atomic(head.state_dict(), path)
    return head


HEADS.register("linear_probe", LinearProbe, build_linear_probe)


class CosineHead(nn.Module):
    """logits = scale * cos(f - center, w_c): frozen class embeddings compared with features, both
    taken relative to an optional frozen `center` (for features that are all positive, such as
    pooled ReLU activations, whose raw cosines all sit near 1)."""

    def __init__(self, weight: torch.Tensor, scale: float, center: torch.Tensor | None = None):
        super().__init__()
        center = torch.zeros(weight.shape[1]) if center is None else center.float()
        self.center = nn.Parameter(center, requires_grad=False)
        self.weight = nn.Parameter(F.normalize(weight.float() - self.center, dim=-1), requires_grad=False)
        self.scale = scale

    def forward(self, f: torch.Tensor) -> torch.Tensor:
        return self.scale * F.normalize(f - self.center, dim=-1) @ self.weight.T


class ZeroShot(Strict):
    """Text encoders: each class's label text (in `template`) is embedded by the pretrained backbone."""

    kind: Literal["zero_shot"]
    template: str = "{}"
    labels: list[str] | None = Field(default=None, description="label texts in class order (default: the class names)")
    scale: float = Field(default=20.0, gt=0, description="logit scale (inverse temperature)")


def _labels(given: list[str] | None, ctx: HeadContext, what: str) -> list[str]:
    """The label text of each class, in class order: `head.labels`, else the class names."""
    labels = given or ctx.task.classes
    if len(labels) != len(ctx.task.classes):
        raise ConfigError(f"head.labels: {len(labels)} {what} for {len(ctx.task.classes)} classes")
    return list(labels)


@torch.no_grad()
def build_zero_shot(cfg: ZeroShot, ctx: HeadContext) -> nn.Module:
    """Class embeddings from the label texts, through the same encoder and pooling as the inputs."""
    if ctx.backbone.kind != "text":
        raise ConfigError("head kind 'zero_shot' needs a text backbone")
    labels = _labels(cfg.labels, ctx, "texts")
    ctx.backbone.module.eval()
    emb = ctx.backbone.module(ctx.backbone.encode([cfg.template.format(t) for t in labels]))
    return CosineHead(emb.float(), cfg.scale)


HEADS.register("zero_shot", ZeroShot, build_zero_shot)


class Prototype(Strict):
    """Any encoder: each class is the mean pretrained feature of its first `shots` training
    examples (nearest-class-mean, as in few-shot learning), compared by cosine. It needs no
    training, so the pretrained model keeps much less of the fine-tuned accuracy than a linear
    probe fitted on all of the training split: composition methods have room to differ."""

    kind: Literal["prototype"]
    shots: int = Field(default=16, ge=1, description="labelled training examples per class")
    scale: float = Field(default=16.0, gt=0, description="logit scale (inverse temperature)")
    center: bool = Field(default=True, description="measure cosines around the shots' mean feature")


@torch.no_grad()
def build_prototype(cfg: Prototype, ctx: HeadContext) -> nn.Module:
    """Class means of the first `shots` examples of each class in the (seeded) training split."""
    train = ctx.task.train
    picks: list[int] = []
    for c in range(len(ctx.task.classes)):
        idx = torch.nonzero(train.y == c).flatten()[: cfg.shots]
        if len(idx) == 0:
            raise ConfigError(f"task {ctx.task.spec.name!r}: class {ctx.task.classes[c]!r} has no training example")
        picks += idx.tolist()
    sub = train.take(torch.tensor(picks))
    f = features(ctx.backbone.module, sub).double()
    y = sub.y
    center = f.mean(0) if cfg.center else torch.zeros(f.shape[1], dtype=f.dtype)
    means = torch.stack([f[y == c].mean(0) for c in range(len(ctx.task.classes))])
    return CosineHead(means.float(), cfg.scale, center.float())


HEADS.register("prototype", Prototype, build_prototype)


class HeadFile(Strict):
    """A head of your own: a safetensors file with `weight` (classes, feature dim) and `bias` (classes)."""

    kind: Literal["file"]
    path: str


def build_head_file(cfg: HeadFile, ctx: HeadContext) -> nn.Module:
    """Read and check against the task's classes."""
    path = resolve(ctx.root, cfg.path)
    if not path.is_file():
        raise ConfigError(f"{path}: no such head file")
    f = SafetensorsFile(path)  # a damaged or crafted file is one error naming it
    try:
        h = {k: f.read(k) for k in f.keys()}
    finally:
        f.close()
    if "weight" not in h:
        raise ConfigError(f"{path}: a head file needs a 'weight' tensor (classes, feature dim)")
    w = h["weight"].float()
    b = h.get("bias", torch.zeros(w.shape[0])).float()
    if w.shape[0] != len(ctx.task.classes) or b.shape != (w.shape[0],):
        raise ConfigError(
            f"{path}: weight {tuple(w.shape)} and bias {tuple(b.shape)} do not fit {len(ctx.task.classes)} classes"
        )
    return linear(w, b)


HEADS.register("file", HeadFile, build_head_file)


class ClipZeroShot(Strict):
    """CLIP image backbones: each class is the text embedding of its name in every template (the
    text tower and text projection of a CLIPModel, frozen), normalized, averaged over the
    templates and normalized again; logits are the cosines with the image embedding times CLIP's
    logit scale, as in the task arithmetic papers and FusionBench."""

    kind: Literal["clip_zero_shot"]
    templates: list[str] = Field(default_factory=lambda: ["a photo of a {}."], min_length=1)
    labels: list[str] | None = Field(default=None, description="class names in class order (default: the data's)")
    text_model: str | None = Field(
        default=None, description="a CLIPModel folder with the text tower (default: the backbone's folder)"
    )
    text_encoder: str | None = Field(
        default=None,
        description="'module:function' returning (encode, logit_scale): encode(list of texts) -> (N, D) "
        "text embeddings (e.g. open_clip's encode_text), instead of a Hugging Face text tower",
    )
    kwargs: dict[str, Any] = Field(default_factory=dict, description="arguments of text_encoder")
    scale: float | None = Field(default=None, gt=0, description="logit scale (default: the model's)")

    @field_validator("templates")
    @classmethod
    def _placeholder(cls, v: list[str]) -> list[str]:
        bad = [t for t in v if t.count("{}") != 1]
        if bad:
            raise ValueError(f"each template needs exactly one '{{}}' for the class name: {bad[0]!r}")
        return v

    @model_validator(mode="after")
    def _one_text_tower(self) -> ClipZeroShot:
        if self.text_model is not None and self.text_encoder is not None:
            raise ValueError("give 'text_model' (a CLIPModel folder) or 'text_encoder' ('module:function'), not both")
        return self


@torch.no_grad()
def build_clip_zero_shot(cfg: ClipZeroShot, ctx: HeadContext) -> nn.Module:
    """Class embeddings from templates x class names; the task's images decide nothing."""

    if ctx.backbone.kind != "images":
        raise ConfigError("head kind 'clip_zero_shot' needs an image backbone")
    labels = _labels(cfg.labels, ctx, "names")
    texts = [t.format(c) for c in labels for t in cfg.templates]
    projection: nn.Module | None = None
    if cfg.text_encoder is not None:
        if ctx.backbone.clip == "pooler":
            raise ConfigError(
                "head.text_encoder needs image features in the joint space; the backbone gives the vision "
                "tower's pooled output (pool: pooler): use pool: image_embeds"
            )
        out = import_object(cfg.text_encoder)(**cfg.kwargs)
        if not (isinstance(out, tuple) and len(out) == 2 and callable(out[0])):
            raise ConfigError(f"{cfg.text_encoder}: must return (encode, logit_scale)")
        emb, scale = torch.as_tensor(out[0](texts)).detach().float(), float(out[1])
    else:
        if cfg.text_model is None and ctx.backbone.hf_folder is None:
            raise ConfigError("head kind 'clip_zero_shot' on a factory backbone needs text_model or text_encoder")
        folder = resolve(ctx.root, cfg.text_model) if cfg.text_model is not None else ctx.backbone.hf_folder
        model, tokenizer = clip.clip_text_folder(folder)
        emb = clip.hf_text_embeddings(model, tokenizer, texts).float()
        scale = float(model.logit_scale.exp())
        if ctx.backbone.clip == "pooler":
            projection = clip.frozen_projection(model)
    if emb.dim() != 2 or emb.shape[0] != len(texts):
        raise ConfigError(f"head: the text encoder gave shape {tuple(emb.shape)} for {len(texts)} texts")
    weight = clip.class_embeddings(emb, len(labels), len(cfg.templates))
    head = clip.ClipZeroShotHead(weight, cfg.scale or scale, projection)
    ctx.backbone.module.eval()
    sample, _ = ctx.task.train.batch(slice(0, 1))
    dim = ctx.backbone.module(sample).shape[-1]
    want = projection.in_features if isinstance(projection, nn.Linear) else weight.shape[1]
    if dim != want:
        raise ConfigError(
            f"head kind 'clip_zero_shot': the backbone's features have {dim} dimensions, the head takes {want} "
            "(text embeddings of another CLIP, or image features without the visual projection?)"
        )
    return head


HEADS.register("clip_zero_shot", ClipZeroShot, build_clip_zero_shot)


def build_head(cfg: Any, ctx: HeadContext) -> nn.Module:
    """A frozen head of a validated head config (see HEADS)."""
    head = HEADS.get(cfg.kind).build(cfg, ctx)
    return head.requires_grad_(False)
