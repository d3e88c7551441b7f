"""Second pass at losing nothing: lock files planted as links, an output that is its own input,
plot outputs, leftovers removed only when taskvec recorded them, stale bank sources, overflow,
strict parsing of every input format, and inputs that are not regular files. Through the real CLI."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from test_safety_write import cli  # the in-process CLI runner the safety tests share


def error(r: subprocess.CompletedProcess[str]) -> str:
    """The one `error:` line of a refused command (exit 2, no traceback)."""
    assert r.returncode == 2, (r.returncode, r.stdout, r.stderr)
    assert "Traceback" not in r.stderr
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr
    return lines[0]


def digest(path: Path) -> dict[str, str]:
    """sha256 of every file under `path` (or of `path`), by relative name."""
    if path.is_file():
        return {"": hashlib.sha256(path.read_bytes()).hexdigest()}
    return {
        str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(path.rglob("*"))
        if p.is_file()
    }


def dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def merge_config(files: dict[str, Path], folder: Path, name: str = "merge.yaml") -> Path:
    cfg = folder / name
    cfg.write_text(
        f"method: task_arithmetic\nbase: {files['base']}\nmodels:\n"
        f"  - finetuned: {files['ft0']}\n  - finetuned: {files['ft1']}\nscale: 0.5\n"
    )
    return cfg


@pytest.fixture
def tvs(tmp_path: Path, files: dict[str, Path]) -> dict[str, Path]:
    """Three task vectors ft_i - base (float32 files)."""
    out = {}
    for i in range(3):
        out[f"tv{i}"] = tmp_path / f"tv{i}.safetensors"
        assert cli("extract", files["base"], files[f"ft{i}"], "-o", out[f"tv{i}"]).returncode == 0
    return out


def cluster_bank(tmp_path: Path, tvs: dict[str, Path], *extra: object) -> Path:
    bank = tmp_path / "bank"
    r = cli("bases", "build", tvs["tv0"], tvs["tv1"], "-o", bank, "--method", "cluster", "--m", "1", *extra)
    assert r.returncode == 0, r.stderr
    return bank


# ---------------------------------------------------------------- lock files planted as links
@pytest.mark.parametrize("kind", ["symlink", "hardlink"])
def test_a_lock_file_that_is_a_link_is_refused_never_truncated(tmp_path: Path, files, kind: str) -> None:
    lock = tmp_path / ".out.safetensors.lock"
    if kind == "symlink":
        lock.symlink_to(files["base"])
    else:
        os.link(files["base"], lock)
    before = digest(files["base"])
    r = cli("merge", merge_config(files, tmp_path), "-o", tmp_path / "out.safetensors")
    assert "lock file .out.safetensors.lock" in error(r)
    assert digest(files["base"]) == before
    assert not (tmp_path / "out.safetensors").exists()


def test_a_bank_lock_that_is_a_link_is_refused(tmp_path: Path, tvs) -> None:
    bank = cluster_bank(tmp_path, tvs)
    (tmp_path / ".bank.lock").symlink_to(tvs["tv2"])
    before = digest(tmp_path)
    r = cli("bases", "add", bank, tvs["tv2"])
    assert "lock file .bank.lock" in error(r)
    assert digest(tmp_path) == before


# ---------------------------------------------------------------- an output that is its own input
@pytest.mark.parametrize("spelling", ["same", "dot", "absolute", "hardlink"])
def test_compress_never_replaces_its_own_input(tmp_path: Path, tvs, spelling: str) -> None:
    tv = tvs["tv0"]
    given = {"same": "tv0.safetensors", "dot": "./tv0.safetensors", "absolute": str(tv), "hardlink": "link.safetensors"}
    if spelling == "hardlink":
        os.link(tv, tmp_path / "link.safetensors")
    before = digest(tv)
    r = cli("compress", "tv0.safetensors", "-o", given[spelling], "--rank", "1", "--force", cwd=tmp_path)
    assert "is (or contains, or lies inside) the input" in error(r)
    assert digest(tv) == before


def test_apply_output_hard_linked_to_its_base_is_refused(tmp_path: Path, files, tvs) -> None:
    os.link(files["base"], tmp_path / "alias.safetensors")
    before = digest(files["base"])
    r = cli("apply", files["base"], tvs["tv0"], "-o", tmp_path / "alias.safetensors", "--force")
    assert "the input" in error(r)
    assert digest(files["base"]) == before


# ---------------------------------------------------------------- plots
def test_png_force_never_replaces_a_user_folder_or_file(tmp_path: Path, tvs) -> None:
    data = tmp_path / "data"
    data.mkdir()
    (data / "notes.md").write_text("months of notes")
    other = data / "tv9.safetensors"
    other.write_bytes(tvs["tv1"].read_bytes())
    photo = tmp_path / "photo.png"
    photo.write_bytes(b"\x89PNG the user's own picture")
    before = digest(tmp_path)
    r = cli("similarity", tvs["tv0"], other, "--png", data, "--force")
    assert "data" in error(r)
    r = cli("similarity", tvs["tv0"], tvs["tv1"], "--png", photo, "--force")
    assert "photo.png: is a file that taskvec did not write" in error(r)
    assert digest(tmp_path) == before


def test_png_force_replaces_a_plot_taskvec_wrote(tmp_path: Path, tvs) -> None:
    pytest.importorskip("matplotlib")
    png = tmp_path / "cos.png"
    assert cli("similarity", tvs["tv0"], tvs["tv1"], "--png", png).returncode == 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    r = cli("similarity", tvs["tv0"], tvs["tv2"], "--png", png, "--force")
    assert r.returncode == 0, r.stderr


def test_png_of_an_unknown_format_is_refused_before_the_work(tmp_path: Path, tvs) -> None:
    r = cli("similarity", tvs["tv0"], tvs["tv1"], "--png", tmp_path / "cos.bmpx")
    assert "cos.bmpx" in error(r) and "png" in error(r)
    assert not (tmp_path / "cos.bmpx").exists()


# ---------------------------------------------------------------- leftovers: only what taskvec recorded
def test_build_force_keeps_a_user_file_inside_a_sharded_basis(tmp_path: Path, tvs) -> None:
    bank = cluster_bank(tmp_path, tvs, "--shard-size", "600B")
    basis = bank / "basis-000"
    assert basis.is_dir()
    (basis / "my_notes.txt").write_text("mine")
    before = digest(bank)
    r = cli("bases", "build", tvs["tv0"], tvs["tv1"], "-o", bank, "--m", "1", "--force")
    assert "basis-000/my_notes.txt" in error(r)
    assert digest(bank) == before


def test_bases_add_keeps_user_files_named_like_bases(tmp_path: Path, tvs) -> None:
    bank = cluster_bank(tmp_path, tvs)
    mine = {bank / "basis-007.safetensors": tvs["tv0"].read_bytes(), bank / "basis-000.r9.safetensors": b"mine"}
    for p, raw in mine.items():
        p.write_bytes(raw)
    r = cli("bases", "add", bank, tvs["tv2"])
    assert r.returncode == 0, r.stderr
    assert all(p.read_bytes() == raw for p, raw in mine.items())
    assert cli("bases", "verify", bank).returncode == 0


def test_a_user_folder_named_like_a_temporary_is_kept(tmp_path: Path, files) -> None:
    folder = tmp_path / f".mrg.partial-{dead_pid()}"
    folder.mkdir()
    (folder / "notes.md").write_text("kept for years")
    before = digest(folder)
    r = cli("merge", merge_config(files, tmp_path), "-o", tmp_path / "mrg")
    assert r.returncode == 0, r.stderr
    assert digest(folder) == before


def test_disk_full_while_add_commits_leaves_the_bank_as_it_was(
    tmp_path: Path, tvs, monkeypatch: pytest.MonkeyPatch
) -> None:
    import errno

    bank = cluster_bank(tmp_path, tvs)
    before = digest(bank)
    real = Path.write_text

    def full(self: Path, *args: object, **kwargs: object) -> int:
        if self.name.startswith(".manifest.json.partial-"):  # the new manifest, after the new basis was written
            raise OSError(errno.ENOSPC, "No space left on device", str(self))
        return real(self, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(Path, "write_text", full)
    r = cli("bases", "add", bank, tvs["tv2"])
    monkeypatch.undo()
    assert "manifest.json: cannot write (no space left on the device); nothing was changed" in error(r)
    assert digest(bank) == before  # true to "nothing was changed": no orphan basis either
    r = cli("bases", "build", tvs["tv0"], tvs["tv1"], "-o", bank, "--m", "1", "--force")
    assert r.returncode == 0, r.stderr


def test_an_interrupted_add_leftover_is_removed_by_the_next_add(tmp_path: Path, tvs) -> None:
    """The name an add recorded before writing is removed; the user's look-alike is not."""
    from taskvec.io.atomic import PENDING

    bank = cluster_bank(tmp_path, tvs)
    (bank / "basis-000.r1.safetensors").write_bytes(b"half written by a killed add")
    (bank / PENDING).write_text(json.dumps({"files": ["basis-000.r1.safetensors"]}))
    (bank / "basis-000.r2.safetensors").write_bytes(b"the user's")
    assert cli("bases", "add", bank, tvs["tv2"]).returncode == 0
    assert (bank / "basis-000.r2.safetensors").read_bytes() == b"the user's"
    assert not (bank / PENDING).exists()
    assert cli("bases", "verify", bank).returncode == 0


