"""Writing safely: --force replaces only taskvec's own outputs, locks, bank integrity, stale
temporaries, file system errors and resume state that cannot run code. Through the real CLI."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from taskvec.cli import app

runner = CliRunner()
SRC = str(Path(__file__).resolve().parents[1] / "src")
ENV = {**os.environ, "COLUMNS": "1000", "PYTHONPATH": SRC + os.pathsep + os.environ.get("PYTHONPATH", "")}


def cli(*args: object, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    """Run `taskvec ARGS` as a user would (the same app, arguments, messages and exit codes),
    in this process through Typer's runner; the tests that need separate processes (locks, kills,
    concurrent writers) start them explicitly."""
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


def cli_process(*args: object) -> subprocess.CompletedProcess[str]:
    """Run `python -m taskvec ARGS` in a fresh process (for tests about other processes' files)."""
    return subprocess.run(
        [sys.executable, "-m", "taskvec", *map(str, args)],
        check=False,
        capture_output=True,
        text=True,
        env=ENV,
        timeout=300,
    )


def digest(path: Path) -> dict[str, str]:
    """sha256 of every file under `path` (or of `path`), by relative name."""
    if path.is_file():
        return {"": hashlib.sha256(path.read_bytes()).hexdigest()}
    return {
        str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(path.rglob("*"))
        if p.is_file()
    }


def merge_config(files: dict[str, Path], folder: Path) -> Path:
    cfg = folder / "merge.yaml"
    cfg.write_text(
        f"method: task_arithmetic\nbase: {files['base']}\nmodels:\n"
        f"  - finetuned: {files['ft0']}\n  - finetuned: {files['ft1']}\nscale: 0.5\n"
    )
    return cfg


def one_line(r) -> str:  # type: ignore[no-untyped-def]
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, r.stderr
    assert "Traceback" not in r.stderr
    return lines[0]


# ---------------------------------------------------------------- --force
def test_force_refuses_a_folder_taskvec_did_not_write(tmp_path: Path, files) -> None:
    user = tmp_path / "mine"
    user.mkdir()
    (user / "notes.txt").write_text("precious")
    shutil.copy(files["ft2"], user / "ft2.safetensors")
    before = digest(user)
    r = runner.invoke(app, ["merge", str(merge_config(files, tmp_path)), "-o", str(user), "--force"])
    assert r.exit_code != 0
    assert "taskvec did not write" in r.output
    assert digest(user) == before


def test_force_replaces_a_taskvec_output_but_not_files_added_to_it(tmp_path: Path, files) -> None:
    cfg = merge_config(files, tmp_path)
    out = tmp_path / "merged"
    assert runner.invoke(app, ["merge", str(cfg), "-o", str(out)]).exit_code == 0
    first = digest(out)
    meta = json.loads((out / "model.safetensors.index.json").read_text())["metadata"]
    assert json.loads(meta["taskvec_files"]) == sorted(
        p.name for p in out.iterdir()
    )  # the index lists what taskvec wrote
    r = runner.invoke(app, ["merge", str(cfg), "-o", str(out), "--force"])
    assert r.exit_code == 0, r.output
    assert digest(out) == first  # same config, same bits
    (out / "notes.txt").write_text("mine")
    r = runner.invoke(app, ["merge", str(cfg), "-o", str(out), "--force"])
    assert r.exit_code != 0 and "notes.txt" in r.output.replace("\n", "")
    assert (out / "notes.txt").read_text() == "mine" and {
        k: v for k, v in digest(out).items() if k != "notes.txt"
    } == first


def test_force_on_single_files(tmp_path: Path, files) -> None:
    cfg = merge_config(files, tmp_path)
    foreign = tmp_path / "foreign.safetensors"
    save_file({"x": torch.ones(3)}, foreign)  # a safetensors file written by another tool
    before = digest(foreign)
    r = cli("merge", cfg, "-o", foreign, "--force")
    assert r.returncode != 0 and "taskvec did not write" in one_line(r)
    assert digest(foreign) == before
    ours = tmp_path / "ours.safetensors"
    assert cli("merge", cfg, "-o", ours).returncode == 0
    assert load_file(ours).keys() == load_file(files["base"]).keys()
    r = cli("merge", cfg, "-o", ours, "--force")
    assert r.returncode == 0, r.stderr


def test_force_refuses_the_working_folder_and_the_inputs(tmp_path: Path, files) -> None:
    cfg = merge_config(files, tmp_path)
    before = digest(tmp_path)
    for out in (".", str(tmp_path), str(tmp_path.parent)):
        r = cli("merge", cfg, "-o", out, "--force", cwd=tmp_path)
        assert r.returncode != 0, out
        assert "working folder" in one_line(r) or "new file or folder name" in one_line(r)
    # a merged model written by taskvec used as the base of the next merge: -o BASE is refused
    merged = tmp_path / "m.safetensors"
    assert cli("merge", cfg, "-o", merged).returncode == 0
    cfg2 = tmp_path / "m2.yaml"
    cfg2.write_text(f"method: task_arithmetic\nbase: {merged}\nmodels:\n  - finetuned: {files['ft0']}\n")
    before = digest(tmp_path)
    r = cli("merge", cfg2, "-o", merged, "--force")
    assert r.returncode != 0 and "input" in one_line(r)
    r = cli("apply", merged, files["ft0"], "-o", merged, "--force")
    assert r.returncode != 0 and "input" in one_line(r)
    assert digest(tmp_path) == before


def test_overwrite_is_checked_again_before_the_rename(tmp_path: Path) -> None:
    from taskvec.io import CheckpointWriter, TensorSpec

    out = tmp_path / "out"
    w = CheckpointWriter(out, {"a": TensorSpec(shape=(4,), dtype=torch.float32)})
    with pytest.raises(Exception, match="already exists"), w:
        w.write("a", torch.ones(4))
        out.mkdir()  # someone else created it meanwhile
        (out / "theirs").write_text("x")
    assert (out / "theirs").read_text() == "x"
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


# ---------------------------------------------------------------- locks
HOLD = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    from taskvec.io.atomic import path_lock
    with path_lock(Path(sys.argv[1])):
        Path(sys.argv[2]).write_text("locked")
        while not Path(sys.argv[3]).exists():
            time.sleep(0.05)
""")


def hold_lock(out: Path, tmp_path: Path) -> tuple[subprocess.Popen[str], Path]:
    ready, release = tmp_path / "ready", tmp_path / "release"
    p = subprocess.Popen([sys.executable, "-c", HOLD, str(out), str(ready), str(release)], env=ENV, text=True)
    for _ in range(400):
        if ready.exists():
            return p, release
        time.sleep(0.05)
    p.kill()
    raise AssertionError("the lock holder did not start")


def test_a_held_lock_makes_merge_fail_at_once(tmp_path: Path, files) -> None:
    out = tmp_path / "merged"
    holder, release = hold_lock(out, tmp_path)
    try:
        r = cli("merge", merge_config(files, tmp_path), "-o", out)
        assert r.returncode != 0
        assert f"is being written by another taskvec process (pid {holder.pid})" in one_line(r)
        assert not out.exists()
    finally:
        release.write_text("")
        holder.wait(30)
    assert cli("merge", merge_config(files, tmp_path), "-o", out).returncode == 0
    assert not list(tmp_path.glob(".merged.*"))  # no lock file or temporary left


SLOW_WRITER = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    import torch
    from taskvec.io import CheckpointWriter
    from taskvec.io.safetensors_file import TensorSpec
    out, started, release = map(Path, sys.argv[1:4])
    with CheckpointWriter(out, {"w": TensorSpec(shape=(1000,), dtype=torch.float32)}, metadata={"who": "first"}) as w:
        w.write("w", torch.zeros(500))
        started.write_text("")
        while not release.exists():
            time.sleep(0.05)
        w.write("w", torch.zeros(500))
""")


