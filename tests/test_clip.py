"""CLIP as a suite backbone with zero-shot heads, end to end on a tiny random CLIP built here.

What a user of a public model pool holds is rebuilt in small: a pretrained Hugging Face CLIPModel
folder (with a CLIP tokenizer and image processor), and one fine-tuned CLIPVisionModel folder per
task, fine-tuned a few steps under the frozen zero-shot head (the FusionBench layout; one of them
saved as transformers 4 did, with 'vision_model.' names). Data: scikit-learn's digits, as an image
folder and as an .npz file. `bench run` composes with every method; heads, pool folders and a merge
are checked against float64 recomputations made here with transformers only."""

from __future__ import annotations

import json
import string
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

transformers = pytest.importorskip("transformers")
pytest.importorskip("sklearn")

from taskvec.cli import app  # noqa: E402

NAMES = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
TEMPLATES = ["a photo of the number {}.", "a digit {}."]
TASKS = {"low": [0, 1, 2, 3, 4], "high": [5, 6, 7, 8, 9]}


def _tokenizer(folder: Path) -> Any:
    """A CLIP BPE tokenizer over single characters (no merges): enough for class-name prompts."""
    chars = list(string.ascii_lowercase + string.digits + ".,'-")
    vocab = {c: i for i, c in enumerate(chars)}
    vocab.update({c + "</w>": len(chars) + i for i, c in enumerate(chars)})
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    folder.mkdir(parents=True)
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    return transformers.CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"))


def _digits() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    d = load_digits()
    return (d.images * 16).clip(0, 255).astype(np.uint8), d.target.astype(np.int64)


def _pixels(folder: Path, images: np.ndarray) -> torch.Tensor:
    """The reference preprocessing: the folder's image processor as transformers runs it."""
    proc = transformers.AutoImageProcessor.from_pretrained(folder)
    rgb = [np.repeat(im[..., None], 3, -1) if im.ndim == 2 else im for im in images]
    return proc(images=rgb, return_tensors="pt")["pixel_values"]


def _class_weights(model: Any, tok: Any, labels: list[str]) -> torch.Tensor:
    """(C, D) zero-shot class embeddings in float64: templates embedded, normalized, averaged, normalized."""
    texts = [t.format(c) for c in labels for t in TEMPLATES]
    enc = tok(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        pooled = model.text_model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]).pooler_output
        emb = F.normalize(model.text_projection(pooled).double(), dim=-1)
    return F.normalize(emb.view(len(labels), len(TEMPLATES), -1).mean(1), dim=-1)


def _vision(model: Any) -> Any:
    """The vision tower inside a CLIPModel / CLIPVisionModel (transformers 4 wraps it once more)."""
    return getattr(model.vision_model, "vision_model", model.vision_model)