# ---------------------------------------------------------------- a bank's recorded sources
def test_bases_add_refuses_a_changed_member_source(tmp_path: Path, tvs, files) -> None:
    bank = cluster_bank(tmp_path, tvs)
    original = tvs["tv0"].read_bytes()
    tvs["tv0"].write_bytes(tvs["tv2"].read_bytes())  # the file the bank recorded now holds another task
    r = cli("bases", "verify", bank)
    assert r.returncode == 0 and "tv0" in r.stderr and "changed since it was recorded" in r.stderr
    before = digest(bank)
    r = cli("bases", "add", bank, tvs["tv1"], "--name", "again")
    assert "tv0" in error(r) and "--allow-changed-sources" in error(r)
    assert digest(bank) == before
    r = cli("bases", "add", bank, tvs["tv1"], "--name", "again", "--allow-changed-sources")
    assert r.returncode == 0, r.stderr
    assert "changed" not in cli("bases", "verify", bank).stderr  # the new content is now the recorded one
    tvs["tv0"].write_bytes(original)


# ---------------------------------------------------------------- overflow: refused, never Inf with exit 0
def test_a_merge_of_finite_inputs_that_overflows_float32_is_refused(tmp_path: Path) -> None:
    save_file({"w": torch.zeros(4, 4)}, tmp_path / "base.safetensors")
    for i in range(2):
        save_file({"w": torch.full((4, 4), 3e38)}, tmp_path / f"ft{i}.safetensors")
    (tmp_path / "m.yaml").write_text(
        "method: task_arithmetic\nbase: base.safetensors\n"
        "models:\n  - {finetuned: ft0.safetensors}\n  - {finetuned: ft1.safetensors}\n"
    )
    r = cli("merge", tmp_path / "m.yaml", "-o", tmp_path / "out.safetensors")
    assert "tensor 'w'" in error(r) and "overflow float32" in error(r)
    assert not (tmp_path / "out.safetensors").exists()


