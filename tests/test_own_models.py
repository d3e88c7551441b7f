"""The bring-your-own walk-through (docs/own-models.md) end to end through the CLI, on a small BERT
built in the test: a Hugging Face folder, two fine-tuned folders, CSV data, a suite YAML; then
`bench run`, `compose train/eval/predict/export`, and the outputs checked against float64
references recomputed from the checkpoints on disk."""

from __future__ import annotations

import csv
import json
import random
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

transformers = pytest.importorskip("transformers")

from taskvec.cli import app  # noqa: E402

WORDS = {
    "sentiment": {"pos": ["good", "great", "fine", "nice"], "neg": ["bad", "awful", "poor", "sad"]},
    "topic": {"sport": ["ball", "goal", "team", "match"], "politics": ["vote", "law", "party", "state"]},
}
FILLER = ["the", "a", "it", "was", "is", "and", "very", "this", "day", "one"]


def _rows(task: str, n: int, rng: random.Random) -> list[dict[str, str]]:
    rows = []
    for i in range(n):
        label = list(WORDS[task])[i % 2]
        words = [rng.choice(FILLER) for _ in range(5)] + [rng.choice(WORDS[task][label]) for _ in range(2)]
        rng.shuffle(words)
        rows.append({"text": " ".join(words), "label": label})
    return rows


def _write_csv(path: Path, rows: list[dict[str, str]]) -> None:
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["text", "label"])
        w.writeheader()
        w.writerows(rows)


def _mean_pool(model: torch.nn.Module, enc: dict[str, torch.Tensor]) -> torch.Tensor:
    h = model(**enc).last_hidden_state
    m = enc["attention_mask"].unsqueeze(-1).to(h.dtype)
    return (h * m).sum(1) / m.sum(1)


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """What a user holds: a pretrained HF folder, two fine-tuned HF folders, CSV files, a suite."""
    root = tmp_path_factory.mktemp("own")
    vocab = [
        "[PAD]",
        "[UNK]",
        "[CLS]",
        "[SEP]",
        "[MASK]",
        *FILLER,
        *(w for t in WORDS.values() for ws in t.values() for w in ws),
    ]
    (root / "vocab.txt").write_text("\n".join(vocab) + "\n")
    tok = transformers.BertTokenizer(str(root / "vocab.txt"), do_lower_case=True)  # WordPiece over the vocab file
    torch.manual_seed(0)
    cfg = transformers.BertConfig(
        vocab_size=len(vocab),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=32,
    )
    base = transformers.BertModel(cfg).eval()
    base.save_pretrained(root / "bert-base")
    tok.save_pretrained(root / "bert-base")
    rng = random.Random(0)
    (root / "data").mkdir()
    _write_csv(root / "data" / "sentiment.csv", _rows("sentiment", 96, rng))
    for split, n in (("train", 64), ("val", 32), ("test", 32)):
        _write_csv(root / "data" / f"topic-{split}.csv", _rows("topic", n, rng))
    for task, labels in WORDS.items():  # a few optimizer steps of each task's own fine-tuning
        model = transformers.BertModel.from_pretrained(root / "bert-base")
        head = torch.nn.Linear(32, 2)
        opt = torch.optim.AdamW([*model.parameters(), *head.parameters()], lr=3e-3)
        rows = _rows(task, 64, random.Random(1))
        enc = dict(tok([r["text"] for r in rows], padding=True, return_tensors="pt"))
        enc.pop("token_type_ids")
        y = torch.tensor([list(labels).index(r["label"]) for r in rows])
        for _ in range(8):
            loss = torch.nn.functional.cross_entropy(head(_mean_pool(model, enc)), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
        model.save_pretrained(root / f"ft-{task}")
    (root / "suite.yaml").write_text("""\
name: my-suite
backbone: {hf: bert-base, pool: mean, text: {max_length: 16}}
head: {kind: linear_probe, c: 1.0}
tasks:
  - name: sentiment
    data: {kind: csv, path: data/sentiment.csv, text: text, label: label}
    split: {train: 0.5, val: 0.25, test: 0.25}
    finetuned: ft-sentiment
  - name: topic
    data:
      train: {kind: csv, path: data/topic-train.csv}
      val: {kind: csv, path: data/topic-val.csv}
      test: {kind: csv, path: data/topic-test.csv}
    finetuned: ft-topic
""")
    (root / "compose.yaml").write_text("""\
suite: suite.yaml
preset: variational
cache: cache
train: {epochs: 3, batch_size: 32, lr: 0.01, progress: false}
""")
    return root


def _invoke(*args: str) -> str:
    r = CliRunner().invoke(app, [str(a) for a in args], catch_exceptions=False)
    assert r.exit_code == 0, r.output
    return r.output


@pytest.fixture(scope="module")
def walked(project: Path) -> Path:
    """The walk-through's commands, in order."""
    root = project
    _invoke(
        "bench",
        "run",
        root / "suite.yaml",
        "--methods",
        "task_arithmetic",
        "--no-negation",
        "-o",
        root / "runs",
        "--cache",
        root / "cache",
    )
    _invoke("compose", "train", root / "compose.yaml", "-o", root / "composer")
    _invoke("compose", "eval", root / "composer")
    _invoke(
        "compose",
        "predict",
        root / "composer",
        root / "data" / "topic-test.csv",
        "--task",
        "topic",
        "-o",
        root / "preds.jsonl",
    )
    _invoke(
        "compose",
        "predict",
        root / "composer",
        root / "data" / "topic-val.csv",
        "--task",
        "topic",
        "-o",
        root / "val.jsonl",
    )
    _invoke("compose", "export", root / "composer", "--task", "topic", "-o", root / "topic-model")
    return root


def _tok(root: Path):  # type: ignore[no-untyped-def]
    return transformers.AutoTokenizer.from_pretrained(root / "bert-base")


def _encode(root: Path, texts: list[str]) -> dict[str, torch.Tensor]:
    enc = _tok(root)(texts, padding="max_length", truncation=True, max_length=16, return_tensors="pt")
    return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}


