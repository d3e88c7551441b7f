"""Training loop, evaluation, save/reload and YAML configs of composers."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch

from taskvec.config import load_yaml_config
from taskvec.errors import ConfigError, KeyMismatchError
from taskvec.variational import (
    ComposeData,
    ComposeTrainConfig,
    TrainConfig,
    build_composer,
    evaluate_composer,
    holdout_split,
    load_composer,
    preset,
    save_composer,
    train_composer,
)
from taskvec.variational.data import trim_padding
from taskvec.variational.toy import toy_problem

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def toy(one_thread):
    return toy_problem(n=256)


def _train(toy, name: str, epochs: int = 8, **train: object):
    cfg = ComposeTrainConfig(
        composer=preset(name),
        train=TrainConfig(epochs=epochs, batch_size=32, lr=1e-2, progress=False, dtype="float64", **train),
    )
    return train_composer(copy.deepcopy(toy.backbone), toy.task_vectors, toy.heads, toy.train, cfg)


def test_variational_training_improves_on_task_arithmetic(toy) -> None:
    untrained = build_composer(
        copy.deepcopy(toy.backbone), toy.task_vectors, toy.heads, toy.train.features.shape[1], preset("variational")
    )
    before = evaluate_composer(untrained, toy.test).mean_accuracy
    c = _train(toy, "variational")
    after = evaluate_composer(c, toy.test)
    assert after.mean_accuracy > before
    assert evaluate_composer(c, toy.train).mean_accuracy > 0.9
    assert len(c.history) == 8 and c.history[-1]["loss"] < c.history[0]["loss"]
    assert after.coef_mean.shape == (2, 2, c.model.num_blocks)
    assert 0.0 < after.active[0] <= 1.0
    mc = evaluate_composer(c, toy.test, mode="mc", samples=4)
    assert mc.mean_accuracy > before - 0.02


def test_same_seed_same_composer_whatever_ran_before(toy) -> None:
    """The initial weights and the training draw only from the seed: a run is the same after any
    other use of torch's random generator (a resumed run, another run in the same process)."""
    a = _train(toy, "variational", epochs=2)
    torch.rand(1000)  # anything that draws from the global generator in between
    b = _train(toy, "variational", epochs=2)
    for (name, pa), pb in zip(a.coef.state_dict().items(), b.coef.state_dict().values(), strict=True):
        assert torch.equal(pa, pb), name
    assert torch.equal(evaluate_composer(a, toy.test).predictions, evaluate_composer(b, toy.test).predictions)
    c = _train(toy, "variational", epochs=2, seed=1)
    assert not torch.equal(next(iter(c.coef.state_dict().values())), next(iter(a.coef.state_dict().values())))


@pytest.mark.parametrize(
    "name", ["variational_no_gate", "variational_gate_uncertainty", "sample_specific", "variational_no_prior"]
)
def test_ablations_train(toy, name: str) -> None:
    c = _train(toy, name, epochs=3)
    assert evaluate_composer(c, toy.test).mean_accuracy > 0.6


def _one_step(toy, name: str, **train: object):
    """Composer before and after exactly one optimizer step on the toy data."""
    cfg = ComposeTrainConfig(
        composer=preset(name), train=TrainConfig(epochs=1, batch_size=32, progress=False, dtype="float64", **train)
    )
    before = build_composer(
        copy.deepcopy(toy.backbone), toy.task_vectors, toy.heads, toy.train.features.shape[1], cfg.composer
    )
    torch.manual_seed(cfg.train.seed)  # the same seed before each build: the same initial network
    after = train_composer(copy.deepcopy(toy.backbone), toy.task_vectors, toy.heads, toy.train, cfg, max_steps=1)
    return before.coef, after.coef