def test_apply_coef_that_overflows_float32_is_refused(tmp_path: Path) -> None:
    save_file({"w": torch.ones(3, 3)}, tmp_path / "base.safetensors")
    save_file({"w": torch.full((3, 3), 10.0)}, tmp_path / "tv.safetensors")
    r = cli(
        "apply",
        tmp_path / "base.safetensors",
        tmp_path / "tv.safetensors",
        "-o",
        tmp_path / "o.safetensors",
        "--coef",
        "1e38",
    )
    assert "tensor 'w'" in error(r) and "--coef" in error(r)
    assert not (tmp_path / "o.safetensors").exists()


def test_coef_beyond_float32_is_refused_as_an_option(tmp_path: Path, tvs, files) -> None:
    r = cli("apply", files["base"], tvs["tv0"], "-o", tmp_path / "o.safetensors", "--coef", "1e39")
    assert r.returncode == 2 and "Traceback" not in r.stderr and "float32 range" in r.stderr and "--coef" in r.stderr
    bank = cluster_bank(tmp_path, tvs)
    r = cli("bases", "compose", bank, "--add", "tv0", "-o", tmp_path / "c.safetensors", "--coef", "-1e39")
    assert r.returncode == 2 and "Traceback" not in r.stderr and "float32 range" in r.stderr
    assert not (tmp_path / "o.safetensors").exists() and not (tmp_path / "c.safetensors").exists()