def test_two_real_writers_of_one_path_one_wins(tmp_path: Path, files) -> None:
    out = tmp_path / "merged.safetensors"
    started, release = tmp_path / "started", tmp_path / "release"
    first = subprocess.Popen(
        [sys.executable, "-c", SLOW_WRITER, str(out), str(started), str(release)], env=ENV, text=True
    )
    try:
        for _ in range(400):
            if started.exists():
                break
            time.sleep(0.05)
        second = cli("merge", merge_config(files, tmp_path), "-o", out, "--force")
        assert second.returncode != 0 and f"pid {first.pid}" in one_line(second)
    finally:
        release.write_text("")
        assert first.wait(60) == 0
    from safetensors import safe_open

    with safe_open(str(out), "pt") as f:
        assert f.metadata()["who"] == "first"
    third = cli("merge", merge_config(files, tmp_path), "-o", out)
    assert third.returncode != 0 and "already exists" in one_line(third)


def test_concurrent_bases_add_is_refused(tmp_path: Path, files) -> None:
    tvs = []
    for i in range(3):
        tvs.append(tmp_path / f"tv{i}.safetensors")
        assert cli("extract", files["base"], files[f"ft{i}"], "-o", tvs[-1]).returncode == 0
    bank = tmp_path / "bank"
    assert cli("bases", "build", tvs[0], tvs[1], "-o", bank, "--m", 1).returncode == 0
    before = digest(bank)
    holder, release = hold_lock(bank, tmp_path)
    try:
        r = cli("bases", "add", bank, tvs[2])
        assert r.returncode != 0 and f"is being changed by another taskvec process (pid {holder.pid})" in one_line(r)
    finally:
        release.write_text("")
        holder.wait(30)
    assert digest(bank) == before
    assert cli("bases", "add", bank, tvs[2]).returncode == 0
    assert cli("bases", "verify", bank).returncode == 0


