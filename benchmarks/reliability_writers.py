"""Faults while writing, tried through the real `taskvec` CLI: what the user sees, and what is lost.

Each case in `CASES` takes an empty folder, sets up one fault, runs `python -m taskvec ...` in a
fresh process and returns (fault tried, what the user sees, what was lost). "What was lost" is
measured: the sha256 of every input and previous output before and after, never assumed.

    python benchmarks/reliability_writers.py          # prints the markdown table
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

ENV = {**os.environ, "COLUMNS": "1000"}
TMP_PREFIX = re.compile(re.escape(tempfile.gettempdir()) + r"/(?:taskvec-reliability|tv-rel)-[^/]+/")
Result = tuple[str, str, str]


# ---------------------------------------------------------------- helpers
def taskvec(
    *args: object, cwd: Path | None = None, wait: bool = True
) -> subprocess.CompletedProcess[str] | subprocess.Popen[str]:
    cmd = [sys.executable, "-m", "taskvec", *map(str, args)]
    if not wait:
        return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV, cwd=cwd)
    return subprocess.run(cmd, check=False, capture_output=True, text=True, env=ENV, cwd=cwd, timeout=600)


def seen(code: int, stderr: str) -> str:
    """Exit code and first stderr line, with the case's temporary folder left out of paths."""
    stderr = TMP_PREFIX.sub("", stderr)
    lines = [ln.strip() for ln in stderr.splitlines() if ln.strip()]
    first = lines[0] if lines else "(nothing on stderr)"
    extra = f" (+{len(lines) - 1} more lines)" if len(lines) > 1 else ""
    return f"exit {code}: `{first[:300]}`{extra}"


def snapshot(*paths: Path) -> dict[str, str]:
    """sha256 of every file under `paths`."""
    out = {}
    for root in paths:
        files = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file()) if root.exists() else []
        for p in files:
            out[str(p)] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def lost(before: dict[str, str], after: dict[str, str], what: str = "input files and previous output") -> str:
    gone = [p for p in before if p not in after]
    changed = [p for p in before if p in after and after[p] != before[p]]
    if not gone and not changed:
        return f"nothing: {what} intact ({len(before)} files, sha256 equal)"
    return "LOST: " + ", ".join(
        [*(f"{Path(p).name} deleted" for p in gone), *(f"{Path(p).name} changed" for p in changed)]
    )


def leftovers(folder: Path, keep: set[str]) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name not in keep)


def small_models(d: Path, n: int = 3) -> dict[str, Path]:
    g = torch.Generator().manual_seed(0)
    base = {
        "embed.weight": torch.randn(50, 8, generator=g),
        "mlp.weight": torch.randn(16, 8, generator=g),
        "head.weight": torch.randn(3, 8, generator=g),
    }
    paths = {"base": d / "base.safetensors"}
    save_file(base, paths["base"])
    for i in range(n):
        paths[f"ft{i}"] = d / f"ft{i}.safetensors"
        save_file({k: v + 0.05 * torch.randn(v.shape, generator=g) for k, v in base.items()}, paths[f"ft{i}"])
    return paths


