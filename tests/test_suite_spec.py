"""Suite files: validation errors, every data source kind on real files, splits, heads, cache keys."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import ClassVar

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from taskvec.bench.heads import HEADS, HeadContext, build_head
from taskvec.bench.sources import SOURCES, load_source
from taskvec.bench.suite import SuiteSpec, builtin_suites, load_suite, raw_splits
from taskvec.errors import ConfigError


def _suite(tmp_path: Path, text: str) -> SuiteSpec:
    (tmp_path / "s.yaml").write_text(text)
    return load_suite(tmp_path / "s.yaml")


HEAD = "name: s\nbackbone: {factory: m:f, images: {size: 8}}\n"


def test_errors_name_the_file_and_the_key_path(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as e:
        _suite(
            tmp_path,
            HEAD + "tasks:\n  - name: a\n    data: {kind: csv, pth: a.csv}\n    split: {train: 1, val: 1, test: 1}\n",
        )
    msg = str(e.value)
    assert str(tmp_path / "s.yaml") in msg and "tasks.0.data" in msg and "path: Field required" in msg and "pth" in msg
    with pytest.raises(ConfigError, match=r"tasks\.0\.data: unknown data source kind 'parquett'"):
        _suite(
            tmp_path,
            HEAD + "tasks:\n  - name: a\n    data: {kind: parquett, path: a}\n    split: {train: 1, val: 1, test: 1}\n",
        )
    with pytest.raises(ConfigError, match=r"tasks\.0: .*needs 'split'"):
        _suite(tmp_path, HEAD + "tasks:\n  - name: a\n    data: {kind: csv, path: a.csv}\n")
    with pytest.raises(ConfigError, match=r"tasks\.0\.head: unknown head kind"):
        _suite(
            tmp_path,
            HEAD + "tasks:\n  - name: a\n    data: {kind: csv, path: a.csv}\n    split: {train: 1, val: 1, test: 1}\n"
            "    head: {kind: knn}\n",
        )
    with pytest.raises(ConfigError, match=r"backbone: .*exactly one of 'hf'"):
        _suite(tmp_path, "name: s\nbackbone: {pool: mean}\ntasks: []\n")
    with pytest.raises(ConfigError, match="unknown suite 'nope'"):
        load_suite("nope")


def test_every_builtin_suite_loads_and_keeps_its_cache_entries() -> None:
    """The shipped files name the cache entries that earlier versions wrote: the hash of the same
    recipe in the earlier format (name, data set, sizes; backbone, image size/length, seed; fine-tuning; C)."""
    assert {"tiny", "vision-4", "vision-6", "text-3"} <= set(builtin_suites())

    def h(obj: object) -> str:
        return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:12]

    datasets = {"mnist": "mnist", "fashion": "fashion_mnist", "digits": "sklearn_digits", "elpv": "elpv"}
    for name in ("vision-4", "text-3"):  # the linear-probe suites of earlier versions
        s = load_suite(name)
        text = s.backbone.text is not None
        b = h(
            {
                "backbone": "minilm-l6" if text else "efficientnet-lite0",
                "image_size": 64 if text else s.backbone.images.size,
                "max_length": s.backbone.text.max_length if text else 128,
                "seed": s.seed,
            }
        )
        ft = {**s.finetune.model_dump(), "epochs": s.finetune.epochs}
        for t in s.tasks:
            old = {
                "name": t.name,
                "dataset": t.name if text else datasets[t.name],
                "n_train": t.split.train,
                "n_val": t.split.val,
                "n_test": t.split.test,
            }
            assert t.cache_key == h({"b": b, "task": old, "ft": ft, "c": s.head.c}), (name, t.name)


def test_a_backbone_named_by_kind_is_the_short_form_with_the_same_cache_keys(tmp_path: Path) -> None:
    """`{hf: ...}` and `{factory: ...}` are the built-in kinds 'hf' and 'factory'; written either way,
    a suite hashes as its backbone always did (the recorded hashes of the built-in suites are
    checked above), so cached heads and checkpoints stay valid."""
    tasks = "tasks:\n  - name: a\n    data: {kind: csv, path: a.csv}\n    split: {train: 1, val: 1, test: 1}\n"
    for short, named in [
        ("{hf: m, pool: cls}", "{kind: hf, hf: m, pool: cls}"),
        ("{factory: m:f, images: {size: 8}}", "{kind: factory, factory: m:f, images: {size: 8}}"),
    ]:
        a = _suite(tmp_path, f"name: s\nbackbone: {short}\n{tasks}")
        b = _suite(tmp_path, f"name: s\nbackbone: {named}\n{tasks}")
        assert a.backbone == b.backbone and a.task_hash(a.tasks[0]) == b.task_hash(b.tasks[0])
    with pytest.raises(ConfigError, match=r"backbone: .*exactly one of 'hf'"):
        _suite(tmp_path, f"name: s\nbackbone: {{hf: m, factory: m:f}}\n{tasks}")
    with pytest.raises(ConfigError, match=r"backbone: .*unknown backbone kind 'onnx'"):
        _suite(tmp_path, f"name: s\nbackbone: {{kind: onnx, path: m.onnx}}\n{tasks}")
    with pytest.raises(ConfigError, match=r"backbone: .*text"):
        _suite(tmp_path, f"name: s\nbackbone: {{kind: clip, hf: m, text: {{max_length: 8}}}}\n{tasks}")


def test_table_sources_read_named_columns_and_string_labels(tmp_path: Path) -> None:
    (tmp_path / "a.csv").write_text('review,stars\n"good, really",pos\nbad,neg\nfine,pos\n')
    raw = load_source(SOURCES.parse({"kind": "csv", "path": "a.csv", "text": "review", "label": "stars"}), tmp_path)
    assert raw.x == ["good, really", "bad", "fine"] and raw.classes == ["neg", "pos"] and raw.y.tolist() == [1, 0, 1]
    (tmp_path / "a.jsonl").write_text('{"t": "x", "y": 2}\n{"t": "z", "y": 0}\n')
    raw = load_source(
        SOURCES.parse({"kind": "jsonl", "path": "a.jsonl", "text": "t", "label": "y", "classes": ["a", "b", "c"]}),
        tmp_path,
    )
    assert raw.x == ["x", "z"] and raw.y.tolist() == [2, 0] and raw.classes == ["a", "b", "c"]
    with pytest.raises(ConfigError, match="no column 'text'"):
        load_source(SOURCES.parse({"kind": "jsonl", "path": "a.jsonl"}), tmp_path)
    with pytest.raises(ConfigError, match=r"labels \['maybe'\] are not among"):
        (tmp_path / "b.csv").write_text("text,label\nx,maybe\n")
        load_source(SOURCES.parse({"kind": "csv", "path": "b.csv", "classes": ["no", "yes"]}), tmp_path)


def test_image_folder_npz_and_function_sources(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    imgs = {c: rng.integers(0, 256, (2, 6, 6, 3), dtype=np.uint8) for c in ("cat", "dog")}
    for c, arr in imgs.items():
        (tmp_path / "pics" / c).mkdir(parents=True)
        for i, a in enumerate(arr):
            Image.fromarray(a).save(tmp_path / "pics" / c / f"{i}.png")
    raw = load_source(SOURCES.parse({"kind": "images", "path": "pics"}), tmp_path)
    assert raw.classes == ["cat", "dog"] and raw.y.tolist() == [0, 0, 1, 1]
    np.testing.assert_array_equal(raw.x, np.concatenate([imgs["cat"], imgs["dog"]]))
    np.savez(tmp_path / "a.npz", x=imgs["cat"], y=np.array([1, 0]), classes=np.array(["u", "v"]))
    raw = load_source(SOURCES.parse({"kind": "npz", "path": "a.npz"}), tmp_path)
    np.testing.assert_array_equal(raw.x, imgs["cat"])
    assert raw.y.tolist() == [1, 0] and raw.classes == ["u", "v"]
    raw = load_source(
        SOURCES.parse(
            {
                "kind": "function",
                "function": "taskvec.bench.assets:select_classes",
                "kwargs": {"X": ["a", "b", "c"], "y": [0, 1, 2], "class_names": ["p", "q", "r"], "keep": ["r", "p"]},
            }
        ),
        tmp_path,
    )
    assert raw.x == ["a", "c"] and raw.y.tolist() == [1, 0] and raw.classes == ["r", "p"]
    with pytest.raises(ConfigError, match="has no 'nothing'"):
        load_source(SOURCES.parse({"kind": "function", "function": "taskvec.bench.assets:nothing"}), tmp_path)


def test_seeded_fraction_splits_are_disjoint_and_repeatable(tmp_path: Path) -> None:
    rows = "".join(f"t{i},{i % 3}\n" for i in range(40))
    (tmp_path / "d.csv").write_text("text,label\n" + rows)
    text = (
        HEAD + "tasks:\n  - name: a\n    data: {kind: csv, path: d.csv}\n    split: {train: 0.5, val: 0.25, test: 10}\n"
    )
    s = _suite(tmp_path, text)
    parts = raw_splits(s, s.tasks[0])
    assert [len(parts[k]) for k in ("train", "val", "test")] == [20, 10, 10]
    seen = [t for k in ("train", "val", "test") for t in parts[k].x]
    assert len(set(seen)) == 40
    again = raw_splits(_suite(tmp_path, text), s.tasks[0])
    assert again["val"].x == parts["val"].x
    other = raw_splits(_suite(tmp_path, text.replace("name: s\n", "name: s\nseed: 1\n")), s.tasks[0])
    assert other["val"].x != parts["val"].x
    for k in ("train", "val", "test"):  # each label read back from the row's text
        assert all(int(t[1:]) % 3 == int(y) for t, y in zip(parts[k].x, parts[k].y, strict=True))


def test_given_splits_match_labels_by_class_name(tmp_path: Path) -> None:
    (tmp_path / "tr.csv").write_text("text,label\na,x\nb,y\n")
    (tmp_path / "va.csv").write_text("text,label\nc,y\n")
    (tmp_path / "te.csv").write_text("text,label\nd,z\ne,x\n")
    s = _suite(
        tmp_path,
        HEAD + "tasks:\n  - name: a\n    data:\n      train: {kind: csv, path: tr.csv}\n"
        "      val: {kind: csv, path: va.csv}\n      test: {kind: csv, path: te.csv}\n",
    )
    parts = raw_splits(s, s.tasks[0])
    assert parts["train"].classes == ["x", "y", "z"]
    assert parts["val"].y.tolist() == [1] and parts["test"].y.tolist() == [2, 0]


class _Task:
    classes: ClassVar[list[str]] = ["a", "b", "c"]


def test_head_file_and_zero_shot_heads(tmp_path: Path) -> None:
    w, b = torch.randn(3, 4), torch.randn(3)
    save_file({"weight": w, "bias": b}, tmp_path / "h.safetensors")
    ctx = HeadContext(backbone=None, task=_Task(), cache=tmp_path, root=tmp_path)
    head = build_head(HEADS.parse({"kind": "file", "path": "h.safetensors"}), ctx)
    f = torch.randn(5, 4)
    torch.testing.assert_close(head(f), f @ w.T + b)
    save_file({"weight": torch.randn(2, 4)}, tmp_path / "bad.safetensors")
    with pytest.raises(ConfigError, match="do not fit 3 classes"):
        build_head(HEADS.parse({"kind": "file", "path": "bad.safetensors"}), ctx)

    class Encoder(torch.nn.Module):  # a text "backbone": one fixed embedding per label text
        def forward(self, x: list[str]) -> torch.Tensor:
            return torch.stack([torch.tensor([len(t), t.count("a"), t.count("b"), 1.0]) for t in x])

    class Loaded:
        kind, module = "text", Encoder()

        @staticmethod
        def encode(texts: list[str]) -> list[str]:
            return texts

    zs = build_head(
        HEADS.parse({"kind": "zero_shot", "template": "class {}", "scale": 1.0}),
        HeadContext(Loaded(), _Task(), tmp_path, tmp_path),
    )
    emb = Encoder()(["class a", "class b", "class c"])
    expect = torch.nn.functional.normalize(f, dim=-1) @ torch.nn.functional.normalize(emb, dim=-1).T
    torch.testing.assert_close(zs(f), expect)


def test_hf_image_backbone_with_its_processor_statistics(tmp_path: Path) -> None:
    """A Hugging Face vision folder: images resized and normalized with its processor's mean and
    std, features = the first token; checked against the model run by hand."""
    transformers = pytest.importorskip("transformers")
    from taskvec.bench.models import features
    from taskvec.bench.prepare import prepare

    torch.manual_seed(0)
    cfg = transformers.ViTConfig(
        image_size=8, patch_size=4, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32
    )
    transformers.ViTModel(cfg, add_pooling_layer=False).save_pretrained(tmp_path / "vit")
    mean, std = (0.3, 0.4, 0.5), (0.2, 0.25, 0.3)
    transformers.ViTImageProcessor(
        image_mean=list(mean), image_std=list(std), size={"height": 8, "width": 8}
    ).save_pretrained(tmp_path / "vit")
    rng = np.random.default_rng(0)
    for c in ("dark", "light"):
        (tmp_path / "pics" / c).mkdir(parents=True)
        for i in range(6):
            lo = 0 if c == "dark" else 128
            Image.fromarray(rng.integers(lo, lo + 128, (8, 8, 3), dtype=np.uint8)).save(
                tmp_path / "pics" / c / f"{i}.png"
            )
    (tmp_path / "s.yaml").write_text(
        "name: vis\nbackbone: {hf: vit, pool: cls, images: {size: 8}}\n"
        "finetune: {epochs: 1, batch_size: 4, lr: 0.001}\n"
        "tasks:\n  - name: shade\n    data: {kind: images, path: pics}\n"
        "    split: {train: 4, val: 4, test: 4}\n"
    )
    prep = prepare(tmp_path / "s.yaml", tmp_path / "cache", progress=False)
    raw = raw_splits(prep.suite, prep.suite.tasks[0])["test"]
    model = transformers.ViTModel.from_pretrained(tmp_path / "vit", add_pooling_layer=False).eval()
    x = torch.from_numpy(raw.x).float().permute(0, 3, 1, 2) / 255
    x = (x - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
    with torch.no_grad():
        ref = model(pixel_values=x).last_hidden_state[:, 0]
    prep.backbone.load_state_dict(prep.pretrained)
    torch.testing.assert_close(features(prep.backbone, prep.tasks["shade"].test), ref, rtol=1e-5, atol=1e-5)
    assert set(prep.finetune_seconds) == {"shade"} and prep.tasks["shade"].classes == ["dark", "light"]


def test_prototype_head_is_the_class_means_of_the_first_shots(tmp_path: Path) -> None:
    """Against a float64 recomputation: cos(f - c, mean_k - c) with c the mean of the chosen shots."""
    from taskvec.bench.suite import Split

    torch.manual_seed(0)
    x = torch.randn(40, 6)
    y = torch.arange(40) % 3
    backbone = torch.nn.Linear(6, 5)

    class Loaded:
        kind, module = "image", backbone

    class Spec:
        name = "t"

    class Task:
        spec = Spec()
        classes: ClassVar[list[str]] = ["a", "b", "c"]
        train = Split(x, y)

    head = build_head(
        HEADS.parse({"kind": "prototype", "shots": 4, "scale": 2.0}), HeadContext(Loaded(), Task(), tmp_path, tmp_path)
    )
    with torch.no_grad():
        f = backbone.double()(x.double())
        backbone.float()
    picks = torch.cat([torch.nonzero(y == c).flatten()[:4] for c in range(3)])
    center = f[picks].mean(0)
    means = torch.stack([f[picks][y[picks] == c].mean(0) for c in range(3)])
    q = torch.randn(7, 5).double()
    n = torch.nn.functional.normalize
    expect = 2.0 * n(q - center, dim=-1) @ n(means - center, dim=-1).T
    torch.testing.assert_close(head(q.float()).double(), expect, rtol=1e-5, atol=1e-5)
    assert not any(p.requires_grad for p in head.parameters())
    Task.train = Split(x[y != 2], y[y != 2])  # a class with no training example
    with pytest.raises(ConfigError, match="task 't': class 'c' has no training example"):
        build_head(HEADS.parse({"kind": "prototype"}), HeadContext(Loaded(), Task(), tmp_path, tmp_path))


def test_items_digest_pins_the_exact_items(tmp_path: Path) -> None:
    from taskvec.bench.suite import items_digest

    rows = "".join(f"text {i},{'pos' if i % 2 else 'neg'}\n" for i in range(30))
    (tmp_path / "a.csv").write_text("text,label\n" + rows)
    text = HEAD.replace("images: {size: 8}", "text: {max_length: 8}") + (
        "tasks:\n  - name: a\n    data: {kind: csv, path: a.csv}\n    split: {train: 10, val: 5, test: 5}\n"
    )
    s = _suite(tmp_path, text)
    d = items_digest(raw_splits(s, s.tasks[0]))
    assert d == items_digest(raw_splits(s, s.tasks[0]))  # repeatable
    (tmp_path / "a.csv").write_text("text,label\n" + rows.replace("text 7,pos", "text 7,neg"))
    changed = [items_digest(raw_splits(s, s.tasks[0]))]
    (tmp_path / "a.csv").write_text("text,label\n" + rows.replace("text 7,pos", "text 7 ,pos"))
    changed.append(items_digest(raw_splits(s, s.tasks[0])))
    assert d not in changed and changed[0] != changed[1]  # one label, or one item's text, changes it

    from taskvec.bench.suite import load_task

    class Loaded:
        kind = "text"

        @staticmethod
        def encode(texts: list[str]) -> dict[str, torch.Tensor]:
            return {
                "input_ids": torch.zeros(len(texts), 2, dtype=torch.long),
                "attention_mask": torch.ones(len(texts), 2),
            }

    pinned = _suite(tmp_path, text.replace("test: 5}", f"test: 5}}\n    items_sha256: {d}"))
    with pytest.raises(ConfigError, match=f"task 'a': the data set no longer gives the suite's items .*{d}"):
        load_task(pinned, pinned.tasks[0], Loaded())  # type: ignore[arg-type]
    (tmp_path / "a.csv").write_text("text,label\n" + rows)
    assert load_task(pinned, pinned.tasks[0], Loaded()).items_sha256 == d  # type: ignore[arg-type]


def test_zero_shot_head_on_real_minilm_names_obvious_topics(tmp_path: Path) -> None:
    """The real MiniLM encoder, label texts in a template: clear-cut news sentences get their topic."""
    from taskvec.bench.backbones import backbone_spec, load_backbone
    from taskvec.bench.suite import Split

    loaded = load_backbone(
        backbone_spec(factory="taskvec.bench.assets:load_minilm", pool="mean", text={"max_length": 32}), tmp_path
    )
    classes = ["sport", "business", "technology", "politics"]
    texts = [
        "The striker scored twice as the team won the football match.",
        "Shares fell sharply after the company reported lower quarterly profits.",
        "The new smartphone ships with a faster processor and more memory.",
        "Parliament voted on the government's election reform bill.",
    ]

    class Task:
        spec = type("Spec", (), {"name": "news"})()

    Task.classes = classes  # type: ignore[attr-defined]
    head = build_head(
        HEADS.parse({"kind": "zero_shot", "template": "a news story about {}."}),
        HeadContext(loaded, Task(), tmp_path, tmp_path),
    )
    from taskvec.bench.models import features

    f = features(loaded.module, Split(loaded.encode(texts), torch.arange(4)))
    assert head(f).argmax(-1).tolist() == [0, 1, 2, 3]


TASKS = "tasks:\n  - name: a\n    data: {kind: csv, path: a.csv}\n    split: {train: 1, val: 1, test: 1}\n"


def test_a_bad_compose_key_fails_in_load_suite_before_any_work(tmp_path: Path) -> None:
    from taskvec.bench.run import run_suite

    bad = {
        "train: {epoch: 10}": r"compose\.train\.epoch: Extra inputs are not permitted",
        "presets: {atlas_task: {train: {lr: -1}}}": r"compose\.presets\.atlas_task\.train\.lr: .*greater than 0",
        "presets: {variational: {composer: {kl_wieght: 1}}}": r"presets\.variational\.composer\.kl_wieght",
        "bases: {m: 2, nonsense: 1}": r"compose\.bases: .*nonsense",
        "static: {ties: {density: 2}}": r"compose\.static: ties\.density: .*less than or equal to 1",
        "static: {tiez: {}}": r"compose\.static: unknown merge method 'tiez'",
    }
    for text, msg in bad.items():
        (tmp_path / "s.yaml").write_text(HEAD + f"compose: {{{text}}}\n" + TASKS)
        with pytest.raises(ConfigError, match=msg) as e:
            load_suite(tmp_path / "s.yaml")
        assert "\n" not in str(e.value)
        with pytest.raises(ConfigError, match=msg):  # the run stops there: nothing loaded, nothing written
            run_suite(tmp_path / "s.yaml", out_dir=tmp_path / "runs", cache=tmp_path / "cache")
        assert not (tmp_path / "runs").exists() and not (tmp_path / "cache").exists()


def test_static_merges_and_training_options_are_typed(tmp_path: Path) -> None:
    from taskvec.methods import get_method

    text = (
        "compose:\n  static: {dare: {density: 0.3}, ties: {}}\n"
        "  train: {epochs: 3, lr: 0.01}\n  presets: {atlas_task: {train: {epochs: 5}}}\n  bases: {m: 2, merge: ties}\n"
    )
    spec = _suite(tmp_path, HEAD + text + TASKS).compose
    assert list(spec.static) == ["dare", "ties"]  # the suite's order is the run's
    assert spec.static["dare"] == get_method("dare").params(density=0.3, seed=0)
    assert spec.params("dare") == {"density": 0.3} and spec.params("ties") == {}  # as given: the stage keys
    assert spec.params("magnitude") == {}  # not in the suite: the method's defaults
    assert spec.train_options("atlas_task") == {"epochs": 5, "lr": 0.01}
    assert spec.train_options("variational") == {"epochs": 3, "lr": 0.01}
    assert spec.bases is not None and spec.bases.options() == {"m": 2, "merge": "ties"}
    assert spec.bases.method == "cluster" and spec.bases.method_options() == {"merge": "ties"}


def test_the_default_static_merges_are_the_four_methods_with_their_usual_params(tmp_path: Path) -> None:
    """A suite without `static:` runs what bench run always ran, with the same params (so the same
    stage keys and results)."""
    from taskvec.methods import get_method

    spec = _suite(tmp_path, HEAD + TASKS).compose
    usual = {
        "task_arithmetic": {},
        "ties": {"density": 0.2},
        "dare": {"density": 0.5, "seed": 0},
        "magnitude": {"density": 0.2},
    }
    assert list(spec.static) == list(usual)
    for m, params in usual.items():
        assert spec.params(m) == params
        assert spec.static[m] == get_method(m).params(**params)
    assert spec.bases is not None and spec.bases.options() == {}
    assert spec.train_options("atlas_task") == {}