# ---------------------------------------------------------------- banks
@pytest.fixture
def bank(tmp_path: Path, files) -> Path:
    tvs = []
    for i in range(3):
        tvs.append(tmp_path / f"tv{i}.safetensors")
        r = runner.invoke(app, ["extract", str(files["base"]), str(files[f"ft{i}"]), "-o", str(tvs[-1])])
        assert r.exit_code == 0, r.output
    out = tmp_path / "bank"
    r = runner.invoke(app, ["bases", "build", *map(str, tvs), "-o", str(out), "--method", "pca", "--m", "2"])
    assert r.exit_code == 0, r.output
    return out


def compose_ok(bank: Path, out: Path) -> tuple[int, str]:
    r = cli("bases", "compose", bank, "-o", out, "--add", "tv0,tv1")
    return r.returncode, r.stderr


def flip_byte(path: Path, offset_from_end: int = 3) -> None:
    data = bytearray(path.read_bytes())
    data[-offset_from_end] ^= 0x01
    path.write_bytes(bytes(data))


def test_bank_is_verified(bank: Path, tmp_path: Path) -> None:
    assert cli("bases", "verify", bank).returncode == 0
    mf = json.loads((bank / "manifest.json").read_text())
    assert all(len(b["sha256"]) == 64 for b in mf["bases"])
    assert compose_ok(bank, tmp_path / "ok.safetensors")[0] == 0


@pytest.mark.parametrize(
    "fault", ["flipped byte", "replaced by another file", "swapped", "edited dtype", "edited bytes"]
)
def test_corrupt_bank_is_refused(bank: Path, tmp_path: Path, fault: str) -> None:
    b0, b1 = bank / "basis-000.safetensors", bank / "basis-001.safetensors"
    mpath = bank / "manifest.json"
    mf = json.loads(mpath.read_text())
    if fault == "flipped byte":
        flip_byte(b0)
    elif fault == "replaced by another file":  # same tensors and shapes, other values
        t = load_file(b0)
        save_file({k: v * 2 for k, v in t.items()}, b0, metadata={"taskvec": "taskvec/basis"})
    elif fault == "swapped":
        tmp = bank / "x"
        b0.rename(tmp)
        b1.rename(b0)
        tmp.rename(b1)
    elif fault == "edited dtype":
        mf["dtype"] = "float16" if mf["dtype"] != "float16" else "float32"
        mpath.write_text(json.dumps(mf))
    else:
        mf["bases"][0]["bytes"] += 8
        mpath.write_text(json.dumps(mf))
    out = tmp_path / "composed.safetensors"
    code, err = compose_ok(bank, out)
    assert code != 0 and "Traceback" not in err
    assert "basis-00" in err or "dtype" in err
    assert not out.exists()
    r = cli("bases", "verify", bank)
    assert r.returncode != 0 and ("basis-00" in one_line(r))