@pytest.fixture(scope="module", autouse=True)
def _one_thread() -> Any:
    """A tiny model runs fastest on one thread (and does not fight the other tests for cores)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("clip")
    tok = _tokenizer(root / "tok")
    v = tok.get_vocab()
    torch.manual_seed(0)
    cfg = transformers.CLIPConfig(
        text_config={
            "vocab_size": len(v),
            "hidden_size": 32,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "intermediate_size": 64,
            "max_position_embeddings": 32,
            "bos_token_id": v["<|startoftext|>"],
            "eos_token_id": v["<|endoftext|>"],
            "pad_token_id": v["<|endoftext|>"],
        },
        vision_config={
            "hidden_size": 32,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "intermediate_size": 64,
            "image_size": 32,
            "patch_size": 8,
        },
        projection_dim=16,
        logit_scale_init_value=4.6052,  # CLIP's trained scale, 100
    )
    clip = transformers.CLIPModel(cfg).eval()
    clip.save_pretrained(root / "clip-vit")
    tok.save_pretrained(root / "clip-vit")
    transformers.CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(
        root / "clip-vit"
    )

    x, y = _digits()
    (root / "data").mkdir()
    pool_items = np.arange(len(y)) < 700  # the pool was fine-tuned on other items than the suite's
    from PIL import Image

    for task, digits in TASKS.items():
        keep = np.isin(y, digits)
        xs, ys = x[keep & ~pool_items], y[keep & ~pool_items]
        if task == "low":  # an image folder, one sub-folder per class name
            for i, (im, label) in enumerate(zip(xs, ys, strict=True)):
                (root / "data" / task / NAMES[label]).mkdir(parents=True, exist_ok=True)
                Image.fromarray(im).save(root / "data" / task / NAMES[label] / f"{i}.png")
        else:  # an .npz file: inverted digits, labels as class names
            names = [NAMES[d] for d in digits]
            np.savez(root / "data" / f"{task}.npz", x=255 - xs, y=np.array([NAMES[d] for d in ys]), classes=names)

        # the pool's fine-tuning: the vision tower only, under the frozen zero-shot head
        vision = transformers.CLIPVisionModel(cfg.vision_config)
        _vision_inner(vision).load_state_dict(_vision(clip).state_dict())
        labels = sorted(NAMES[d] for d in digits) if task == "low" else [NAMES[d] for d in digits]
        w = _class_weights(clip, tok, labels).float()
        xt, yt = x[keep & pool_items], y[keep & pool_items]
        xt = xt if task == "low" else 255 - xt
        pix = _pixels(root / "clip-vit", xt)
        target = torch.tensor([labels.index(NAMES[d]) for d in yt])
        opt = torch.optim.AdamW(vision.parameters(), lr=3e-3)
        g = torch.Generator().manual_seed(1)
        for _ in range(80):
            idx = torch.randperm(len(target), generator=g)[:32]
            f = clip.visual_projection(vision(pixel_values=pix[idx]).pooler_output)
            loss = F.cross_entropy(clip.logit_scale.exp().detach() * F.normalize(f, dim=-1) @ w.T, target[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
        vision.save_pretrained(root / "pool" / task)
        if task == "high":  # as transformers 4 saved CLIPVisionModel folders: names under 'vision_model.'
            path = root / "pool" / task / "model.safetensors"
            state = load_file(path)
            save_file({f"vision_model.{k.removeprefix('vision_model.')}": t for k, t in state.items()}, path)
    (root / "suite.yaml").write_text(f"""\
name: clip-tiny
backbone: {{hf: clip-vit}}
head: {{kind: clip_zero_shot, templates: {json.dumps(TEMPLATES)}}}
compose:
  bases: {{m: 1}}
  learned: [atlas_task, atlas_block, adamerging_block, variational]
  train: {{epochs: 2, batch_size: 64, lr: 0.01}}
tasks:
  - name: low
    data: {{kind: images, path: data/low}}
    split: {{train: 10, val: 100, test: 150}}
    finetuned: pool/low
  - name: high
    data: {{kind: npz, path: data/high.npz}}
    split: {{train: 10, val: 100, test: 150}}
    finetuned: pool/high
""")
    return root


def _vision_inner(model: Any) -> Any:
    return getattr(model, "vision_model", model)


@pytest.fixture(scope="module")
def ran(project: Path) -> dict[str, Any]:
    r = CliRunner().invoke(
        app,
        ["bench", "run", str(project / "suite.yaml"), "-o", str(project / "runs"), "--cache", str(project / "cache")],
        catch_exceptions=False,
    )
    assert r.exit_code == 0, r.output
    out: dict[str, Any] = json.loads((project / "runs" / "clip-tiny" / "results.json").read_text())
    return out


@pytest.fixture(scope="module")
def prep(project: Path, ran: dict[str, Any]) -> Any:
    from taskvec.bench.prepare import prepare

    return prepare(project / "suite.yaml", project / "cache", progress=False)


def _raw_test(prep: Any, task: str) -> tuple[np.ndarray, np.ndarray]:
    from taskvec.bench.suite import raw_splits

    raw = raw_splits(prep.suite, prep.suite.task(task))["test"]
    return np.asarray(raw.x), raw.y


def _reference(
    project: Path, prep: Any, task: str, vision_state: dict[str, torch.Tensor] | None = None
) -> torch.Tensor:
    """float64 zero-shot logits of the task's test images, by transformers alone."""
    model = transformers.CLIPModel.from_pretrained(project / "clip-vit").double().eval()
    if vision_state is not None:
        _vision(model).load_state_dict(vision_state)
    tok = transformers.AutoTokenizer.from_pretrained(project / "clip-vit")
    w = _class_weights(model, tok, prep.tasks[task].classes)
    x, _ = _raw_test(prep, task)
    with torch.no_grad():
        f = model.visual_projection(
            _vision(model)(pixel_values=_pixels(project / "clip-vit", x).double()).pooler_output
        )
        return model.logit_scale.exp() * F.normalize(f, dim=-1) @ w.T


