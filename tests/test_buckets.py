"""Texts batched by length: every item once per epoch, far less padding, and the same features and
predictions as each text run on its own without padding (a small BERT from transformers)."""

from __future__ import annotations

import pytest
import torch

from taskvec.bench.finetune import epoch_batches
from taskvec.bench.models import features, predict
from taskvec.bench.suite import Split
from taskvec.variational.train import global_batches

transformers = pytest.importorskip("transformers")


def _split(n: int = 300, width: int = 40, seed: int = 0) -> Split:
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(2, width + 1, (n,), generator=g)
    mask = (torch.arange(width)[None, :] < lengths[:, None]).long()
    ids = torch.randint(5, 60, (n, width), generator=g) * mask
    return Split({"input_ids": ids, "attention_mask": mask}, torch.randint(0, 3, (n,), generator=g))


def _padding(split: Split, batches: list[torch.Tensor]) -> int:
    lengths = split.x["attention_mask"].sum(1)  # type: ignore[index]
    return sum(int(lengths[b].max()) * len(b) - int(lengths[b].sum()) for b in batches)


@pytest.mark.parametrize("n", [1, 31, 32, 300, 513])
def test_every_item_once_per_epoch_and_less_padding(n: int) -> None:
    split = _split(n)
    plain = list(torch.randperm(n, generator=torch.Generator().manual_seed(3)).split(32))
    for batches in (epoch_batches(split, 32, seed=3), global_batches(n, 32, 0, 3, split.x["attention_mask"].sum(1))):  # type: ignore[index]
        assert len(batches) == -(-n // 32)  # as many steps as before
        assert torch.equal(torch.cat(batches).sort().values, torch.arange(n))
        assert sum(len(b) < 32 for b in batches) <= 1
        if n >= 300:
            assert _padding(split, batches) < 0.3 * _padding(split, plain)
    assert all(torch.equal(a, b) for a, b in zip(epoch_batches(split, 32, 3), epoch_batches(split, 32, 3), strict=True))


def test_bucketed_features_and_predictions_match_unpadded_runs() -> None:
    from taskvec.bench.backbones import PooledEncoder

    torch.manual_seed(0)
    cfg = transformers.BertConfig(
        vocab_size=64,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=48,
        max_position_embeddings=64,
    )
    enc = PooledEncoder(transformers.BertModel(cfg).eval(), "mean")
    split = _split(70)
    head = torch.nn.Linear(32, 3)
    got = features(enc, split, batch_size=16)
    with torch.no_grad():
        for i in range(len(split)):
            n = int(split.x["attention_mask"][i].sum())  # type: ignore[index]
            one = {k: v[i : i + 1, :n] for k, v in split.x.items()}  # type: ignore[union-attr]
            torch.testing.assert_close(got[i], enc(one)[0], rtol=1e-5, atol=1e-5)
    assert torch.equal(predict(enc, head, split, batch_size=16), head(got).argmax(-1))
