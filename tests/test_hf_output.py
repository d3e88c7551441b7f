"""Outputs written from a Hugging Face base folder load with `from_pretrained`, tokenizer included.

Small BERT models are built from configs (random weights, nothing downloaded); every tensor of the
reloaded output is compared with theta0 + lambda * tau recomputed in float64 from the saved inputs.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file
from typer.testing import CliRunner

transformers = pytest.importorskip("transformers")
from transformers import (  # noqa: E402
    AutoModel,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    BertConfig,
    BertForSequenceClassification,
    BertModel,
    BertTokenizer,
    GenerationConfig,
)

from taskvec.cli import app  # noqa: E402
from taskvec.cli.common import err_console  # noqa: E402
from taskvec.core import TaskVector  # noqa: E402
from taskvec.errors import CheckpointError  # noqa: E402
from taskvec.io import CheckpointWriter, TensorSpec  # noqa: E402
from taskvec.io.hf import copy_model_files, model_files, set_config_dtype  # noqa: E402

runner = CliRunner()
VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "the", "a", "cat", "dog", "sat", "on", "mat", "ran", "##s", "."]


def _config(**kw: object) -> BertConfig:
    return BertConfig(
        vocab_size=len(VOCAB),
        hidden_size=16,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=24,
        max_position_embeddings=32,
        **kw,
    )


def _save_hf(model: torch.nn.Module, folder: Path, tokenizer: BertTokenizer | None = None) -> Path:
    model.save_pretrained(folder)
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)
        GenerationConfig(max_new_tokens=7).save_pretrained(folder)
    return folder


def _perturbed(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """A 'fine-tuned' variant: every floating parameter moved by seeded noise."""
    g = torch.Generator().manual_seed(seed)
    ft = type(model)(model.config)
    sd = {
        k: v + 0.02 * torch.randn(v.shape, generator=g) if v.is_floating_point() else v.clone()
        for k, v in model.state_dict().items()
    }
    ft.load_state_dict(sd)
    return ft


@pytest.fixture(params=["bert", "bert-cls"])
def hf(request: pytest.FixtureRequest, tmp_path: Path) -> dict[str, object]:
    torch.manual_seed(0)
    vocab = tmp_path / "vocab.txt"
    vocab.write_text("\n".join(VOCAB) + "\n")
    tok = BertTokenizer(vocab_file=str(vocab))
    model = BertModel(_config()) if request.param == "bert" else BertForSequenceClassification(_config(num_labels=3))
    auto = AutoModel if request.param == "bert" else AutoModelForSequenceClassification
    base = _save_hf(model, tmp_path / "base", tok)
    (base / "vocab.txt").write_text(vocab.read_text())  # as a slow (Python) tokenizer saves it
    fts = [_save_hf(_perturbed(model, i + 1), tmp_path / f"ft{i}") for i in range(2)]
    return {"base": base, "fts": fts, "auto": auto, "tok": tok, "tmp": tmp_path}


def _sd64(folder: Path) -> dict[str, torch.Tensor]:
    return {k: v.double() for k, v in load_file(folder / "model.safetensors").items()}


def _check_loads(
    out: Path, auto: type, expected: dict[str, torch.Tensor], dtype: torch.dtype, tok: BertTokenizer
) -> None:
    """`out` loads with from_pretrained without missing or unexpected keys, in `dtype`, with every tensor
    equal to `expected` (float64) up to the output dtype's rounding, and with the base's tokenizer."""
    model, info = auto.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    assert model.dtype == dtype
    sd = model.state_dict()
    assert set(expected) <= set(sd)
    eps = torch.finfo(dtype).eps
    for k, ref in expected.items():
        got = sd[k].double()
        assert got.shape == ref.shape, k
        torch.testing.assert_close(got, ref, rtol=2 * eps, atol=4 * eps * ref.abs().max().item(), msg=k)
    cfg = json.loads((out / "config.json").read_text())
    assert cfg.get("torch_dtype", cfg.get("dtype")) == str(dtype).removeprefix("torch.")  # the base says float32
    loaded = AutoTokenizer.from_pretrained(out)
    text = "the cat sat on a mat ."
    assert loaded(text)["input_ids"] == tok(text)["input_ids"]
    assert GenerationConfig.from_pretrained(out).max_new_tokens == 7
    assert not any(p.suffix == ".bin" for p in out.iterdir())


@pytest.mark.parametrize("dtype", [None, "float16"])
def test_merge_output_loads_with_from_pretrained(hf: dict, dtype: str | None) -> None:
    base, fts, tmp = hf["base"], hf["fts"], hf["tmp"]
    cfg = {
        "method": "task_arithmetic",
        "base": str(base),
        "scale": 0.7,
        "models": [{"finetuned": str(fts[0]), "weight": 1.0}, {"finetuned": str(fts[1]), "weight": 0.5}],
    }
    if dtype:
        cfg["dtype"] = dtype
    (tmp / "merge.yaml").write_text(yaml.safe_dump(cfg))
    out = tmp / "merged"
    r = runner.invoke(app, ["merge", str(tmp / "merge.yaml"), "-o", str(out)])
    assert r.exit_code == 0, r.output
    b, f0, f1 = _sd64(base), _sd64(fts[0]), _sd64(fts[1])
    expected = {k: b[k] + 0.7 * (1.0 * (f0[k] - b[k]) + 0.5 * (f1[k] - b[k])) for k in b}
    _check_loads(out, hf["auto"], expected, torch.float16 if dtype else torch.float32, hf["tok"])
    assert sorted(p.name for p in out.glob("*.safetensors")) == ["model.safetensors"]
    carried = {p.name for p in base.iterdir()} - {"model.safetensors"}
    assert carried == {"config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json", "vocab.txt"}
    assert {p.name for p in out.iterdir()} == carried | {"model.safetensors", "model.safetensors.index.json"}


def test_apply_and_sharded_output(hf: dict) -> None:
    base, fts, tmp = hf["base"], hf["fts"], hf["tmp"]
    r = runner.invoke(app, ["extract", str(base), str(fts[0]), "-o", str(tmp / "tv.safetensors")])
    assert r.exit_code == 0, r.output
    tv = load_file(tmp / "tv.safetensors")
    b = _sd64(base)
    out = tmp / "negated"
    r = runner.invoke(
        app, ["apply", str(base), str(tmp / "tv.safetensors"), "-o", str(out), "--coef", "-1", "--dtype", "float16"]
    )
    assert r.exit_code == 0, r.output
    expected = {k: b[k] - tv[k].double() if k in tv else b[k] for k in b}
    _check_loads(out, hf["auto"], expected, torch.float16, hf["tok"])
    # a sharded output carries transformers' shard names and index, and loads the same
    sharded = tmp / "sharded"
    TaskVector.load(tmp / "tv.safetensors").apply_to(base, 0.5, out=sharded, shard_size=8000)
    shards = sorted(p.name for p in sharded.glob("*.safetensors"))
    n = len(shards)
    assert n > 1 and shards == [f"model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)]
    index = json.loads((sharded / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == set(shards)
    expected = {k: b[k] + 0.5 * tv[k].double() if k in tv else b[k] for k in b}
    _check_loads(sharded, hf["auto"], expected, torch.float32, hf["tok"])


def test_bases_compose_output_loads(hf: dict) -> None:
    base, fts, tmp = hf["base"], hf["fts"], hf["tmp"]
    for i, ft in enumerate(fts):
        r = runner.invoke(app, ["extract", str(base), str(ft), "-o", str(tmp / f"t{i}.safetensors")])
        assert r.exit_code == 0, r.output
    # M = T: each task is its own basis, so the bank reconstructs every task vector exactly
    r = runner.invoke(
        app,
        [
            "bases",
            "build",
            str(tmp / "t0.safetensors"),
            str(tmp / "t1.safetensors"),
            "-o",
            str(tmp / "bank"),
            "--method",
            "cluster",
            "--m",
            "2",
            "--names",
            "a,b",
        ],
    )
    assert r.exit_code == 0, r.output
    out = tmp / "edited"
    r = runner.invoke(
        app,
        [
            "bases",
            "compose",
            str(tmp / "bank"),
            "--add",
            "a",
            "--negate",
            "b",
            "--base",
            str(base),
            "--coef",
            "0.8",
            "-o",
            str(out),
            "--dtype",
            "bfloat16",
        ],
    )
    assert r.exit_code == 0, r.output
    b, f0, f1 = _sd64(base), _sd64(fts[0]), _sd64(fts[1])
    t0, t1 = load_file(tmp / "t0.safetensors"), load_file(tmp / "t1.safetensors")
    expected = {k: b[k] + 0.8 * ((f0[k] - b[k]) - (f1[k] - b[k])) if k in t0 else b[k] for k in b}
    assert set(t0) == set(t1)
    _check_loads(out, hf["auto"], expected, torch.bfloat16, hf["tok"])


def test_model_files_never_include_weights(hf: dict) -> None:
    base, tmp = hf["base"], hf["tmp"]
    torch.save({"x": torch.zeros(1)}, base / "pytorch_model.bin")
    (base / "model.safetensors.index.json").write_text("{}")
    (base / "README.md").write_text("the base's model card")
    names = [p.name for p in model_files(base)]
    assert {"config.json", "vocab.txt", "tokenizer_config.json", "generation_config.json"} <= set(names)
    assert not {"pytorch_model.bin", "model.safetensors", "model.safetensors.index.json", "README.md"} & set(names)
    (tmp / "copy").mkdir()
    written = copy_model_files(base, tmp / "copy", torch.bfloat16)
    assert sorted(written) == sorted(names) == sorted(p.name for p in (tmp / "copy").iterdir())
    copied = json.loads((tmp / "copy" / "config.json").read_text())
    assert copied == {**json.loads((base / "config.json").read_text()), "dtype": "bfloat16"}
    # nested configs are updated; a config naming no dtype gets the key every transformers version reads
    assert set_config_dtype({"text_config": {"torch_dtype": "float32", "n": 1}, "dtype": "float32"}, torch.float16) == {
        "text_config": {"torch_dtype": "float16", "n": 1},
        "dtype": "float16",
    }
    assert set_config_dtype({"model_type": "bert"}, torch.float16) == {"model_type": "bert", "torch_dtype": "float16"}


def test_single_file_output_and_failed_extra_files_leave_nothing(hf: dict, monkeypatch: pytest.MonkeyPatch) -> None:
    base, fts, tmp = hf["base"], hf["fts"], hf["tmp"]
    tv = TaskVector.from_checkpoints(base, fts[0])
    path = tv.apply_to(base, 1.0, out=tmp / "one.safetensors")  # one file: only the weights
    assert path.is_file() and not (tmp / "config.json").exists()
    specs = {"w": TensorSpec((2,), torch.float32)}

    def broken(folder: Path) -> None:
        (folder / "config.json").write_text("{}")
        raise CheckpointError("config: cannot copy")

    with pytest.raises(CheckpointError), CheckpointWriter(tmp / "out", specs, extra_files=broken) as w:
        w.write("w", torch.ones(2))
    assert not (tmp / "out").exists() and not list(tmp.glob(".out*"))
    tv.save(tmp / "tv.safetensors")
    (base / "config.json").write_text("{not json")
    monkeypatch.setattr(err_console, "width", 1000)  # the message holds a long path: do not let Rich wrap it
    r = runner.invoke(app, ["apply", str(base), str(tmp / "tv.safetensors"), "-o", str(tmp / "bad")])
    assert r.exit_code == 2 and f"{base / 'config.json'}: cannot read it as JSON" in r.output
    assert not (tmp / "bad").exists()