def test_zero_shot_head_logits_equal_a_float64_recomputation(project: Path, prep: Any) -> None:
    for task in TASKS:
        with torch.no_grad():
            got = prep.heads[task](prep.backbone(prep.tasks[task].test.x))
        ref = _reference(project, prep, task)
        torch.testing.assert_close(got.double(), ref, atol=2e-5, rtol=1e-5)


def test_pool_folders_load_under_the_backbones_names(project: Path, prep: Any) -> None:
    """Both layouts of CLIPVisionModel folders; the projection they lack keeps its pretrained value."""
    for task in TASKS:
        files = load_file(project / "pool" / task / "model.safetensors")
        ft = prep.finetuned[task]
        assert set(ft) == set(prep.pretrained)
        for k, t in files.items():
            assert torch.equal(ft["vision_model." + k.removeprefix("vision_model.")], t)
        assert torch.equal(ft["visual_projection.weight"], prep.pretrained["visual_projection.weight"])
        assert not torch.equal(
            ft["vision_model.post_layernorm.weight"], prep.pretrained["vision_model.post_layernorm.weight"]
        )


def test_bench_run_reports_every_method(project: Path, ran: dict[str, Any]) -> None:
    assert set(ran["methods"]) == {"task_arithmetic", "ties", "dare", "magnitude"}
    assert set(ran["learned"]) == {"atlas_task", "atlas_block", "adamerging_block", "variational"}
    assert "bases" in ran and set(ran["negation"]) == set(TASKS)
    for task in TASKS:  # the pool's fine-tuning gained over the random zero-shot head
        assert ran["finetuned"][task] > ran["pretrained"][task] + 0.2
    table = (project / "runs" / "clip-tiny" / "results.md").read_text()
    for label in ("task_arithmetic (λ=", "ties (λ=", "dare (λ=", "magnitude (λ=", "bank of M = 1 bases", "atlas_task"):
        assert label in table
    for name in ("atlas_block", "adamerging_block", "variational"):
        assert f"| {name} |" in table
        runs = ran["learned"][name]
        assert all(0.0 <= a <= 1.0 for r in runs for a in r["test"].values())


def test_task_arithmetic_accuracy_equals_a_float64_merge_of_the_pool_files(
    project: Path, prep: Any, ran: dict[str, Any]
) -> None:
    """theta0 + lambda * sum(tau) of the pool files, in float64 with transformers, at the reported lambda."""
    lam = ran["methods"]["task_arithmetic"]["lambda"]
    model = transformers.CLIPModel.from_pretrained(project / "clip-vit").double()
    base = {k: v.double() for k, v in _vision(model).state_dict().items()}
    merged = dict(base)
    for task in TASKS:
        files = load_file(project / "pool" / task / "model.safetensors")
        for k, t in files.items():
            name = k.removeprefix("vision_model.")
            merged[name] = merged[name] + lam * (t.double() - base[name])
    for task in TASKS:
        _, y = _raw_test(prep, task)
        acc = float((_reference(project, prep, task, merged).argmax(-1).numpy() == y).mean())
        assert abs(acc - ran["methods"]["task_arithmetic"]["test"][task]) <= 1.0 / len(y) + 1e-12


