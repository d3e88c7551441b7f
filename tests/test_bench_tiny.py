"""The tiny suite end to end on real data (real EfficientNet-Lite0 weights, real MNIST/Fashion-MNIST/digits)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

from taskvec.bench.prepare import prepare
from taskvec.bench.run import run_suite
from taskvec.bench.suite import load_suite, suite_path
from taskvec.errors import OutputError

pytestmark = pytest.mark.suite


@pytest.fixture(scope="module")
def tiny_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny suite (same backbone, heads and pinned items) with shorter fine-tuning and learned
    runs, as a suite file: these tests check behaviour, not accuracy, and `prepare` and
    `taskvec compose` find the run's cache entries through the same file."""
    spec = yaml.safe_load(suite_path("tiny").read_text())
    spec["finetune"]["epochs"] = 1
    spec["compose"]["train"]["epochs"] = 1
    path = tmp_path_factory.mktemp("suite") / "tiny.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


@pytest.fixture(scope="module")
def tiny(tiny_file: Path, tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    cache = tmp_path_factory.mktemp("cache")
    out = tmp_path_factory.mktemp("runs")
    results = run_suite(
        load_suite(tiny_file),
        ["task_arithmetic", "ties"],
        learned=["atlas_task", "variational"],
        out_dir=out,
        cache=cache,
        progress=False,
    )
    return cache, out, results


@pytest.fixture(scope="module")
def prepared(tiny, tiny_file: Path):  # type: ignore[no-untyped-def]
    """The suite prepared again from the cache written by the run."""
    cache, _, _ = tiny
    return prepare(tiny_file, cache, progress=False)


def test_coefficient_zero_and_one_give_back_pretrained_and_finetuned_exactly(tiny, prepared) -> None:  # type: ignore[no-untyped-def]
    _, _, results = tiny
    prep = prepared
    assert prep.finetune_seconds == {}  # nothing was trained again
    for task in prep.tasks:
        tv = prep.task_vector(task)
        zero = prep.evaluate(tv.apply_to(prep.pretrained, 0.0), "test", [task])[task]
        one = prep.evaluate(tv.apply_to(prep.pretrained, 1.0), "test", [task])[task]
        assert zero == results["pretrained"][task]
        assert one == results["finetuned"][task]
        merged_one = tv.apply_to(prep.pretrained, 1.0)
        assert all(torch.equal(merged_one[k], prep.finetuned[task][k]) for k in merged_one)


def test_batchnorm_statistics_stay_frozen(prepared) -> None:  # type: ignore[no-untyped-def]
    prep = prepared
    stats = [k for k in prep.pretrained if k.endswith(("running_mean", "running_var"))]
    assert stats
    for task in prep.tasks:
        assert all(torch.equal(prep.finetuned[task][k], prep.pretrained[k]) for k in stats)
        tv = prep.task_vector(task)
        assert all(float(tv[k].abs().max()) == 0.0 for k in stats)


def test_reports_are_written_and_consistent(tiny) -> None:  # type: ignore[no-untyped-def]
    _, out, results = tiny
    folder = out / "tiny"
    saved = json.loads((folder / "results.json").read_text())
    assert saved["methods"]["ties"]["test"] == results["methods"]["ties"]["test"]
    assert (folder / "accuracy.png").read_bytes()[:4] == b"\x89PNG"
    md = (folder / "results.md").read_text()
    assert "| task_arithmetic" in md and "avg normalized" in md and "gain kept" in md
    suite = load_suite("tiny")
    assert results["items_sha256"] == {t.name: t.items_sha256 for t in suite.tasks}  # the pinned items were read
    bank = results["bases"]
    assert bank["m"] == 2 and sorted(set(bank["assignments"])) == [0, 1]
    assert bank["bank_bytes"] < 0.75 * bank["task_vector_bytes"]  # 2 float32 bases for 3 float32 task vectors
    for name in ("atlas_task", "variational"):
        (run,) = results["learned"][name]
        assert set(run["test"]) == set(results["finetuned"]) and run["config"]["train"]["seed"] == 0
        # every learned method starts at task arithmetic's validated lambda
        assert run["config"]["composer"]["init_coef"] == results["methods"]["task_arithmetic"]["lambda"]
    for m in ("task_arithmetic", "ties"):
        r = results["methods"][m]
        assert str(r["lambda"]) in r["val"]  # lambda chosen among the validation scores
        best = max(sum(v.values()) for v in r["val"].values())
        assert sum(r["val"][str(r["lambda"])].values()) == best
    # fine-tuning helps on average (the full suites' per-task bars are in benchmarks/results/suites)
    tasks = list(results["finetuned"])
    assert sum(results["finetuned"][t] for t in tasks) > sum(results["pretrained"][t] for t in tasks)
    # negation lowers the target while the controls keep >= 95% of their pretrained accuracy on validation
    # (the rule holds on validation, where λ is chosen; on test a small λ may move the target by an item either way)
    for t, n in results["negation"].items():
        pre_val = results["pretrained_val"]
        if n["lambda"] > 0:
            assert n["val"]["target"] < pre_val[t]
            assert all(a >= 0.95 * pre_val[c] for c, a in n["val"]["controls"].items())
        else:
            assert n["target"] == results["pretrained"][t]  # λ = 0 is the pretrained model itself


def test_rerun_takes_finished_stages_from_disk(tiny, tiny_file: Path, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """An interrupted `bench run` resumes: each finished stage is saved and reused when its suite,
    settings and seed are the same, and run again when they are not."""
    import shutil

    cache, first, results = tiny
    assert (first / "tiny" / "stages" / "learned-atlas_task-s0.json").exists()
    out = tmp_path / "runs"
    shutil.copytree(first / "tiny" / "stages", out / "tiny" / "stages")

    def rerun(spec, learned: str = "atlas_task", show_plan: bool = False):  # type: ignore[no-untyped-def]
        return run_suite(
            spec,
            ["task_arithmetic"],
            learned=[learned],
            bases=False,
            negation=False,
            out_dir=out,
            cache=cache,
            progress=False,
            show_plan=show_plan,  # the plan's timed forward passes are not what this test checks
        )

    again = rerun(load_suite(tiny_file))
    assert again["learned"]["atlas_task"] == results["learned"]["atlas_task"]  # read back, not retrained
    assert again["methods"]["task_arithmetic"] == results["methods"]["task_arithmetic"]
    spec = load_suite(tiny_file)
    spec.compose.train.lr = 5.0e-3  # other settings: trained again
    other = rerun(spec)
    assert other["learned"]["atlas_task"][0]["config"]["train"]["lr"] == 5.0e-3
    mine = out / "tiny" / "stages" / "learned-atlas_block-s0.json"  # a file taskvec did not write: refused, kept
    mine.write_text('{"my": "notes"}')
    with pytest.raises(OutputError, match="learned-atlas_block-s0.json: not a stage written by taskvec"):
        rerun(load_suite(tiny_file), "atlas_block", show_plan=True)  # refused already by the plan
    assert mine.read_text() == '{"my": "notes"}'


@pytest.fixture(scope="module")
def composer(tiny, tiny_file: Path, tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    """A variational composer trained for one epoch on the validation splits and saved (the
    `taskvec compose train` path), with its test result."""
    from taskvec.bench.compose import ComposeRunConfig, train_on_suite

    cache, _, _ = tiny
    cfg = ComposeRunConfig(
        suite=str(tiny_file),
        preset="variational",
        train={"epochs": 1, "batch_size": 64, "progress": False},
        cache=str(cache),
    )
    folder = tmp_path_factory.mktemp("composer") / "composer"
    _, result, _ = train_on_suite(cfg, folder)
    return folder, result


def test_variational_composer_on_tiny_saves_and_reloads(tiny, tiny_file: Path, composer) -> None:  # type: ignore[no-untyped-def]
    """`taskvec compose train/eval` path on real data: train one epoch on the validation splits,
    save, reload on a fresh backbone and get the same test predictions."""
    from taskvec.bench.compose import evaluate_on_suite, load_on_suite

    cache, _, _ = tiny
    folder, result = composer
    assert set(result.accuracy) == {0, 1, 2} and all(0.0 <= a <= 1.0 for a in result.accuracy.values())
    assert all(0.0 <= v <= 1.0 for v in result.active.values())
    reloaded, prep = load_on_suite(folder, tiny_file, cache)
    again = evaluate_on_suite(reloaded, prep)
    assert torch.equal(again.predictions, result.predictions)


def test_predict_an_image_folder_with_the_tiny_composer(composer, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """`taskvec compose predict` on a folder of PNG files: the same predictions and coefficients as
    the composer gives the same images inside the suite's test split."""
    from PIL import Image

    from taskvec.bench.compose import load_on_suite, predict, read_inputs
    from taskvec.bench.learned import suite_data
    from taskvec.bench.suite import raw_splits
    from taskvec.variational import evaluate_composer

    saved, prep = load_on_suite(composer[0])  # the suite and cache it records
    raw = raw_splits(prep.suite, prep.suite.task("digits"))["test"]
    (tmp_path / "imgs").mkdir()
    for i in range(6):
        Image.fromarray(raw.x[i]).save(tmp_path / "imgs" / f"{i}.png")
    x, labels = read_inputs(tmp_path / "imgs", prep, "digits")
    records = predict(saved, prep, "digits", x)
    data = suite_data(prep, "test", tasks=["digits"]).batch(torch.arange(6))  # the six items saved as PNG
    result = evaluate_composer(saved, data)
    alpha = saved.coefficients(data.features)
    for i, r in enumerate(records):
        assert (
            r["class_index"] == int(result.predictions[i])
            and r["prediction"] == prep.tasks["digits"].classes[r["class_index"]]
        )
        got = torch.tensor([r["coefficients"][t] for t in prep.tasks], dtype=torch.float64)
        torch.testing.assert_close(got, alpha[i].double(), rtol=1e-5, atol=1e-6)


def test_run_learned_with_a_given_config_task_vectors_and_details(tiny, prepared) -> None:  # type: ignore[no-untyped-def]
    """run_learned with the settings of the suite's variational run as `config` trains with exactly
    those settings and returns the same keys; `task_vectors` sets what is composed, `details` and
    `mc` add the coefficients, blocks, history and Monte-Carlo accuracies."""
    from taskvec.bench.learned import run_learned, suite_data
    from taskvec.variational import ComposeTrainConfig

    _, _, results = tiny
    prep = prepared
    (run,) = results["learned"]["variational"]
    cfg = ComposeTrainConfig.model_validate(run["config"])
    val, test = suite_data(prep, "val"), suite_data(prep, "test")
    # every 4th item (of all three tasks): this test checks settings and keys, not accuracy
    val, test = val.batch(torch.arange(0, len(val), 4)), test.batch(torch.arange(0, len(test), 4))
    again = run_learned(prep, "variational", 0, val, test, config=cfg)
    assert set(again) == set(run) and again["config"] == run["config"] and set(again["test"]) == set(run["test"])
    names = list(prep.tasks)
    two = ([prep.task_vector(t) for t in names[:2]], ["first", "second"])
    r = run_learned(prep, "variational", 0, val, test, config=cfg, task_vectors=two, details=True, mc=2)
    coef = torch.tensor(r["coef_mean"])
    assert coef.shape == (len(names), 2, len(r["blocks"]))  # (test task, task vector, block)
    assert len(r["history"]) > 0 and r["eval_seconds"] > 0
    assert set(r["test_mc"]) == set(r["test"]) == set(names)
