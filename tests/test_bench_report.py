"""Suite reports: normalized accuracy, gain kept and the tests over seeds, against recomputation."""

from __future__ import annotations

import json
import statistics
from pathlib import Path

from scipy import stats

from taskvec.bench.report import markdown, rows, scores, summary, welch, write_reports

PRE = {"a": 0.50, "b": 0.60}
FT = {"a": 0.90, "b": 0.80}


def _results() -> dict[str, object]:
    return {
        "suite": {"name": "s"},
        "pretrained": PRE,
        "finetuned": FT,
        "methods": {"task_arithmetic": {"lambda": 0.3, "test": {"a": 0.70, "b": 0.65}, "seconds": 1.0}},
        "bases": {
            "m": 1,
            "method": "cluster",
            "assignments": [0, 0],
            "bank_bytes": 2**20,
            "task_vector_bytes": 2**21,
            "lambda": 0.3,
            "test": {"a": 0.69, "b": 0.66},
            "seconds": 1.0,
        },
        "learned": {
            "atlas_block": [{"test": {"a": 0.72 + 0.01 * i, "b": 0.70}, "kept": {}, "seconds": 2.0} for i in range(3)],
            "variational": [
                {"test": {"a": 0.85 - 0.02 * i, "b": 0.78}, "kept": {"a": 0.5, "b": 0.4}, "seconds": 3.0}
                for i in range(3)
            ],
        },
        "items_sha256": {"a": "0" * 64, "b": "1" * 64},
    }


def test_gain_kept_and_normalized_accuracy() -> None:
    s = scores({"a": 0.70, "b": 0.65}, PRE, FT)
    assert abs(s["avg"] - 0.675) < 1e-12
    assert abs(s["norm"] - (0.70 / 0.90 + 0.65 / 0.80) / 2) < 1e-12
    assert abs(s["gain"] - (0.675 - 0.55) / (0.85 - 0.55)) < 1e-12
    assert scores(PRE, PRE, FT)["gain"] == 0.0 and abs(scores(FT, PRE, FT)["gain"] - 1.0) < 1e-12
    r = _results()
    var = next(x for x in rows(r) if x.label == "variational")
    gains = [scores(run, PRE, FT)["gain"] for run in var.runs]
    m, sd = summary(r, var)["gain"]
    assert abs(m - statistics.fmean(gains)) < 1e-12 and abs(sd - statistics.stdev(gains)) < 1e-12


def test_welch_and_one_sample_tests_match_scipy() -> None:
    r = _results()
    out = {m: (d, p) for m, d, p, _ in welch(r)}
    var = [100 * (0.85 - 0.02 * i + 0.78) / 2 for i in range(3)]
    atlas = [100 * (0.72 + 0.01 * i + 0.70) / 2 for i in range(3)]
    d, p = out["atlas_block"]
    assert abs(d - (statistics.fmean(var) - statistics.fmean(atlas))) < 1e-9
    assert abs(p - stats.ttest_ind(var, atlas, equal_var=False, alternative="greater").pvalue) < 1e-12
    d, p = out["task_arithmetic (λ=0.3)"]
    assert abs(p - stats.ttest_1samp(var, 67.5, alternative="greater").pvalue) < 1e-12
    assert "bank of M = 1 bases (λ=0.3)" in out


def test_reports_show_every_measure(tmp_path: Path) -> None:
    r = _results()
    md = markdown(r)
    assert "| method | a | b | avg | avg normalized | gain kept |" in md
    assert "| task_arithmetic (λ=0.3) | 70.0 | 65.0 | 67.5 | 79.5 | 41.7 |" in md
    assert "| variational | 83.0 ± 2.0 | 78.0 ± 0.0 | 80.5 ± 1.0 | 94.9 ± 1.1 | 85.0 ± 3.3 |" in md
    assert "| task_arithmetic (λ=0.3) | 50 | 25 |" in md  # per-task gain kept
    paths = write_reports(r, tmp_path)
    assert json.loads(paths["json"].read_text())["learned"]["variational"][0]["test"]["b"] == 0.78
    assert paths["png"].read_bytes()[:4] == b"\x89PNG"


def test_reports_replace_only_an_earlier_run(tmp_path: Path) -> None:
    import pytest

    from taskvec.errors import OutputError

    write_reports(_results(), tmp_path / "a")
    write_reports(_results(), tmp_path / "a")  # an earlier run's files are replaced
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "results.md").write_text("my notes")
    with pytest.raises(OutputError, match="results.md: not written by taskvec"):
        write_reports(_results(), tmp_path / "b")
    assert (tmp_path / "b" / "results.md").read_text() == "my notes"
    assert not (tmp_path / "b" / "results.json").exists()