# ---------------------------------------------------------------- configs: strict YAML
@pytest.mark.parametrize(
    ("text", "says"),
    [
        ("method: task_arithmetic\nmethod: ties\n", "key 'method' appears twice"),
        ("method: ties\nscale: 1.0\nscale: 0.5\n", "key 'scale' appears twice"),
        ("method: ties\n", "models.0.weight: true is a boolean, not a number"),
        ("method: ties\nscale: 1.0e+39\n", "scale: 1e+39 is beyond the float32 range"),
    ],
)
def test_merge_config_is_read_strictly(tmp_path: Path, files, text: str, says: str) -> None:
    weight = "true" if "boolean" in says else "1.0"
    cfg = tmp_path / "m.yaml"
    cfg.write_text(text + f"base: {files['base']}\nmodels:\n  - {{finetuned: {files['ft0']}, weight: {weight}}}\n")
    r = cli("merge", cfg, "-o", tmp_path / "out")
    assert says in error(r) and "m.yaml" in error(r)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("kind", ["merge", "suite", "bases"])
def test_a_config_that_is_not_utf8_is_refused(tmp_path: Path, files, kind: str) -> None:
    cfg = tmp_path / "c.yaml"
    cfg.write_bytes(b"method: ties\nname: caf\xe9\n")
    args = {
        "merge": ("merge", cfg, "-o", tmp_path / "out"),
        "suite": ("bench", "run", cfg, "-o", tmp_path / "out"),
        "bases": ("bases", "build", cfg, "-o", tmp_path / "out"),
    }[kind]
    r = cli(*args)
    assert "c.yaml: is not UTF-8 text" in error(r)


# ---------------------------------------------------------------- fp8 inputs: computed in float32
def test_fp8_checkpoints_extract_merge_and_compress(tmp_path: Path) -> None:
    g = torch.Generator().manual_seed(0)
    base = {"w": torch.randn(8, 6, generator=g), "b": torch.randn(6, generator=g)}
    for name, dt in (("e4m3", torch.float8_e4m3fn), ("e5m2", torch.float8_e5m2)):
        b8 = {k: v.to(dt) for k, v in base.items()}
        f8 = {k: (v + 0.25 * torch.randn(v.shape, generator=g)).to(dt) for k, v in base.items()}
        save_file(b8, tmp_path / f"base-{name}.safetensors")
        save_file(f8, tmp_path / f"ft-{name}.safetensors")
        tv = tmp_path / f"tv-{name}.safetensors"
        assert (
            cli(
                "extract", tmp_path / f"base-{name}.safetensors", tmp_path / f"ft-{name}.safetensors", "-o", tv
            ).returncode
            == 0
        )
        got = load_file(tv)
        for k in base:  # exact: the fp8 values are exactly representable in float32, and so is their difference
            want = f8[k].to(torch.float64) - b8[k].to(torch.float64)
            assert got[k].dtype == torch.float32 and torch.equal(got[k].to(torch.float64), want)
        cfg = tmp_path / f"m-{name}.yaml"
        cfg.write_text(f"method: ties\nbase: base-{name}.safetensors\nmodels:\n  - finetuned: ft-{name}.safetensors\n")
        r = cli("merge", cfg, "-o", tmp_path / f"merged-{name}.safetensors")
        assert r.returncode == 0, r.stderr
        assert load_file(tmp_path / f"merged-{name}.safetensors")["w"].dtype == dt  # stored like the base
        r = cli("compress", tv, "-o", tmp_path / f"c-{name}.safetensors", "--rank", "2")
        assert r.returncode == 0, r.stderr


