"""PEFT LoRA adapters as task vectors: taskvec's merge equals PEFT's own merge_and_unload."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from taskvec import TaskVector
from taskvec.config import load_merge_config
from taskvec.core.lowrank import is_factored
from taskvec.errors import (
    ConfigError,
    KeyMismatchError,
    ShapeMismatchError,
    TaskVecError,
)
from taskvec.io import open_checkpoint
from taskvec.io.lowrank import FactoredSource
from taskvec.merge import merge_checkpoints

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")


class ConvNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 8, 1)
        self.fc = nn.Linear(8, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.relu(self.conv2(torch.relu(self.conv1(x)))).mean((2, 3)))


def _bert() -> tuple[nn.Module, dict, object]:
    cfg = transformers.BertConfig(
        vocab_size=64,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=48,
        max_position_embeddings=32,
        num_labels=3,
    )
    model = transformers.BertForSequenceClassification(cfg)
    lora = peft.LoraConfig(
        r=4,
        lora_alpha=16,
        target_modules=["query", "value", "dense"],
        modules_to_save=["classifier"],
        rank_pattern={"value": 2},
        alpha_pattern={"layer.1.attention.self.query": 3},
        bias="lora_only",
    )
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 64, (6, 10), generator=g)
    return (
        model,
        {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": torch.randint(0, 3, (6,), generator=g)},
        lora,
    )


def _gpt2() -> tuple[nn.Module, dict, object]:
    cfg = transformers.GPT2Config(
        vocab_size=64, n_embd=32, n_layer=2, n_head=2, n_positions=32, tie_word_embeddings=False
    )
    model = transformers.GPT2LMHeadModel(cfg)
    lora = peft.LoraConfig(
        r=4, lora_alpha=8, target_modules=["c_attn", "c_fc", "wte"], fan_in_fan_out=True, use_rslora=True
    )
    ids = torch.randint(0, 64, (4, 12), generator=torch.Generator().manual_seed(2))
    return model, {"input_ids": ids, "labels": ids}, lora


def _conv() -> tuple[nn.Module, dict, object]:
    lora = peft.LoraConfig(r=3, lora_alpha=6, target_modules=["conv1", "conv2", "fc"], lora_bias=True)
    return ConvNet(), {"x": torch.randn(4, 3, 6, 6, generator=torch.Generator().manual_seed(3))}, lora


def _loss(model: nn.Module, batch: dict) -> torch.Tensor:
    if "x" in batch:
        return model(batch["x"]).pow(2).mean()
    return model(**batch).loss


def _logits(model: nn.Module, batch: dict) -> torch.Tensor:
    if "x" in batch:
        return model(batch["x"])
    return model(**{k: v for k, v in batch.items() if k != "labels"}).logits


def _train(pm: nn.Module, batch: dict) -> nn.Module:
    """A few Adam steps on the adapter's parameters, so that B != 0."""
    opt = torch.optim.Adam([p for p in pm.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(4):
        opt.zero_grad()
        _loss(pm, batch).backward()
        opt.step()
    return pm.eval()


def _make(kind: str, tmp: Path) -> tuple[nn.Module, dict, Path, Path, nn.Module]:
    """Base model (saved), an adapter trained a few steps (saved), and PEFT's own merged model."""
    torch.manual_seed(0)
    model, batch, lora = {"bert": _bert, "gpt2": _gpt2, "conv": _conv}[kind]()
    model.eval()
    base = copy.deepcopy(model)
    base_path = tmp / "base.safetensors"
    save_file({k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}, base_path)
    pm = _train(peft.get_peft_model(model, lora), batch)
    adapter = tmp / "adapter"
    pm.save_pretrained(adapter)
    merged = pm.merge_and_unload()
    return base, batch, base_path, adapter, merged


@pytest.mark.parametrize("kind", ["bert", "gpt2", "conv"])
def test_lora_matches_peft_merge(kind: str, tmp_path: Path) -> None:
    base, batch, base_path, adapter, merged = _make(kind, tmp_path)
    tv = TaskVector.from_lora(adapter, base_path)
    assert is_factored(tv)
    want = merged.state_dict()
    got = tv.apply_to(base.state_dict())
    changed = 0
    for k, w in want.items():
        assert torch.allclose(got[k], w, rtol=1e-6, atol=1e-6), k
        changed += not torch.equal(w, base.state_dict()[k])
    assert changed >= len(tv.keys()) > 0  # every adapted tensor moved (B != 0 after training)
    assert set(tv.keys()) <= set(want)
    # the deltas against a float64 recomputation of PEFT's merge
    peft64 = (
        peft.PeftModel.from_pretrained(copy.deepcopy(base).double(), adapter).double().merge_and_unload().state_dict()
    )
    for k in tv.keys():
        ref = peft64[k] - base.state_dict()[k].double()
        assert torch.allclose(tv[k].double(), ref, rtol=1e-5, atol=1e-7), k
    model = tv.apply_to(base)
    with torch.no_grad():
        assert torch.allclose(_logits(model, batch), _logits(merged, batch), rtol=1e-5, atol=1e-5)


def test_lora_slices_and_load_without_base(tmp_path: Path) -> None:
    _, _, base_path, adapter, _ = _make("gpt2", tmp_path)
    tv = TaskVector.load(adapter)  # no whole tensors saved: the base is not needed
    ref = TaskVector.from_lora(adapter, base_path)
    for k in ref.keys():
        full = ref[k].reshape(-1)
        n = full.numel()
        for s, e in [(0, n), (3, n // 2 + 5), (n // 3, n - 1), (n - 2, n)]:
            assert torch.allclose(tv.source.read_flat(k, s, e), full[s:e], rtol=1e-6, atol=1e-8), (k, s, e)
    assert isinstance(open_checkpoint(adapter), FactoredSource)


def test_merge_config_lora_entry(tmp_path: Path) -> None:
    _, _, base_path, _, merged = _make("bert", tmp_path)
    cfg = tmp_path / "merge.yaml"
    cfg.write_text(f"method: task_arithmetic\nbase: {base_path.name}\nmodels:\n  - lora: adapter\n")
    out = merge_checkpoints(load_merge_config(cfg), tmp_path / "merged.safetensors")
    src = open_checkpoint(out)
    for k, w in merged.state_dict().items():
        assert torch.allclose(src.read_flat(k).reshape(w.shape), w, atol=1e-6), k


def test_lora_errors(tmp_path: Path) -> None:
    base, _, base_path, adapter, _ = _make("bert", tmp_path)
    with pytest.raises(TaskVecError, match="whole tensors"):
        TaskVector.load(adapter)  # modules_to_save needs the base
    sd = {k: v.clone() for k, v in base.state_dict().items()}
    sd["bert.encoder.layer.0.attention.self.query.weight"] = torch.zeros(32, 16)
    with pytest.raises(ShapeMismatchError, match="query.weight"):
        TaskVector.from_lora(adapter, sd)
    del sd["bert.encoder.layer.0.attention.self.query.weight"]
    with pytest.raises(KeyMismatchError, match="query.weight"):
        TaskVector.from_lora(adapter, sd)
    cfg_path = adapter / "adapter_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg_path.write_text(json.dumps({**cfg, "use_dora": True}))
    with pytest.raises(ConfigError, match="DoRA"):
        TaskVector.from_lora(adapter, base_path)
    cfg_path.write_text(json.dumps({**cfg, "peft_type": "IA3"}))
    with pytest.raises(ConfigError, match="IA3"):
        TaskVector.from_lora(adapter, base_path)


def test_lora_per_sample_composition_matches_peft(tmp_path: Path) -> None:
    """Two adapters composed per sample (from their factors, no dense weights for the adapted
    linears): a one-hot alpha gives each adapter's PEFT-merged logits; any alpha the dense result."""
    from taskvec.variational import ComposedModel

    base, batch, base_path, adapter0, merged0 = _make("bert", tmp_path)
    torch.manual_seed(1)
    pm = _train(peft.get_peft_model(copy.deepcopy(base), _bert()[2]), batch)
    pm.save_pretrained(tmp_path / "adapter1")
    merged1 = pm.merge_and_unload()
    tvs = [TaskVector.from_lora(adapter0, base_path), TaskVector.from_lora(tmp_path / "adapter1", base_path)]
    inputs = {k: v for k, v in batch.items() if k != "labels"}

    def fwd(m, x):
        return m(**x).logits

    cm = ComposedModel(copy.deepcopy(base), tvs, forward_fn=fwd)
    assert "bert.encoder.layer.0.attention.self.query.weight" in cm.lowrank_keys
    n = inputs["input_ids"].shape[0]
    onehot = torch.zeros(n, 2, cm.num_blocks)
    onehot[: n // 2, 0] = 1.0
    onehot[n // 2 :, 1] = 1.0
    with torch.no_grad():
        y = cm(inputs, onehot)
        assert torch.allclose(y[: n // 2], fwd(merged0, inputs)[: n // 2], atol=1e-5)
        assert torch.allclose(y[n // 2 :], fwd(merged1, inputs)[n // 2 :], atol=1e-5)
        dense = ComposedModel(copy.deepcopy(base), tvs, forward_fn=fwd, lowrank=False)
        assert dense.lowrank_keys == []
        alpha = torch.rand(n, 2, cm.num_blocks, generator=torch.Generator().manual_seed(0))
        assert torch.allclose(cm(inputs, alpha), dense(inputs, alpha), atol=1e-5)


def test_lora_base_name_warning(tmp_path: Path) -> None:
    _, _, base_path, adapter, _ = _make("gpt2", tmp_path)
    folder = tmp_path / "gpt2-small"
    folder.mkdir()
    base_path.rename(folder / "model.safetensors")
    cfg_path = adapter / "adapter_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg_path.write_text(json.dumps({**cfg, "base_model_name_or_path": "org/gpt2-small"}))
    TaskVector.from_lora(adapter, folder)  # same folder name: no warning
    cfg_path.write_text(json.dumps({**cfg, "base_model_name_or_path": "org/llama-7b"}))
    with pytest.warns(UserWarning, match="llama-7b"):
        TaskVector.from_lora(adapter, folder)
