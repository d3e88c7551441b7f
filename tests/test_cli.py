"""The command line, end to end on small real files."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from taskvec.cli import app

runner = CliRunner()


def _cfg(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "merge.yaml"
    p.write_text(text)
    return p


def test_extract_info_and_apply(tmp_path: Path, files) -> None:
    r = runner.invoke(
        app,
        [
            "extract",
            str(files["base"]),
            str(files["ft0"]),
            "-o",
            str(tmp_path / "tv0.safetensors"),
            "--dtype",
            "float16",
        ],
    )
    assert r.exit_code == 0, r.output
    tv = load_file(tmp_path / "tv0.safetensors")
    base, ft = load_file(files["base"]), load_file(files["ft0"])
    assert torch.equal(tv["embed.weight"], (ft["embed.weight"] - base["embed.weight"]).half())
    assert "bn.num_batches_tracked" not in tv
    r = runner.invoke(app, ["info", str(tmp_path / "tv0.safetensors")])
    assert r.exit_code == 0 and "parameters" in r.output and f"{sum(v.numel() for v in tv.values()):,}" in r.output
    r = runner.invoke(
        app,
        [
            "apply",
            str(files["base"]),
            str(tmp_path / "tv0.safetensors"),
            "-o",
            str(tmp_path / "neg.safetensors"),
            "--coef",
            "-1",
        ],
    )
    assert r.exit_code == 0, r.output
    neg = load_file(tmp_path / "neg.safetensors")
    assert torch.equal(neg["head.weight"], base["head.weight"] - tv["head.weight"].float())
    # rerunning without --force refuses, and leaves the first output as it was
    r = runner.invoke(
        app, ["apply", str(files["base"]), str(tmp_path / "tv0.safetensors"), "-o", str(tmp_path / "neg.safetensors")]
    )
    # Rich wraps the message at the console width after a possibly long temporary path: compare words
    assert r.exit_code == 2 and "already exists (pass overwrite/--force to replace it)" in " ".join(r.output.split())


def test_merge_from_config_matches_api(tmp_path: Path, files) -> None:
    from taskvec import TaskVector, compose

    cfg = _cfg(
        tmp_path,
        f"""
method: ties
base: {files["base"].name}
models:
  - finetuned: {files["ft0"].name}
    weight: 1.0
  - finetuned: {files["ft1"].name}
    weight: {{"layers.*": 0.5, "*": 1.0}}
  - finetuned: {files["ft2"].name}
params: {{density: 0.3}}
scale: 0.8
shard_size: 1KB
""",
    )
    cfg.rename(files["base"].parent / "merge.yaml")  # paths are relative to the config file
    r = runner.invoke(app, ["merge", str(files["base"].parent / "merge.yaml"), "-o", str(tmp_path / "merged")])
    assert r.exit_code == 0, r.output
    assert (tmp_path / "merged" / "model.safetensors.index.json").exists()
    from taskvec.io import open_checkpoint, read

    out = open_checkpoint(tmp_path / "merged")
    tvs = [TaskVector.from_checkpoints(files["base"], files[f"ft{i}"]) for i in range(3)]
    ref = compose(tvs, "ties", [1.0, {"layers.*": 0.5, "*": 1.0}, 1.0], density=0.3).apply_to(
        load_file(files["base"]), 0.8
    )
    for k, v in ref.items():
        assert torch.equal(read(out, k), v), k


def test_bad_configs_name_the_fault(tmp_path: Path, files) -> None:
    cases = {
        "method: tiez\nbase: x\nmodels: [{finetuned: y}]\n": "unknown merge method 'tiez'",
        "base: x\nmodels: [{finetuned: y}]\ncolour: red\n": "colour",
        "method: ties\nbase: x\nmodels: [{finetuned: y}]\nparams: {density: 3}\n": "density",
        "base: x\nmodels: [{finetuned: y, task_vector: z}]\n": "models.0",
        "base: x\nmodels: [{finetuned: y, weight: lots}]\n": "models.0.weight",
        "base: x\nmodels: []\n": "models",
        "base: [unclosed\n": "not valid YAML",
    }
    for text, needle in cases.items():
        r = runner.invoke(app, ["merge", str(_cfg(tmp_path, text)), "-o", str(tmp_path / "o")])
        assert r.exit_code == 2, text
        assert needle in " ".join(r.output.split()), (text, r.output)
        assert not (tmp_path / "o").exists()
    # a config pointing at a missing checkpoint names the file
    r = runner.invoke(
        app,
        [
            "merge",
            str(_cfg(tmp_path, f"base: {files['base']}\nmodels: [{{finetuned: /nope/ft.safetensors}}]\n")),
            "-o",
            str(tmp_path / "o"),
        ],
    )
    assert r.exit_code == 2 and "/nope/ft.safetensors" in r.output


def test_similarity_table_and_heatmap(tmp_path: Path, files) -> None:
    paths = []
    for i in range(3):
        p = tmp_path / f"tv{i}.safetensors"
        assert runner.invoke(app, ["extract", str(files["base"]), str(files[f"ft{i}"]), "-o", str(p)]).exit_code == 0
        paths.append(str(p))
    r = runner.invoke(app, ["similarity", *paths, "--png", str(tmp_path / "sim.png")])
    assert r.exit_code == 0, r.output
    assert (tmp_path / "sim.png").read_bytes()[:4] == b"\x89PNG"
    a, b = load_file(paths[0]), load_file(paths[1])
    x = np.concatenate([a[k].numpy().ravel() for k in a]).astype(np.float64)
    y = np.concatenate([b[k].numpy().ravel() for k in a]).astype(np.float64)
    assert f"{x @ y / np.linalg.norm(x) / np.linalg.norm(y):.4f}" in r.output
    assert "1.0000" in r.output
    r = runner.invoke(app, ["similarity", *paths, "--device", "cpu"])
    assert r.exit_code == 0 and f"{x @ y / np.linalg.norm(x) / np.linalg.norm(y):.4f}" in r.output
    if not torch.cuda.is_available():
        r = runner.invoke(app, ["similarity", *paths, "--device", "cuda"])
        assert r.exit_code == 2 and "no CUDA device" in r.output


def test_bench_run_refuses_an_unknown_learned_method_before_any_work(tmp_path: Path) -> None:
    r = runner.invoke(app, ["bench", "run", "tiny", "--learned", "atlas_block,variationl", "-o", str(tmp_path)])
    assert r.exit_code == 2
    assert "unknown composer preset(s) variationl" in " ".join(r.output.split())
    assert not any(tmp_path.iterdir())