def test_bias_lr_moves_shared_part_only(toy) -> None:
    """bias_lr steps the output biases (input-independent coefficients) by ~bias_lr (Adam's first step is
    lr * sign(g)); the input-dependent weights move by at most lr."""
    torch.manual_seed(0)
    before, after = _one_step(toy, "variational", lr=1e-9, bias_lr=1e-2)
    db = (after.net.out.bias - before.net.out.bias).abs()
    assert db.max().item() == pytest.approx(1e-2, rel=1e-3)
    for name in ("out.weight", "hidden.weight", "hidden.bias"):
        delta = (dict(after.net.named_parameters())[name] - dict(before.net.named_parameters())[name]).abs().max()
        assert delta.item() <= 1e-9 * (1 + 1e-6)


def test_weight_decay_only_on_weight_matrices(toy) -> None:
    """AdamW's decoupled decay (p <- p - lr*wd*p) hits linear weights, never biases or shared coefficients."""
    lr, wd = 1e-3, 100.0
    torch.manual_seed(0)
    before, after = _one_step(toy, "variational", lr=lr, weight_decay=wd)
    w0, w1 = before.net.hidden.weight, after.net.hidden.weight
    assert (w1 - (1 - lr * wd) * w0).abs().max().item() <= lr * (1 + 1e-6)
    assert (w1 - w0).abs().max().item() > 5 * lr  # the decay (10 % of each weight) is visible
    assert (after.net.out.bias - before.net.out.bias).abs().max().item() <= lr * (1 + 1e-6)
    torch.manual_seed(0)
    before, after = _one_step(toy, "atlas_block", lr=lr, weight_decay=wd)
    assert (after.alpha - before.alpha).abs().max().item() <= lr * (1 + 1e-6)


def test_dropout_trains_and_evaluates_deterministically(toy) -> None:
    cfg = preset("variational", posterior={"dropout": 0.5})
    c = build_composer(
        copy.deepcopy(toy.backbone), toy.task_vectors, toy.heads, toy.train.features.shape[1], preset("variational")
    )
    assert c.coef.net.drop.p == 0.0  # off by default
    cd = train_composer(
        copy.deepcopy(toy.backbone),
        toy.task_vectors,
        toy.heads,
        toy.train,
        ComposeTrainConfig(
            composer=cfg, train=TrainConfig(epochs=4, batch_size=32, lr=1e-2, progress=False, dtype="float64")
        ),
    )
    assert cd.coef.net.drop.p == 0.5
    a, b = evaluate_composer(cd, toy.test), evaluate_composer(cd, toy.test)
    assert torch.equal(a.predictions, b.predictions) and a.mean_accuracy > 0.6
    cd.coef.train()
    f0 = toy.test.features[:64]
    assert not torch.equal(cd.coef.net(f0)[0], cd.coef.net(f0)[0])  # dropout is live in training mode