# ---------------------------------------------------------------- JSON nested too deep: a clear error
def _deep(n: int = 100_000) -> str:
    return "[" * n + "]" * n


def test_a_deeply_nested_safetensors_header_is_refused(tmp_path: Path, files) -> None:
    body = ('{"__metadata__": {"x": "y"}, "w": ' + _deep() + "}").encode()
    (tmp_path / "deep.safetensors").write_bytes(len(body).to_bytes(8, "little") + body)
    r = cli("info", tmp_path / "deep.safetensors")
    assert "deep.safetensors: corrupt safetensors header: JSON nested more than" in error(r)


def test_a_deeply_nested_shard_index_is_refused(tmp_path: Path, files) -> None:
    folder = tmp_path / "m"
    folder.mkdir()
    (folder / "a.safetensors").write_bytes(files["ft0"].read_bytes())
    (folder / "model.safetensors.index.json").write_text('{"weight_map": ' + _deep() + "}")
    r = cli("extract", files["base"], folder, "-o", tmp_path / "tv.safetensors")
    assert "model.safetensors.index.json: not a valid safetensors index" in error(r) and "nested" in error(r)


def test_a_deeply_nested_bank_manifest_is_refused(tmp_path: Path, tvs) -> None:
    bank = cluster_bank(tmp_path, tvs)
    text = (bank / "manifest.json").read_text()
    (bank / "manifest.json").write_text(text.replace('"info": {', '"info": {"deep": ' + _deep() + ", ", 1))
    for args in (("bases", "info", bank), ("bases", "verify", bank), ("bases", "add", bank, tvs["tv2"])):
        r = cli(*args)
        assert "manifest.json: corrupt manifest, not valid JSON (JSON nested more than" in error(r)
    r = cli("bases", "build", tvs["tv0"], tvs["tv1"], "-o", bank, "--m", "1", "--force")
    assert "bank: is a folder that taskvec did not write" in error(r)  # not readable as taskvec's: kept


# ---------------------------------------------------------------- inputs that are not regular files
@pytest.mark.parametrize("kind", ["fifo", "device"])
def test_a_pipe_or_device_given_as_an_input_is_refused_at_once(tmp_path: Path, files, kind: str) -> None:
    if kind == "fifo":
        src = tmp_path / "ft.safetensors"
        os.mkfifo(src)
    else:
        src = tmp_path / "ft.safetensors"
        src.symlink_to("/dev/urandom")
    cfg = tmp_path / "m.yaml"
    cfg.write_text(f"method: ties\nbase: {files['base']}\nmodels:\n  - finetuned: {src}\n")
    for args in (
        ("info", src),
        ("extract", files["base"], src, "-o", tmp_path / "tv.safetensors"),
        ("merge", cfg, "-o", tmp_path / "out"),
    ):
        r = cli(*args)
        assert "ft.safetensors: is a " in error(r) and "not a regular file" in error(r)
    yaml_pipe = tmp_path / "pipe.yaml"
    os.mkfifo(yaml_pipe)
    r = cli("merge", yaml_pipe, "-o", tmp_path / "out")
    assert "pipe.yaml: is a named pipe" in error(r)