def large_models(d: Path, params: int = 24 * 2**20) -> dict[str, Path]:
    """A base and two fine-tuned models of `params` float32 parameters each (96 MiB per file)."""
    rows = params // 4096
    paths = {"base": d / "base.safetensors"}
    g = torch.Generator().manual_seed(0)
    base = {f"layer{i}.weight": torch.randn(rows // 8, 4096, generator=g) for i in range(8)}
    save_file(base, paths["base"])
    for j in range(2):
        paths[f"ft{j}"] = d / f"ft{j}.safetensors"
        save_file({k: v + 0.01 for k, v in base.items()}, paths[f"ft{j}"])
    return paths


def config(d: Path, m: dict[str, Path], name: str = "merge.yaml") -> Path:
    p = d / name
    models = f"  - finetuned: {m['ft0']}\n  - finetuned: {m['ft1']}\n"
    p.write_text(f"method: task_arithmetic\nbase: {m['base']}\nmodels:\n{models}scale: 0.5\n")
    return p


def bank(d: Path) -> tuple[Path, dict[str, Path]]:
    m = small_models(d)
    tvs = {}
    for i in range(3):
        tvs[f"tv{i}"] = d / f"tv{i}.safetensors"
        r = taskvec("extract", m["base"], m[f"ft{i}"], "-o", tvs[f"tv{i}"])
        assert r.returncode == 0, r.stderr
    b = d / "bank"
    r = taskvec("bases", "build", tvs["tv0"], tvs["tv1"], tvs["tv2"], "-o", b, "--method", "pca", "--m", "2")
    assert r.returncode == 0, r.stderr
    return b, tvs


# ---------------------------------------------------------------- cases
def _force_on_folder(d: Path, config_inside: bool, fault: str, what: str) -> Result:
    """`merge -o DIR --force` on a folder holding a model and notes (and, if `config_inside`, the config)."""
    m = small_models(d)
    user = d / "my-project"
    user.mkdir()
    (user / "notes.md").write_text("months of work")
    shutil.copy(m["ft0"], user / "model.safetensors")
    cfg = config(user if config_inside else d, m)
    before = snapshot(d)
    r = taskvec("merge", cfg, "-o", user, "--force")
    return fault, seen(r.returncode, r.stderr), lost(before, snapshot(d), what)


def force_on_user_folder(d: Path) -> Result:
    fault = "`merge -o DIR --force` where DIR is a user folder (notes, a model, the config)"
    return _force_on_folder(d, True, fault, "the folder and every file in it")


def force_on_foreign_output(d: Path) -> Result:
    fault = "`merge -o DIR --force` where DIR is a folder another tool wrote (a model, notes)"
    return _force_on_folder(d, False, fault, "the folder and the inputs")


def force_on_working_folder(d: Path) -> Result:
    m = small_models(d)
    cfg = config(d, m)
    before = snapshot(d)
    r = taskvec("merge", cfg, "-o", ".", "--force", cwd=d)
    return (
        "`merge -o . --force` in a folder holding the inputs",
        seen(r.returncode, r.stderr),
        lost(before, snapshot(d)),
    )


def output_is_input(d: Path) -> Result:
    m = small_models(d)
    merged = d / "merged.safetensors"
    assert taskvec("merge", config(d, m), "-o", merged).returncode == 0
    cfg = d / "again.yaml"
    cfg.write_text(f"method: task_arithmetic\nbase: {merged}\nmodels:\n  - finetuned: {m['ft2']}\n")
    before = snapshot(d)
    r = taskvec("merge", cfg, "-o", merged, "--force")
    return (
        "`merge -o BASE --force`: the output is the base the merge reads",
        seen(r.returncode, r.stderr),
        lost(before, snapshot(d)),
    )


def _kill_mid_write(d: Path) -> tuple[subprocess.Popen[str], Path, dict[str, str], float]:
    m = large_models(d)
    out = d / "merged"
    cfg = config(d, m)
    r = taskvec("merge", cfg, "-o", out)  # a previous output that the killed run was replacing
    assert r.returncode == 0, r.stderr
    before = snapshot(d)
    p = taskvec("merge", cfg, "-o", out, "--force", wait=False)
    assert isinstance(p, subprocess.Popen)
    partial = d / f".merged.partial-{p.pid}"
    t0 = time.perf_counter()
    while p.poll() is None and not (
        partial.is_dir() and sum(f.stat().st_size for f in partial.rglob("*") if f.is_file()) > 2**20
    ):
        time.sleep(0.01)
    elapsed = time.perf_counter() - t0
    p.send_signal(signal.SIGKILL)
    p.wait()
    return p, out, before, elapsed


def kill_mid_write(d: Path) -> Result:
    p, out, before, elapsed = _kill_mid_write(d)
    after_kill = snapshot(d)
    left = [n for n in leftovers(d, {Path(k).name for k in before} | {"merged"}) if "partial" in n]
    r = taskvec("merge", d / "merge.yaml", "-o", out, "--force")  # the next run cleans up and writes
    cleaned = not any("partial" in n for n in leftovers(d, set()))
    what = (
        f"killed after {elapsed:.1f} s of writing: {p.returncode} (SIGKILL); it left {', '.join(left) or 'nothing'}; "
        f"the next `merge --force` exits {r.returncode} and {'removed it' if cleaned else 'did NOT remove it'}"
    )
    return (
        "`kill -9` of `merge --force` mid-write (3 x 96 MiB models, previous output present)",
        what,
        lost(before, {k: v for k, v in after_kill.items() if k in before}),
    )


def concurrent_merges(d: Path) -> Result:
    m = large_models(d)
    out = d / "merged"
    cfg = config(d, m)
    before = snapshot(d)
    ps = [taskvec("merge", cfg, "-o", out, wait=False) for _ in range(2)]
    res = []
    for p in ps:
        assert isinstance(p, subprocess.Popen)
        _, err = p.communicate(timeout=600)
        res.append((p.returncode, err))
    codes = sorted(c for c, _ in res)
    loser = next((seen(c, e) for c, e in res if c != 0), "both exited 0")
    ok = "one wins, one fails" if codes[0] == 0 and codes[1] != 0 else f"exit codes {codes}"
    after = snapshot(d)
    written = load_file(out / "model.safetensors") if (out / "model.safetensors").exists() else {}
    return (
        "two `merge` to one output at once (real processes)",
        f"{ok}; the loser: {loser}; output has {len(written)} tensors",
        lost(before, after, "input files"),
    )


def disk_full(d: Path) -> Result:
    mnt = d / "small-disk"
    mnt.mkdir()
    if (
        os.geteuid() != 0
        or subprocess.run(
            ["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(mnt)], check=False, capture_output=True
        ).returncode
    ):
        return "disk full (256 KiB tmpfs)", "not run: mounting a tmpfs needs root", "-"
    try:
        g = torch.Generator().manual_seed(0)
        big = {f"t{i}": torch.randn(128, 128, generator=g) for i in range(8)}  # 512 KiB
        save_file(big, d / "base.safetensors")
        save_file({k: v + 1 for k, v in big.items()}, d / "ft.safetensors")
        save_file({"t0": torch.zeros(4)}, d / "small.safetensors")
        out = mnt / "tv.safetensors"
        assert taskvec("extract", d / "small.safetensors", d / "small.safetensors", "-o", out).returncode == 0
        before = snapshot(d)
        r = taskvec("extract", d / "base.safetensors", d / "ft.safetensors", "-o", out, "--force")
        extra = leftovers(mnt, {"tv.safetensors"})
        return (
            "disk full while replacing an output (256 KiB tmpfs, 512 KiB task vector)",
            seen(r.returncode, r.stderr),
            lost(before, snapshot(d)) + ("" if not extra else f"; left behind: {extra}"),
        )
    finally:
        subprocess.run(["umount", str(mnt)], check=False)


def read_only_folder(d: Path) -> Result:
    m = small_models(d)
    mnt = d / "ro"
    mnt.mkdir()
    if os.geteuid() == 0:
        if subprocess.run(
            ["mount", "-t", "tmpfs", "-o", "size=1m,ro", "tmpfs", str(mnt)], check=False, capture_output=True
        ).returncode:
            return "read-only output folder", "not run: cannot mount a read-only tmpfs", "-"
    else:
        mnt.chmod(0o555)
    try:
        before = snapshot(d)
        r = taskvec("merge", config(d, m), "-o", mnt / "merged")
        return (
            "output folder is read-only",
            seen(r.returncode, r.stderr),
            lost(before, snapshot(d)) + ("" if not list(mnt.iterdir()) else "; left files behind"),
        )
    finally:
        if os.geteuid() == 0:
            subprocess.run(["umount", str(mnt)], check=False)


def parent_is_a_file(d: Path) -> Result:
    m = small_models(d)
    (d / "runs").write_text("a file, not a folder")
    before = snapshot(d)
    r = taskvec("merge", config(d, m), "-o", d / "runs" / "merged")
    return "output's parent is a file", seen(r.returncode, r.stderr), lost(before, snapshot(d))


def stale_partial(d: Path) -> Result:
    m = small_models(d)
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    stale = d / f".merged.partial-{p.pid}"
    stale.mkdir()
    (stale / "model.safetensors").write_bytes(b"half written")
    (d / ".merged.lock").write_text(f"{p.pid}\n")  # what the killed writer leaves: its lock, naming it
    (d / f".notes.partial-{p.pid}").write_text("not beside this output: kept")
    before = snapshot(
        d / "base.safetensors", d / "ft0.safetensors", d / "ft1.safetensors", d / f".notes.partial-{p.pid}"
    )
    r = taskvec("merge", config(d, m), "-o", d / "merged")
    return (
        "a stale `.merged.partial-PID` of a dead process beside the output",
        seen(r.returncode, r.stderr)
        + ("; the stale temporary was removed" if not stale.exists() else "; the stale temporary is STILL there"),
        lost(
            before,
            snapshot(
                d / "base.safetensors", d / "ft0.safetensors", d / "ft1.safetensors", d / f".notes.partial-{p.pid}"
            ),
            "inputs and other hidden files",
        ),
    )


def _bank_fault(d: Path, fault: str) -> Result:
    b, _ = bank(d)
    b0, b1 = b / "basis-000.safetensors", b / "basis-001.safetensors"
    mpath = b / "manifest.json"
    if fault == "flip":
        data = bytearray(b0.read_bytes())
        data[-5] ^= 0x10
        b0.write_bytes(bytes(data))
        what = "bank: one flipped bit in a basis file"
    elif fault == "swap":
        b0.rename(b / "tmp")
        b1.rename(b0)
        (b / "tmp").rename(b1)
        what = "bank: two basis files swapped"
    else:
        mf = json.loads(mpath.read_text())
        mf["dtype"] = "float16" if mf["dtype"] != "float16" else "float32"
        mpath.write_text(json.dumps(mf))
        what = "bank: `dtype` edited in the manifest"
    before = snapshot(d)
    r = taskvec("bases", "compose", b, "-o", d / "composed.safetensors", "--add", "tv0,tv1")
    v = taskvec("bases", "verify", b)
    return (
        what,
        f"compose {seen(r.returncode, r.stderr)}; verify exit {v.returncode}",
        lost(before, snapshot(d), "bank and inputs")
        + ("" if not (d / "composed.safetensors").exists() else "; a composed model WAS written"),
    )


def bank_flipped_byte(d: Path) -> Result:
    return _bank_fault(d, "flip")


def bank_swapped_files(d: Path) -> Result:
    return _bank_fault(d, "swap")


def bank_edited_dtype(d: Path) -> Result:
    return _bank_fault(d, "dtype")


def manifest_path_escape(d: Path) -> Result:
    b, tvs = bank(d)
    victim = d / "victim"
    victim.mkdir()
    (victim / "thesis.tex").write_text("years of work")
    mf = json.loads((b / "manifest.json").read_text())
    mf["bases"][0]["file"] = "../victim"
    (b / "manifest.json").write_text(json.dumps(mf))
    before = snapshot(d)
    r = taskvec("bases", "add", b, tvs["tv2"], "--name", "again")
    return (
        "bank manifest names `../victim` as a basis file, then `bases add`",
        seen(r.returncode, r.stderr),
        lost(before, snapshot(d), "the folder outside the bank, the bank"),
    )


def concurrent_bases_add(d: Path) -> Result:
    b, _ = bank(d)
    (d / "more").mkdir()
    m = small_models(d / "more")
    extra = []
    for i in range(2):
        extra.append(d / f"new{i}.safetensors")
        assert taskvec("extract", m["base"], m[f"ft{i}"], "-o", extra[-1]).returncode == 0
    ps = [taskvec("bases", "add", b, e, wait=False) for e in extra]
    res = []
    for p in ps:
        assert isinstance(p, subprocess.Popen)
        _, err = p.communicate(timeout=600)
        res.append((p.returncode, err))
    names = json.loads((b / "manifest.json").read_text())["names"]
    v = taskvec("bases", "verify", b)
    codes = [c for c, _ in res]
    loser = next((seen(c, e) for c, e in res if c != 0), "")
    ok = all((c == 0) == (f"new{i}" in names) for i, c in enumerate(codes))
    return (
        "two `bases add` on one bank at once",
        f"exit codes {codes}{'; the loser: ' + loser if loser else ''}; bank verify exit {v.returncode}",
        "nothing: every add that exited 0 is in the manifest, the bank verifies"
        if ok and v.returncode == 0
        else f"LOST: manifest names {names}, verify exit {v.returncode}",
    )


def malicious_pickle(d: Path) -> Result:
    """A resume state planted in the benchmark cache, loaded by the fine-tuning loop."""
    mark = d / "pwned"
    state = d / "cache" / "state.pt"
    state.parent.mkdir()
    code = (
        f"import torch, os\nclass E:\n    def __reduce__(self):\n        return (os.system, ('touch {mark}',))\n"
        f"torch.save({{'model': {{}}, 'opt': E(), 'sched': {{}}, 'step': 1}}, {str(state)!r})\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, env=ENV)
    run = (
        f"import torch, sys\nfrom pathlib import Path\nfrom taskvec.bench.finetune import finetune\n"
        f"from taskvec.bench.suites import FinetuneSpec, Split\nfrom taskvec.errors import TaskVecError\n"
        f"try:\n    finetune(torch.nn.Linear(4, 4), torch.nn.Linear(4, 2),"
        " Split(torch.randn(8, 4), torch.zeros(8, dtype=torch.long)), FinetuneSpec(), seed=0, "
        f"state_path=Path({str(state)!r}), progress=False)\nexcept TaskVecError as e:\n    print(f'error: {{e}}', "
        "file=sys.stderr); sys.exit(2)\n"
    )
    before = snapshot(d)
    r = subprocess.run([sys.executable, "-c", run], check=False, capture_output=True, text=True, env=ENV)
    return (
        "a pickle that runs a shell command, planted as the fine-tuning resume state (`bench` cache)",
        seen(r.returncode, r.stderr) + ("; the command did NOT run" if not mark.exists() else "; THE COMMAND RAN"),
        lost(before, snapshot(d), "cache and files"),
    )


CASES: list[Callable[[Path], Result]] = [
    force_on_user_folder,
    force_on_foreign_output,
    force_on_working_folder,
    output_is_input,
    kill_mid_write,
    concurrent_merges,
    disk_full,
    read_only_folder,
    parent_is_a_file,
    stale_partial,
    bank_flipped_byte,
    bank_swapped_files,
    bank_edited_dtype,
    manifest_path_escape,
    concurrent_bases_add,
    malicious_pickle,
]


def table(cases: list[Callable[[Path], Result]] = CASES) -> str:
    rows = ["| fault tried | what the user sees | what was lost |", "|---|---|---|"]
    for case in cases:
        with tempfile.TemporaryDirectory(prefix="tv-rel-") as tmp:
            try:
                fault, what, gone = case(Path(tmp))
            except Exception as e:  # noqa: BLE001 -- a case that cannot even be set up is reported, not hidden
                fault, what, gone = case.__name__, f"case failed to run: {type(e).__name__}: {e}", "?"
        rows.append(f"| {fault} | {what.replace('|', '/')} | {gone} |")
    return "\n".join(rows)


if __name__ == "__main__":
    print(table())