def _head(root: Path, task: str) -> dict[str, torch.Tensor]:
    (folder,) = (root / "cache" / "bench" / "my-suite").glob(f"{task}-*")
    return load_file(folder / "head.safetensors")


def _texts(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _accuracy(root: Path, state: dict[str, torch.Tensor], task: str, rows: list[dict[str, str]]) -> float:
    model = transformers.BertModel.from_pretrained(root / "bert-base").eval()
    model.load_state_dict(state)
    h = _head(root, task)
    with torch.no_grad():
        logits = _mean_pool(model, _encode(root, [r["text"] for r in rows])) @ h["weight"].T + h["bias"]
    y = torch.tensor([sorted(WORDS[task]).index(r["label"]) for r in rows])
    return float((logits.argmax(-1) == y).float().mean())


def test_bench_run_scores_the_users_own_checkpoints(walked: Path) -> None:
    root = walked
    results = json.loads((root / "runs" / "my-suite" / "results.json").read_text())
    test_rows = _texts(root / "data" / "topic-test.csv")
    ft = load_file(root / "ft-topic" / "model.safetensors")
    base = load_file(root / "bert-base" / "model.safetensors")
    assert results["finetuned"]["topic"] == pytest.approx(_accuracy(root, ft, "topic", test_rows), abs=1e-9)
    assert results["pretrained"]["topic"] == pytest.approx(_accuracy(root, base, "topic", test_rows), abs=1e-9)
    ta = results["methods"]["task_arithmetic"]
    lam = ta["lambda"]
    merged = {
        k: (
            base[k].double()
            + lam * sum(load_file(root / f"ft-{t}" / "model.safetensors")[k].double() - base[k].double() for t in WORDS)
        ).float()
        for k in base
    }
    assert ta["test"]["topic"] == pytest.approx(_accuracy(root, merged, "topic", test_rows), abs=1e-9)


def _blocks(root: Path) -> tuple[list[str], dict[str, int]]:
    meta = json.loads((root / "composer" / "config.json").read_text())
    return meta["blocks"]["names"], meta["blocks"]["index"]


def _composed(root: Path, coef: dict[str, list[float]]) -> dict[str, torch.Tensor]:
    """theta0 + sum_t alpha_t,b(k) tau_t[k] in float64, from the files on disk."""
    base = load_file(root / "bert-base" / "model.safetensors")
    fts = {t: load_file(root / f"ft-{t}" / "model.safetensors") for t in coef}
    _, index = _blocks(root)
    out = {}
    for k, v in base.items():
        b = index.get(f"model.{k}")
        acc = v.double()
        if b is not None:
            acc = acc + sum(coef[t][b] * (fts[t][k].double() - v.double()) for t in coef)
        out[k] = acc
    return out


def test_predictions_and_per_sample_coefficients_match_a_per_sample_reference(walked: Path) -> None:
    root = walked
    preds = [json.loads(line) for line in (root / "preds.jsonl").read_text().splitlines()]
    rows = _texts(root / "data" / "topic-test.csv")
    assert len(preds) == len(rows) and [p["index"] for p in preds] == list(range(len(rows)))
    names, _ = _blocks(root)
    h = _head(root, "topic")
    model = transformers.BertModel.from_pretrained(root / "bert-base").eval().double()
    for p, r in zip(preds[:12], rows[:12], strict=True):
        assert set(p["coefficients"]) == set(WORDS) and all(len(v) == len(names) for v in p["coefficients"].values())
        kept = sum(c != 0 for v in p["coefficients"].values() for c in v) / (len(WORDS) * len(names))
        assert p["kept"] == pytest.approx(kept)
        model.load_state_dict(_composed(root, p["coefficients"]))
        with torch.no_grad():
            logits = _mean_pool(model, _encode(root, [r["text"]])) @ h["weight"].double().T + h["bias"].double()
        assert p["prediction"] == sorted(WORDS["topic"])[int(logits.argmax())]
        assert p["label"] == r["label"]
    # the CLI's accuracy over the file is the composer's own test accuracy on that task
    out = CliRunner().invoke(app, ["compose", "eval", str(root / "composer")], catch_exceptions=False).output
    acc = sum(p["prediction"] == p["label"] for p in preds) / len(preds)
    assert f"{100 * acc:.1f}" in out.split("topic")[1].split("\n")[0]


def test_exported_model_reloads_with_the_mean_coefficients_of_its_task(walked: Path) -> None:
    root = walked
    val = [json.loads(line) for line in (root / "val.jsonl").read_text().splitlines()]
    names, _ = _blocks(root)
    mean = {t: [sum(p["coefficients"][t][b] for p in val) / len(val) for b in range(len(names))] for t in WORDS}
    ref = _composed(root, mean)
    folder = root / "topic-model"
    if (folder / "config.json").exists():
        model = transformers.BertModel.from_pretrained(folder)
    else:  # the weights alone: built on the base's config
        model = transformers.BertModel(transformers.BertConfig.from_pretrained(root / "bert-base"))
        model.load_state_dict(load_file(folder / "model.safetensors"))
    state = model.state_dict()
    assert set(state) == set(ref)
    for k, v in ref.items():
        torch.testing.assert_close(state[k].double(), v, rtol=0, atol=1e-6)
    info = json.loads((folder / "taskvec_export.json").read_text())
    assert info["task"] == "topic" and info["split"] == "val"
    torch.testing.assert_close(
        torch.tensor(info["coefficients"]), torch.tensor([mean[t] for t in info["task_vectors"]]), rtol=0, atol=1e-6
    )


def test_bad_inputs_give_one_line_errors_before_loading(walked: Path, tmp_path: Path) -> None:
    root = walked
    runner = CliRunner()
    cases = [
        (["compose", "eval", str(tmp_path / "nowhere")], "no such composer folder"),
        (["compose", "eval", str(root / "composer"), "--mode", "median"], "--mode"),
        (
            [
                "compose",
                "export",
                str(root / "composer"),
                "--task",
                "topic",
                "-o",
                str(tmp_path / "x"),
                "--split",
                "test",
            ],
            "--split",
        ),
        (["bench", "run", str(tmp_path / "missing.yaml")], "no such suite file"),
    ]
    bad = tmp_path / "bad.yaml"
    bad.write_text("suite: tiny\npreset: variational\ncomposer: {kl_weight: -1}\n")
    cases.append((["compose", "train", str(bad), "-o", str(tmp_path / "c")], "composer: kl_weight"))
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text("{not json")
    cases.append((["compose", "eval", str(broken)], "corrupt"))
    for args, needle in cases:
        r = runner.invoke(app, args, catch_exceptions=False)
        assert r.exit_code == 2, (args, r.output)
        assert needle.replace(" ", "") in "".join(r.output.split()), (args, r.output)


def test_extend_search_walks_past_the_grid_edges() -> None:
    from taskvec.grid import extend_search

    calls: list[float] = []

    def peak(at: float):  # type: ignore[no-untyped-def]
        def score(v: float) -> float:
            calls.append(v)
            return -abs(v - at)

        return score

    best, scores = extend_search(peak(3.0), [0.5, 1.0, 1.5])
    assert best == 3.375 and sorted(scores) == [0.5, 1.0, 1.5, 2.25, 3.375, 5.0625]  # stops once the best is inside
    best, scores = extend_search(peak(0.03), [0.1, 0.2])
    assert best == 0.025 and min(scores) == 0.0125
    best, scores = extend_search(peak(0.7), [0.5, 1.0, 1.5])
    assert best == 0.5 and min(scores) == 0.25  # 0.5 was the lower edge: one step down confirms it
    best, _ = extend_search(peak(1e6), [1.0], hi=10.0)
    assert best == 10.0


def test_merge_tune_on_chooses_the_scale_on_validation_data(walked: Path) -> None:
    from taskvec.bench.suite import load_suite, raw_splits
    from taskvec.bench.tune import tune_merge
    from taskvec.config import load_merge_config

    root = walked
    (root / "merge.yaml").write_text(
        "method: task_arithmetic\nbase: bert-base\nmodels: [{finetuned: ft-sentiment}, {finetuned: ft-topic}]\n"
    )
    out = _invoke(
        "merge", root / "merge.yaml", "-o", root / "merged", "--tune-on", root / "suite.yaml", "--cache", root / "cache"
    )
    out = " ".join(out.split())
    assert "chosen: scale" in out and "evaluations" in out
    result = tune_merge(
        load_merge_config(root / "merge.yaml"), root / "suite.yaml", cache=root / "cache", progress=False
    )
    assert f"chosen: scale {result.scale:g}" in out
    best = max(r["val"] for r in result.grid)
    assert result.val == best and {0.05, 1.5} <= {r["scale"] for r in result.grid}
    top = max(r["scale"] for r in result.grid)
    assert result.scale < top or top >= 100  # a best value on the upper edge would have grown the grid
    base = load_file(root / "bert-base" / "model.safetensors")
    fts = [load_file(root / f"ft-{t}" / "model.safetensors") for t in WORDS]
    ref = {k: (v.double() + result.scale * sum(f[k].double() - v.double() for f in fts)) for k, v in base.items()}
    merged = load_file(next((root / "merged").glob("*.safetensors")))
    for k, v in ref.items():
        torch.testing.assert_close(merged[k].double(), v, rtol=0, atol=1e-6)
    # the chosen scale's score is the mean validation accuracy of the merged model through each task's head
    suite = load_suite(root / "suite.yaml")
    accs = []
    for task in suite.tasks:
        val = raw_splits(suite, task)["val"]
        rows = [{"text": t, "label": val.classes[int(y)]} for t, y in zip(val.x, val.y, strict=True)]
        accs.append(_accuracy(root, {k: v.float() for k, v in ref.items()}, task.name, rows))
    assert result.val == pytest.approx(sum(accs) / len(accs), abs=1e-9)


def test_merge_tune_on_with_a_lora_model_and_ties(walked: Path, tmp_path: Path) -> None:
    """A LoRA adapter next to a fine-tuned checkpoint: TIES's scale and density chosen on the suite's
    validation data in fewer evaluations than the full grid; the merge written with them is the one
    `merge_checkpoints` writes for that config, and its score is the accuracy recomputed from it."""
    peft = pytest.importorskip("peft")
    from taskvec.bench.suite import load_suite, raw_splits
    from taskvec.bench.tune import full_grid_size, tune_merge, tuned_config
    from taskvec.config import load_merge_config
    from taskvec.merge import merge_checkpoints

    root = walked
    model = transformers.BertModel.from_pretrained(root / "bert-base")
    lora = peft.get_peft_model(model, peft.LoraConfig(r=2, lora_alpha=4, target_modules=["query", "value"]))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in lora.named_parameters():
            if "lora_B" in name:
                p.copy_(0.5 * torch.randn(p.shape, generator=g))
    lora.save_pretrained(tmp_path / "adapter")
    (tmp_path / "merge.yaml").write_text(
        f"method: ties\nbase: {root / 'bert-base'}\nparams: {{density: 0.4}}\n"
        "include: ['*.query.weight', '*.value.weight']\n"  # the tensors the adapter changes
        f"models: [{{lora: {tmp_path / 'adapter'}}}, {{finetuned: {root / 'ft-topic'}}}]\n"
    )
    out = _invoke(
        "merge",
        tmp_path / "merge.yaml",
        "-o",
        tmp_path / "merged",
        "--tune-on",
        root / "suite.yaml",
        "--cache",
        root / "cache",
    )
    cfg = load_merge_config(tmp_path / "merge.yaml")
    result = tune_merge(cfg, root / "suite.yaml", cache=root / "cache", progress=False)
    out = " ".join(out.split())
    assert f"chosen: scale {result.scale:g}, density={result.params['density']}" in out
    assert f"{result.evaluations} evaluations" in out
    assert result.evaluations == len({(r["density"], r["scale"]) for r in result.grid})
    assert result.evaluations < full_grid_size()
    assert result.val == max(r["val"] for r in result.grid)
    merged = load_file(next((tmp_path / "merged").glob("*.safetensors")))
    ref = merge_checkpoints(tuned_config(cfg, result), tmp_path / "ref.safetensors")
    for k, v in load_file(ref).items():
        assert torch.equal(merged[k], v), k
    suite = load_suite(root / "suite.yaml")
    accs = []
    for task in suite.tasks:
        val = raw_splits(suite, task)["val"]
        rows = [{"text": t, "label": val.classes[int(y)]} for t, y in zip(val.x, val.y, strict=True)]
        accs.append(_accuracy(root, {k: v.float() for k, v in merged.items()}, task.name, rows))
    assert result.val == pytest.approx(sum(accs) / len(accs), abs=1e-9)


def random_bert(folder: str):  # type: ignore[no-untyped-def]
    """A `factory:` backbone: a randomly initialised BERT of the folder's shape, and its tokenizer."""
    torch.manual_seed(123)
    model = transformers.BertModel(transformers.BertConfig.from_pretrained(folder))
    return model, transformers.AutoTokenizer.from_pretrained(folder)


def test_factory_checkpoint_recipe_and_task_model_checkpoints(project: Path, tmp_path: Path) -> None:
    """A `module:function` backbone with a checkpoint loaded into it; one task fine-tuned by the
    tool from the suite's recipe (once, then cached); one given as a task model with a classifier."""
    from taskvec.bench.prepare import prepare

    root = project
    clf = transformers.BertForSequenceClassification.from_pretrained(root / "ft-sentiment", num_labels=2)
    clf.save_pretrained(tmp_path / "ft-sentiment-clf")  # tensors named bert.* plus classifier.*
    (tmp_path / "suite.yaml").write_text(f"""\
name: recipe-suite
backbone:
  factory: test_own_models:random_bert
  kwargs: {{folder: {root / "bert-base"}}}
  checkpoint: {root / "bert-base" / "model.safetensors"}
  pool: mean
  text: {{max_length: 16}}
finetune: {{epochs: 1, batch_size: 16, lr: 0.001}}
tasks:
  - name: topic
    data:
      train: {{kind: csv, path: {root / "data" / "topic-train.csv"}}}
      val: {{kind: csv, path: {root / "data" / "topic-val.csv"}}}
      test: {{kind: csv, path: {root / "data" / "topic-test.csv"}}}
  - name: sentiment
    data: {{kind: csv, path: {root / "data" / "sentiment.csv"}}}
    split: {{train: 40, val: 20, test: 20}}
    finetuned: ft-sentiment-clf
""")
    prep = prepare(tmp_path / "suite.yaml", tmp_path / "cache", progress=False)
    base = load_file(root / "bert-base" / "model.safetensors")
    assert set(prep.pretrained) == {f"model.{k}" for k in base}
    assert all(torch.equal(prep.pretrained[f"model.{k}"], v) for k, v in base.items())
    ft = load_file(root / "ft-sentiment" / "model.safetensors")
    assert all(torch.equal(prep.finetuned["sentiment"][f"model.{k}"], v) for k, v in ft.items())
    assert set(prep.finetune_seconds) == {"topic"}
    moved = [k for k, v in prep.finetuned["topic"].items() if not torch.equal(v, prep.pretrained[k])]
    assert moved and all(k.startswith("model.") for k in moved)
    again = prepare(tmp_path / "suite.yaml", tmp_path / "cache", progress=False)
    assert again.finetune_seconds == {}
    assert all(torch.equal(again.finetuned["topic"][k], v) for k, v in prep.finetuned["topic"].items())
    # a cache entry named by cache_key refuses a different recipe
    text = (tmp_path / "suite.yaml").read_text()
    folder = next((tmp_path / "cache" / "bench" / "recipe-suite").glob("topic-*"))
    key = folder.name.removeprefix("topic-")
    (tmp_path / "suite.yaml").write_text(
        text.replace("lr: 0.001}", "lr: 0.002}").replace(
            "  - name: topic\n", f"  - name: topic\n    cache_key: {key}\n"
        )
    )
    from taskvec.errors import ConfigError

    with pytest.raises(ConfigError, match="cached for a different recipe"):
        prepare(tmp_path / "suite.yaml", tmp_path / "cache", progress=False)


def test_a_corrupt_coefficients_file_is_a_one_line_error(walked: Path, tmp_path: Path) -> None:
    import shutil

    broken = tmp_path / "composer"
    shutil.copytree(walked / "composer", broken)
    (broken / "coefficients.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{")
    r = CliRunner().invoke(app, ["compose", "eval", str(broken)], catch_exceptions=False)
    assert r.exit_code == 2 and "coefficients.safetensors:unreadable" in "".join(r.output.split())
    (broken / "coefficients.safetensors").unlink()
    r = CliRunner().invoke(app, ["compose", "eval", str(broken)], catch_exceptions=False)
    assert r.exit_code == 2 and "nocoefficients.safetensors" in "".join(r.output.split())
