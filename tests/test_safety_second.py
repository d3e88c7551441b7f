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
from typer.testing import CliRunner

from taskvec.cli import app

runner = CliRunner()


def cli(*args: object, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    """Run `taskvec ARGS` in this process through Typer's runner (same app, messages, exit codes)."""
    old = Path.cwd()
    if cwd is not None:
        os.chdir(cwd)
    try:
        r = runner.invoke(app, [str(a) for a in args], env={"COLUMNS": "1000"})
    finally:
        os.chdir(old)
    if r.exception is not None and not isinstance(r.exception, SystemExit):
        raise r.exception
    return subprocess.CompletedProcess(["taskvec", *map(str, args)], r.exit_code, r.stdout, r.stderr)


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

    import taskvec.bases.bank as bank_module
    from taskvec.bases.bank import MANIFEST
    from taskvec.io.atomic import write_text_atomic

    bank = cluster_bank(tmp_path, tvs)
    before = digest(bank)

    def full(path: str | os.PathLike[str], text: str) -> None:
        if Path(path).name == MANIFEST:
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        write_text_atomic(path, text)

    monkeypatch.setattr(bank_module, "write_text_atomic", full)
    r = cli("bases", "add", bank, tvs["tv2"])
    assert "No space left" in error(r)
    monkeypatch.undo()
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