def test_save_reload_same_predictions(toy, tmp_path: Path) -> None:
    c = _train(toy, "variational", epochs=2)
    out = save_composer(c, tmp_path / "composer")
    assert sorted(p.name for p in out.iterdir()) == ["coefficients.safetensors", "config.json"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary left behind
    meta = json.loads((out / "config.json").read_text())
    assert meta["composer"]["method"] == "variational" and len(meta["history"]) == 2
    back = load_composer(out, copy.deepcopy(toy.backbone).double(), toy.task_vectors, toy.heads)
    a, b = evaluate_composer(c, toy.test), evaluate_composer(back, toy.test)
    assert torch.equal(a.predictions, b.predictions)
    torch.testing.assert_close(a.coef_mean, b.coef_mean, atol=0, rtol=0)
    with pytest.raises(ConfigError, match="already exists"):
        save_composer(c, out)
    save_composer(c, out, overwrite=True)
    other = [{k: 2 * v for k, v in tv.items()} for tv in toy.task_vectors]
    with pytest.raises(KeyMismatchError, match="norm"):
        load_composer(out, copy.deepcopy(toy.backbone).double(), other, toy.heads)


def test_yaml_config(tmp_path: Path) -> None:
    p = tmp_path / "c.yaml"
    p.write_text(
        "composer:\n  method: variational\n  gate: {kind: importance, min_rho: 0.6}\n"
        "  blocks: ['*.weight', '*']\ntrain: {epochs: 3, lr: 0.01}\n"
    )
    cfg = load_yaml_config(p, ComposeTrainConfig)
    assert cfg.composer.gate.min_rho == 0.6 and cfg.train.epochs == 3 and cfg.composer.blocks == ["*.weight", "*"]
    p.write_text("composer:\n  gate: {kind: importance, min_rhoo: 0.6}\n")
    with pytest.raises(ConfigError, match="min_rhoo"):
        load_yaml_config(p, ComposeTrainConfig)
    p.write_text("composer:\n  method: variational\n  objective: entropy\n")
    with pytest.raises(ConfigError, match="supervised"):
        load_yaml_config(p, ComposeTrainConfig)
    with pytest.raises(KeyError):
        preset("nope")


def test_trim_padding_and_data_checks() -> None:
    ids = torch.tensor([[5, 6, 0, 0], [7, 0, 0, 0]])
    out = trim_padding({"input_ids": ids, "attention_mask": (ids != 0).long()})
    assert out["input_ids"].tolist() == [[5, 6], [7, 0]]
    with pytest.raises(ValueError, match="labels"):
        ComposeData(torch.zeros(3, 2), torch.zeros(3, 4), torch.zeros(3, dtype=torch.long), torch.zeros(2))


def test_text_backbone_end_to_end() -> None:
    """A tiny BertModel with dict inputs, mean-pooled features and padding trimmed per batch."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.BertConfig(
        vocab_size=30,
        hidden_size=8,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=16,
        max_position_embeddings=12,
        pad_token_id=0,
    )
    bert = transformers.BertModel(cfg).double().eval()
    sd = {k: v for k, v in bert.state_dict().items() if v.is_floating_point()}
    tvs = [{k: 0.05 * torch.randn_like(v) for k, v in sd.items()} for _ in range(2)]
    ids = torch.randint(1, 30, (16, 10))
    ids[::2, 6:] = 0
    inputs = {"input_ids": ids, "attention_mask": (ids != 0).long()}
    heads = [torch.nn.Linear(8, 3).double(), torch.nn.Linear(8, 2).double()]
    tasks = torch.arange(16) % 2
    labels = torch.where(tasks == 0, torch.arange(16) % 3, torch.arange(16) % 2)
    data = ComposeData(inputs, torch.randn(16, 5, dtype=torch.float64), tasks, labels)
    conf = ComposeTrainConfig(
        composer=preset("variational", blocks="module"),
        train=TrainConfig(epochs=1, batch_size=8, progress=False, dtype="float64"),
    )
    c = train_composer(bert, tvs, heads, data, conf)
    r = evaluate_composer(c, data, batch_size=5)
    assert set(r.accuracy) == {0, 1} and r.predictions.shape == (16,)
    # per-batch padding trimming does not change predictions
    r1 = evaluate_composer(c, data, batch_size=16)
    assert torch.equal(r.predictions, r1.predictions)


def test_compute_features_matches_backbone(toy) -> None:
    from taskvec.variational import compute_features

    done: list[int] = []  # a progress bar's advances: every input counted once, batch by batch
    f0 = compute_features(toy.backbone, toy.test.inputs, batch_size=100, advance=done.append)
    torch.testing.assert_close(f0, toy.test.features)
    n = len(toy.test.features)
    assert sum(done) == n and len(done) == -(-n // 100)


def test_holdout_split_folds_partition_each_task() -> None:
    """K folds of frac 1/K: held-out parts are disjoint, cover every item, keep each task's share,
    and never overlap their fit part; labels carry the item index to track rows."""
    counts = [10, 7, 12]
    tasks = torch.cat([torch.full((n,), t) for t, n in enumerate(counts)])
    n = len(tasks)
    data = ComposeData(torch.randn(n, 3), torch.randn(n, 4), tasks, torch.arange(n))
    held_all = []
    for fold in range(3):
        fit, held = holdout_split(data, 1 / 3, fold)
        fit_ids, held_ids = set(fit.labels.tolist()), set(held.labels.tolist())
        assert not fit_ids & held_ids and len(fit_ids | held_ids) == n
        assert torch.equal(held.features, data.features[held.labels])  # rows travel with their features
        for t, c in enumerate(counts):
            k = round(c / 3)
            assert int((held.tasks == t).sum()) == (k if fold < 2 else c - 2 * k)  # last fold: the rest
        held_all += held.labels.tolist()
    assert sorted(held_all) == list(range(n))
    held = holdout_split(data, 0.3)[1]  # a plain held-out split: round(0.3 * n) items of every task
    assert [int((held.tasks == t).sum()) for t in range(3)] == [round(0.3 * c) for c in counts]
    with pytest.raises(ValueError, match="no fold 4"):
        holdout_split(data, 1 / 3, 4)
    with pytest.raises(ValueError, match="frac"):
        holdout_split(data, 1.0)


def test_evaluate_given_coefficients(toy) -> None:
    """Coefficients passed in are the ones scored: the composer's own give its predictions; zero gives
    the pretrained backbone with each task's head; one-hot on a sample's own task gives that task's
    fine-tuned model (computed here independently, with torch.func.functional_call)."""
    c = _train(toy, "variational", epochs=2)
    n, t, b = len(toy.test), c.model.num_tasks, c.model.num_blocks
    own = c.coefficients(toy.test.features)
    assert torch.equal(
        evaluate_composer(c, toy.test, coefficients=own).predictions, evaluate_composer(c, toy.test).predictions
    )
    with torch.no_grad():
        f = toy.backbone(toy.test.inputs)
        base = torch.stack([toy.heads[k](f[i]).argmax() for i, k in enumerate(toy.test.tasks.tolist())])
        theta0 = toy.backbone.state_dict()
        finetuned = [{key: w + tv[key] for key, w in theta0.items()} for tv in toy.task_vectors]
        tuned = torch.stack(
            [
                toy.heads[k](torch.func.functional_call(toy.backbone, finetuned[k], (toy.test.inputs[i],))).argmax()
                for i, k in enumerate(toy.test.tasks.tolist())
            ]
        )
    assert torch.equal(evaluate_composer(c, toy.test, coefficients=torch.zeros(t, b)).predictions, base)
    onehot = torch.nn.functional.one_hot(toy.test.tasks, t).double()[:, :, None].expand(n, t, b)
    assert torch.equal(evaluate_composer(c, toy.test, coefficients=onehot).predictions, tuned)
    assert not torch.equal(base, tuned)  # the two references differ, so the checks above tell them apart
    with pytest.raises(ConfigError, match="shape"):
        evaluate_composer(c, toy.test, coefficients=torch.zeros(n - 1, t, b))
    with pytest.raises(ConfigError, match="deterministic"):
        evaluate_composer(c, toy.test, mode="mc", coefficients=own)


def test_initial_weights_depend_on_the_seed_alone(toy) -> None:
    """build_composer draws the coefficient network from its own seed, whatever the caller's
    random state, and leaves that state as it was."""

    def init(seed: int, other: int) -> dict[str, torch.Tensor]:
        torch.manual_seed(other)
        torch.rand(3)
        state = torch.random.get_rng_state()
        c = build_composer(
            copy.deepcopy(toy.backbone), toy.task_vectors, toy.heads, 16, preset("variational"), seed=seed
        )
        assert torch.equal(torch.random.get_rng_state(), state)
        return c.coef.state_dict()

    a, b, c = init(3, other=1), init(3, other=2), init(4, other=1)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], c[k]) for k in a)