def test_bank_without_checksums_is_refused_until_rehashed(bank: Path, tmp_path: Path) -> None:
    mpath = bank / "manifest.json"
    mf = json.loads(mpath.read_text())
    for b in mf["bases"]:
        del b["sha256"]
    mpath.write_text(json.dumps(mf))
    r = cli("bases", "verify", bank)
    assert r.returncode != 0 and "--rehash" in one_line(r)
    assert compose_ok(bank, tmp_path / "c.safetensors")[0] != 0
    assert cli("bases", "verify", "--rehash", bank).returncode == 0
    assert cli("bases", "verify", bank).returncode == 0
    assert compose_ok(bank, tmp_path / "c.safetensors")[0] == 0


@pytest.mark.parametrize("escape", ["absolute", "dotdot", "symlink"])
def test_manifest_paths_must_stay_inside_the_bank(bank: Path, tmp_path: Path, escape: str) -> None:
    victim = tmp_path / "victim"
    victim.mkdir()
    shutil.copy(bank / "basis-000.safetensors", victim / "basis.safetensors")
    (victim / "keep.txt").write_text("keep")
    before = digest(victim)
    mpath = bank / "manifest.json"
    mf = json.loads(mpath.read_text())
    if escape == "absolute":
        mf["bases"][0]["file"] = str(victim)
    elif escape == "dotdot":
        mf["bases"][0]["file"] = "../victim"
    else:
        (bank / "basis-000.safetensors").unlink()
        (bank / "basis-000.safetensors").symlink_to(victim / "basis.safetensors")
    mpath.write_text(json.dumps(mf))
    for args in (
        ["bases", "add", bank, tmp_path / "tv2.safetensors", "--name", "again"],
        ["bases", "info", bank],
        ["bases", "verify", bank],
    ):
        r = cli(*args)
        assert r.returncode != 0, args
        assert "bank" in one_line(r)
    assert digest(victim) == before


# ---------------------------------------------------------------- stale temporaries
def dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def test_stale_temporaries_of_dead_processes_are_removed(tmp_path: Path, files) -> None:
    """Killed writers leave their lock file naming them; their temporaries go, nothing else does."""
    out = tmp_path / "merged"
    dead, dead2 = dead_pid(), dead_pid()
    (tmp_path / ".merged.lock").write_text(f"{dead2} {dead}\n")  # what two killed writers left
    stale_dir, stale_file = tmp_path / f".merged.partial-{dead}", tmp_path / f".merged.partial-{dead2}"
    stale_dir.mkdir()
    (stale_dir / "model.safetensors").write_bytes(b"half")
    stale_file.write_bytes(b"x")
    alive = tmp_path / f".merged.partial-{os.getpid()}"  # a live process's: never touched
    alive.write_bytes(b"live")
    other = tmp_path / f".notes.partial-{dead}"  # not beside this output's name
    other.write_bytes(b"other")
    mine = tmp_path / "merged.partial-1"  # not hidden: not a taskvec temporary
    mine.write_bytes(b"mine")
    r = cli_process("merge", merge_config(files, tmp_path), "-o", out)
    assert r.returncode == 0, r.stderr
    assert not stale_dir.exists() and not stale_file.exists()
    assert alive.read_bytes() == b"live" and other.read_bytes() == b"other" and mine.read_bytes() == b"mine"


def test_an_interrupted_replacement_keeps_the_old_output(tmp_path: Path, files) -> None:
    """Killed between moving the old output aside and renaming the new one in: the old one comes back."""
    out = tmp_path / "merged"
    cfg = merge_config(files, tmp_path)
    assert cli("merge", cfg, "-o", out).returncode == 0
    before = digest(out)
    killed = dead_pid()
    aside = tmp_path / f".merged.old-{killed}"
    out.rename(aside)
    (tmp_path / ".merged.lock").write_text(f"{killed}\n")  # the killed writer's lock stays behind
    r = cli("merge", cfg, "-o", out)
    assert r.returncode != 0 and "already exists" in one_line(r)
    assert digest(out) == before and not aside.exists()


# ---------------------------------------------------------------- file system errors
def _mount(tmp_path: Path, opts: str) -> Path | None:
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    if (
        os.geteuid() != 0
        or subprocess.run(
            ["mount", "-t", "tmpfs", "-o", opts, "tmpfs", str(mnt)], check=False, capture_output=True
        ).returncode
        != 0
    ):
        return None
    return mnt