# ---------------------------------------------------------------- options and adapters validated
def test_info_top_must_not_be_negative(files) -> None:
    r = cli("info", files["base"], "--top", "-1")
    assert r.returncode == 2 and "--top" in r.stderr and "Traceback" not in r.stderr


def _adapter(tmp_path: Path, config: dict, tensors: dict | list | None = None, bin_file: bool = False) -> Path:
    folder = tmp_path / "adapter"
    folder.mkdir(exist_ok=True)
    (folder / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", **config}))
    g = torch.Generator().manual_seed(0)
    if tensors is None:
        tensors = {
            "base_model.model.fc.lora_A.weight": torch.randn(2, 8, generator=g),
            "base_model.model.fc.lora_B.weight": torch.randn(5, 2, generator=g),
        }
    if bin_file:
        torch.save(tensors, folder / "adapter_model.bin")
    else:
        save_file(tensors, folder / "adapter_model.safetensors")
    return folder


@pytest.mark.parametrize(
    ("config", "says"),
    [
        ({"r": "2", "lora_alpha": 4}, "r: Input should be a valid integer"),
        ({"r": 2, "lora_alpha": "4"}, "lora_alpha: Input should be a valid number"),
        (
            {"r": 2, "lora_alpha": 4, "rank_pattern": {"fc(": 2}},
            "rank_pattern: 'fc(' is not a valid regular expression",
        ),
        ({"r": 2, "lora_alpha": 4, "alpha_pattern": [["fc", 2]]}, "alpha_pattern: Input should be a valid dictionary"),
    ],
)
def test_a_lora_config_of_the_wrong_types_is_refused(tmp_path: Path, config: dict, says: str) -> None:
    r = cli("info", _adapter(tmp_path, config))
    assert "adapter_config.json" in error(r) and says in error(r)


def test_integer_lora_weights_are_refused(tmp_path: Path) -> None:
    tensors = {
        "base_model.model.fc.lora_A.weight": torch.ones(2, 8, dtype=torch.int32),
        "base_model.model.fc.lora_B.weight": torch.ones(5, 2, dtype=torch.int32),
    }
    r = cli("info", _adapter(tmp_path, {"r": 2, "lora_alpha": 4}, tensors))
    assert "lora_A.weight" in error(r) and "int32" in error(r)


def test_an_adapter_bin_holding_a_list_is_refused(tmp_path: Path) -> None:
    r = cli("info", _adapter(tmp_path, {"r": 2, "lora_alpha": 4}, [torch.ones(2)], bin_file=True))
    assert "adapter_model.bin: holds a list, not a dict of adapter tensors" in error(r)


# ---------------------------------------------------------------- compose predict inputs read strictly
@pytest.mark.parametrize(
    ("raw", "says"),
    [
        (b'text,label\n"an unterminated quote,a\nmore,b\n', "a quote is never closed"),
        (b"text,label\none,a,extra\ntwo,b\n", ":2: 3 fields, the header has 2"),
        (b"text,label\none\ntwo,b\n", ":2: 1 fields, the header has 2"),
        (b"text,label\ncaf\xe9,a\n", "is not UTF-8 text"),
        (b"text,label\n" + b"x" * (200 * 1024) + b",a\n", "a field is longer than 128 KiB"),
    ],
    ids=["unterminated-quote", "extra-field", "missing-field", "not-utf8", "field-over-128KiB"],
)
def test_a_damaged_csv_is_refused_not_merged(tmp_path: Path, raw: bytes, says: str) -> None:
    from taskvec.bench.sources import read_table
    from taskvec.errors import ConfigError

    path = tmp_path / "inputs.csv"
    path.write_bytes(raw)
    with pytest.raises(ConfigError, match="inputs.csv") as e:
        read_table(path, "csv")
    assert says in str(e.value)
    r = cli("compose", "predict", tmp_path / "composer", path, "--task", "t", "-o", tmp_path / "p.jsonl")
    assert "inputs.csv" in error(r) and says in error(r)  # refused before the composer is even looked at


def test_a_good_csv_keeps_quoted_separators_and_newlines(tmp_path: Path) -> None:
    from taskvec.bench.sources import read_table

    path = tmp_path / "inputs.csv"
    path.write_text('text,label\n"one, two",a\n"line\nbreak",b\n')
    assert read_table(path, "csv") == [{"text": "one, two", "label": "a"}, {"text": "line\nbreak", "label": "b"}]


def test_a_corrupt_or_object_npz_is_refused(tmp_path: Path) -> None:
    import numpy as np

    from taskvec.bench.sources import read_npz
    from taskvec.errors import ConfigError

    (tmp_path / "corrupt.npz").write_bytes(b"PK\x03\x04" + b"\x00" * 64)
    np.savez(tmp_path / "obj.npz", x=np.array([{"a": 1}, None], dtype=object))
    np.save(tmp_path / "one.npy", np.zeros(3))
    (tmp_path / "one.npy").rename(tmp_path / "one.npz")
    for name, says in (
        ("corrupt.npz", "not a readable .npz file"),
        ("obj.npz", "holds object (pickled) arrays"),
        ("one.npz", "a single .npy array"),
    ):
        with pytest.raises(ConfigError, match=name) as e:
            read_npz(tmp_path / name, ["x"])
        assert says in str(e.value)


# ---------------------------------------------------------------- bench: caches, resume state, factories
def test_a_mismatched_resume_state_is_a_clear_error(tmp_path: Path) -> None:
    from taskvec.bench.finetune import finetune, save_state
    from taskvec.bench.suite import FinetuneSpec, Split
    from taskvec.errors import CheckpointError

    other = torch.nn.Linear(3, 3)  # the state of another backbone
    opt = torch.optim.AdamW(other.parameters())
    save_state({"model": other.state_dict(), "opt": opt.state_dict(), "sched": {}, "step": 1}, tmp_path / "state.pt")
    split = Split(torch.randn(8, 4), torch.zeros(8, dtype=torch.long))
    with pytest.raises(CheckpointError, match="state.pt: resume state does not match this fine-tuning"):
        finetune(
            torch.nn.Linear(4, 4),
            torch.nn.Linear(4, 2),
            split,
            FinetuneSpec(),
            seed=0,
            state_path=tmp_path / "state.pt",
            progress=False,
        )


def test_a_damaged_cached_finetune_is_computed_again(tmp_path: Path) -> None:
    from taskvec.bench.cache import load_cached, save_atomic

    like = {"w": torch.randn(4, 4), "b": torch.randn(4)}
    path = tmp_path / "finetuned.safetensors"
    save_atomic(like, path)
    assert torch.equal(load_cached(path, like)["w"], like["w"])  # type: ignore[index]
    path.write_bytes(path.read_bytes()[:-10])  # truncated by a full disk or a copy cut short
    with pytest.warns(UserWarning, match="damaged cache entry .*truncated"):
        assert load_cached(path, like) is None
    save_atomic({"w": torch.randn(2, 2), "b": torch.randn(4)}, path)  # another backbone's weights
    with pytest.warns(UserWarning, match="do not match the backbone"):
        assert load_cached(path, like) is None


@pytest.mark.parametrize("target", ["os:sep", "math:pi"])
def test_a_suite_factory_that_is_not_callable_is_refused(tmp_path: Path, target: str) -> None:
    from taskvec.bench.backbones import backbone_spec, load_backbone
    from taskvec.bench.sources import FunctionSource, load_function
    from taskvec.errors import ConfigError

    with pytest.raises(ConfigError, match="not a function to call"):
        load_backbone(backbone_spec(factory=target, images={"size": 8}), tmp_path)
    with pytest.raises(ConfigError, match="not a function to call"):
        load_function(FunctionSource(kind="function", function=target), tmp_path)