def test_a_clip_vision_folder_with_the_text_tower_of_a_clip_folder(project: Path, prep: Any, tmp_path: Path) -> None:
    """A bare CLIPVisionModel backbone gives the pooled output; the head of a separate CLIPModel
    folder applies that folder's projection, frozen: the same logits as the CLIPModel backbone."""
    from taskvec.bench.backbones import backbone_spec, load_backbone
    from taskvec.bench.heads import HEADS, HeadContext, build_head
    from taskvec.bench.suite import load_task
    from taskvec.errors import ConfigError

    clip = transformers.CLIPModel.from_pretrained(project / "clip-vit")
    vision = transformers.CLIPVisionModel(clip.config.vision_config)
    _vision_inner(vision).load_state_dict(_vision(clip).state_dict())
    vision.save_pretrained(tmp_path / "vision")
    transformers.AutoImageProcessor.from_pretrained(project / "clip-vit").save_pretrained(tmp_path / "vision")
    loaded = load_backbone(backbone_spec(hf=str(tmp_path / "vision")), project)
    assert loaded.clip == "pooler" and "visual_projection.weight" not in loaded.module.state_dict()
    task = load_task(prep.suite, prep.suite.task("high"), loaded)
    cfg = HEADS.parse({"kind": "clip_zero_shot", "templates": TEMPLATES, "text_model": "clip-vit"})
    head = build_head(cfg, HeadContext(loaded, task, tmp_path, project))
    with torch.no_grad():
        got = head(loaded.module(task.test.x))
        ref = prep.heads["high"](prep.backbone(prep.tasks["high"].test.x))
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)
    pooled = load_backbone(backbone_spec(hf="clip-vit", pool="pooler"), project)  # FusionBench's split
    assert pooled.clip == "pooler" and set(pooled.module.state_dict()) == set(loaded.module.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(pooled.module(task.test.x), loaded.module(task.test.x), atol=0, rtol=0)
    with pytest.raises(ConfigError, match="CLIPModel folder"):  # the bare folder has no text tower
        build_head(HEADS.parse({"kind": "clip_zero_shot"}), HeadContext(loaded, task, tmp_path, project))


def test_text_encoder_function_gives_the_same_head(
    project: Path, prep: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`text_encoder: module:function` (the shape an open_clip text tower is given in)."""
    from taskvec.bench.heads import HEADS, HeadContext, build_head

    (tmp_path / "my_clip_text.py").write_text("""\
import torch, transformers
def text(folder):
    model = transformers.CLIPModel.from_pretrained(folder)
    tok = transformers.AutoTokenizer.from_pretrained(folder)
    @torch.no_grad()
    def encode(texts):
        enc = tok(texts, padding=True, return_tensors="pt")
        return model.text_projection(model.text_model(**enc).pooler_output)
    return encode, float(model.logit_scale.exp())
""")
    monkeypatch.syspath_prepend(str(tmp_path))
    cfg = HEADS.parse(
        {
            "kind": "clip_zero_shot",
            "templates": TEMPLATES,
            "text_encoder": "my_clip_text:text",
            "kwargs": {"folder": str(project / "clip-vit")},
        }
    )
    assert prep.loaded is not None
    head = build_head(cfg, HeadContext(prep.loaded, prep.tasks["low"], tmp_path, project))
    f = prep.backbone(prep.tasks["low"].test.x[:16])
    with torch.no_grad():
        torch.testing.assert_close(head(f), prep.heads["low"](f), atol=1e-5, rtol=1e-5)


def test_per_sample_composition_of_clip_equals_one_model_per_sample(prep: Any) -> None:
    """The class token (a tensor expanded over the batch) is composed per sample too."""
    from taskvec.variational.engine import ComposedModel

    backbone = prep.backbone.double()
    try:
        tvs = [{k: prep.finetuned[t][k].double() - prep.pretrained[k].double() for k in prep.pretrained} for t in TASKS]
        cm = ComposedModel(backbone, tvs, blocks="tensor")
        x = prep.tasks["low"].test.x[:6]
        alpha = torch.rand(6, 2, cm.num_blocks, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
        torch.testing.assert_close(cm(x, alpha), cm.naive_forward(x, alpha), atol=1e-10, rtol=1e-10)
    finally:
        backbone.float().load_state_dict(prep.pretrained)


def test_clip_settings_that_cannot_work_are_refused(project: Path) -> None:
    from pydantic_core import PydanticCustomError

    from taskvec.bench.backbones import backbone_spec, load_backbone
    from taskvec.bench.heads import HEADS
    from taskvec.errors import ConfigError

    with pytest.raises(ConfigError, match="pool.*'image_embeds'.*'pooler'"):
        load_backbone(backbone_spec(hf="clip-vit", pool="mean"), project)
    with pytest.raises(ConfigError, match="remove 'text:'"):
        load_backbone(backbone_spec(hf="clip-vit", text={"max_length": 8}), project)
    with pytest.raises(PydanticCustomError, match="exactly one '{}'"):
        HEADS.parse({"kind": "clip_zero_shot", "templates": ["no placeholder"]})


def test_an_exported_task_model_loads_as_a_whole_clip_model(project: Path, prep: Any, tmp_path: Path) -> None:
    """`compose export` of a CLIP suite: the composed vision tower and projection, with the text
    tower copied from the pretrained folder, loads with CLIPModel.from_pretrained."""
    from taskvec.bench.compose import ComposeRunConfig, composed_state, export_task, train_on_suite
    from taskvec.io.hf import copy_model_files

    cfg = ComposeRunConfig(
        suite=str(project / "suite.yaml"),
        preset="atlas_task",
        cache=str(project / "cache"),
        train={"epochs": 1, "batch_size": 64, "lr": 0.01, "progress": False},
    )
    composer, _, prep2 = train_on_suite(cfg, tmp_path / "composer")
    out, alpha = export_task(composer, prep2, "low", tmp_path / "low-model", copy_model_files=copy_model_files)
    model = transformers.CLIPModel.from_pretrained(out)
    pretrained = transformers.CLIPModel.from_pretrained(project / "clip-vit")
    want = composed_state(composer, prep2, alpha)
    got = model.state_dict()
    for k, t in pretrained.state_dict().items():
        torch.testing.assert_close(got[k], want.get(k, t), atol=0, rtol=0)
    assert not torch.equal(
        got["vision_model.post_layernorm.weight"], pretrained.state_dict()["vision_model.post_layernorm.weight"]
    )


def test_the_field_protocol_suite_in_the_docs_is_a_valid_suite(tmp_path: Path) -> None:
    """docs/field-protocol.md: its suite file and its open_clip backbone/head validate."""
    import re

    import yaml

    from taskvec.bench.backbones import backbone_spec
    from taskvec.bench.heads import HEADS
    from taskvec.bench.suite import load_suite

    doc = (Path(__file__).parents[1] / "docs" / "field-protocol.md").read_text()
    suite_yaml, factory_yaml = re.findall(r"```yaml\n(.*?)```", doc, re.S)
    (tmp_path / "field-8.yaml").write_text(suite_yaml)
    suite = load_suite(tmp_path / "field-8.yaml")
    assert [t.name for t in suite.tasks] == [
        "sun397",
        "stanford-cars",
        "resisc45",
        "eurosat",
        "svhn",
        "gtsrb",
        "mnist",
        "dtd",
    ]
    assert all(suite.head_of(t).kind == "clip_zero_shot" and t.finetuned for t in suite.tasks)
    assert len(suite.task("eurosat").head.labels) == 10  # type: ignore[union-attr]
    factory = yaml.safe_load(factory_yaml)
    assert backbone_spec(**factory["backbone"]).factory == "myclip:visual"
    assert HEADS.parse(factory["head"]).text_encoder == "myclip:text"  # type: ignore[attr-defined]


def test_images_override_the_clip_image_processor(project: Path) -> None:
    """`images: {size}` replaces the processor's resize and crop; mean and std stay the processor's."""
    from taskvec.bench.backbones import backbone_spec, load_backbone, prepare_images

    x, _ = _digits()
    loaded = load_backbone(backbone_spec(hf="clip-vit", images={"size": 32}), project)
    proc = transformers.AutoImageProcessor.from_pretrained(project / "clip-vit")
    want = prepare_images(x[:8], 32, tuple(proc.image_mean), tuple(proc.image_std))
    assert torch.equal(loaded.encode(x[:8]), want)
    with torch.no_grad():
        model = transformers.CLIPModel.from_pretrained(project / "clip-vit").eval()
        ref = model.visual_projection(_vision(model)(pixel_values=want).pooler_output)
        torch.testing.assert_close(loaded.module(want), ref, atol=1e-6, rtol=1e-6)