def _umount(mnt: Path) -> None:
    subprocess.run(["umount", str(mnt)], check=True)


def test_disk_full_leaves_the_previous_output(tmp_path: Path, files) -> None:
    mnt = _mount(tmp_path, "size=64k")
    if mnt is None:
        pytest.skip("needs root to mount a small tmpfs")
    try:
        small = mnt / "old.safetensors"
        save_file({"a": torch.zeros(4)}, tmp_path / "x.safetensors")
        big = {f"t{i}": torch.randn(64, 64) for i in range(8)}  # 128 KiB: does not fit
        save_file(big, tmp_path / "big_base.safetensors")
        save_file({k: v + 1 for k, v in big.items()}, tmp_path / "big_ft.safetensors")
        out = mnt / "tv.safetensors"
        assert cli("extract", tmp_path / "x.safetensors", tmp_path / "x.safetensors", "-o", out).returncode == 0
        before = digest(out)
        r = cli("extract", tmp_path / "big_base.safetensors", tmp_path / "big_ft.safetensors", "-o", out, "--force")
        line = one_line(r)
        assert r.returncode != 0 and "no space left" in line and str(out) in line
        assert digest(out) == before
        assert sorted(p.name for p in mnt.iterdir()) == ["tv.safetensors"]
        del small
    finally:
        _umount(mnt)


def test_read_only_folder_and_parent_that_is_a_file(tmp_path: Path, files) -> None:
    cfg = merge_config(files, tmp_path)
    blocker = tmp_path / "afile"
    blocker.write_text("I am a file")
    r = cli("merge", cfg, "-o", blocker / "out")
    assert r.returncode != 0 and "afile" in one_line(r)
    assert blocker.read_text() == "I am a file"
    mnt = _mount(tmp_path, "size=1m,ro")
    if mnt is None:
        ro = tmp_path / "ro"
        ro.mkdir()
        ro.chmod(0o555)
        if os.access(ro, os.W_OK):
            pytest.skip("cannot make a read-only folder here")
        mnt = ro
    try:
        r = cli("merge", cfg, "-o", mnt / "out")
        line = one_line(r)
        assert r.returncode != 0 and str(mnt) in line and "read-only" in line.lower() or "permission" in line.lower()
        assert list(mnt.iterdir()) == []
    finally:
        if mnt.name == "mnt":
            _umount(mnt)


# ---------------------------------------------------------------- no code execution
class Evil:
    def __reduce__(self):  # type: ignore[no-untyped-def]
        return (os.system, (f"touch {EVIL_MARK}",))


EVIL_MARK = Path("/tmp") / f"taskvec-evil-{os.getpid()}"


def test_planted_pickle_in_the_resume_state_is_refused(tmp_path: Path) -> None:
    from taskvec.bench.finetune import finetune
    from taskvec.bench.suite import FinetuneSpec, Split
    from taskvec.errors import CheckpointError

    state = tmp_path / "state.pt"
    torch.save({"model": {}, "opt": Evil(), "sched": {}, "step": 1}, state)
    EVIL_MARK.unlink(missing_ok=True)
    backbone = torch.nn.Linear(4, 4)
    split = Split(torch.randn(8, 4), torch.zeros(8, dtype=torch.long))
    with pytest.raises(CheckpointError, match="refused without loading it"):
        finetune(backbone, torch.nn.Linear(4, 2), split, FinetuneSpec(), seed=0, state_path=state, progress=False)
    assert not EVIL_MARK.exists()
    # what taskvec itself saves still resumes
    from taskvec.bench.finetune import load_state, save_state

    opt = torch.optim.AdamW(backbone.parameters())
    backbone(torch.randn(2, 4)).sum().backward()
    opt.step()
    save_state({"model": backbone.state_dict(), "opt": opt.state_dict(), "sched": {"last_epoch": 1}, "step": 3}, state)
    assert load_state(state)["step"] == 3


def test_no_code_path_unpickles_arbitrary_objects() -> None:
    import re

    root = Path(SRC).parent
    bad = []
    for p in [*(root / "src").rglob("*.py"), *(root / "benchmarks").rglob("*.py")]:
        text = p.read_text()
        for m in re.finditer(r"torch\.load\(([^()]|\([^()]*\))*\)|pickle\.loads?\(|weights_only\s*=\s*False", text):
            call = m.group(0)
            if call.startswith("torch.load") and "weights_only=True" in call:
                continue
            bad.append(f"{p.relative_to(root)}: {call[:60]}")
    assert bad == []


def test_sharded_bases_are_verified_file_by_file(tmp_path: Path, files) -> None:
    tvs = []
    for i in range(2):
        tvs.append(tmp_path / f"tv{i}.safetensors")
        assert (
            runner.invoke(app, ["extract", str(files["base"]), str(files[f"ft{i}"]), "-o", str(tvs[-1])]).exit_code == 0
        )
    bank = tmp_path / "bank"
    r = runner.invoke(
        app, ["bases", "build", *map(str, tvs), "-o", str(bank), "--method", "pca", "--m", "2", "--shard-size", "1KB"]
    )
    assert r.exit_code == 0, r.output
    shards = sorted((bank / "basis-001").glob("*.safetensors"))
    assert len(shards) > 1
    assert runner.invoke(app, ["bases", "verify", str(bank)]).exit_code == 0
    flip_byte(shards[-1])
    r = cli("bases", "verify", bank)
    assert r.returncode != 0 and "basis-001" in one_line(r)
    # a shard replaced by a link to a file outside the bank: refused as corrupt before anything is read
    outside = tmp_path / "outside.safetensors"
    shutil.copy(shards[0], outside)
    shards[0].unlink()
    shards[0].symlink_to(outside)
    r = cli("bases", "info", bank)
    assert r.returncode != 0 and "outside the bank" in one_line(r)


def test_force_replaces_a_folder_with_the_base_model_files_taskvec_copied(tmp_path: Path, files) -> None:
    base = tmp_path / "hfbase"
    base.mkdir()
    shutil.copy(files["base"], base / "model.safetensors")
    (base / "config.json").write_text(json.dumps({"model_type": "bert", "torch_dtype": "float32"}))
    (base / "tokenizer_config.json").write_text("{}")
    cfg = tmp_path / "hf.yaml"
    cfg.write_text(f"method: task_arithmetic\nbase: {base}\nmodels:\n  - finetuned: {files['ft0']}\n")
    out = tmp_path / "merged"
    r = runner.invoke(app, ["merge", str(cfg), "-o", str(out)])
    assert r.exit_code == 0, r.output
    assert {"config.json", "tokenizer_config.json"} <= {p.name for p in out.iterdir()}
    r = runner.invoke(app, ["merge", str(cfg), "-o", str(out), "--force"])
    assert r.exit_code == 0, r.output
    (out / "notes.txt").write_text("mine")
    r = runner.invoke(app, ["merge", str(cfg), "-o", str(out), "--force"])
    assert r.exit_code != 0 and (out / "notes.txt").read_text() == "mine"


def test_compose_predict_and_export_refuse_user_files_before_any_work(tmp_path: Path) -> None:
    # the output rule is checked before the composer or its suite is read: a composer folder that
    # does not exist is never reached, and the user's files keep their bytes
    notes = tmp_path / "notes.jsonl"
    notes.write_text('{"mine": 1}\n')
    inputs = tmp_path / "new.csv"
    inputs.write_text("text\nhello\n")
    before = {p: p.read_bytes() for p in (notes, inputs)}
    missing = tmp_path / "no-composer"
    r = cli("compose", "predict", missing, inputs, "--task", "t", "-o", notes, "--force")
    assert r.returncode == 2 and "notes.jsonl: is a file that taskvec did not write" in one_line(r)
    r = cli("compose", "predict", missing, inputs, "--task", "t", "-o", inputs, "--force")
    assert r.returncode == 2 and "is (or contains, or lies inside) the input" in one_line(r)
    folder = tmp_path / "mine"
    folder.mkdir()
    (folder / "keep.txt").write_text("keep")
    r = cli("compose", "export", missing, "--task", "t", "-o", folder, "--force")
    assert r.returncode == 2 and "mine: is a folder that taskvec did not write" in one_line(r)
    assert {p: p.read_bytes() for p in (notes, inputs)} == before
    assert (folder / "keep.txt").read_text() == "keep"
