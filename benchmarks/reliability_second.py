"""The second hostile trial, through the real `taskvec` CLI: lock files planted as links, an output
that is its own input, plots, leftovers, stale bank sources, overflow, strict parsing, non-regular
inputs. Each case sets up one fault in an empty folder, runs `python -m taskvec ...` in a fresh
process and measures what was lost (sha256 of every file before and after); `reliability.py`
next to this script adds these rows to docs/reliability.md.

    python benchmarks/reliability_second.py     # prints the rows
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from reliability import cli, digest, loss, models, run_case, shown  # type: ignore[import-not-found]

Result = tuple[str, str, str]


def _tvs(d: Path, n: int = 3) -> None:
    models(d)
    for i in range(n):
        ft = d / f"ft{i}.safetensors"
        if not ft.exists():
            t = load_file(d / "ft0.safetensors")
            save_file({k: v * (1 + 0.3 * i) if v.is_floating_point() else v for k, v in t.items()}, ft)
        cli(d, "extract", "base.safetensors", f"ft{i}.safetensors", "-o", f"tv{i}.safetensors")


def _config(d: Path) -> None:
    (d / "merge.yaml").write_text(
        "method: task_arithmetic\nbase: base.safetensors\nmodels:\n"
        "  - {finetuned: ft0.safetensors}\n  - {finetuned: ft1.safetensors}\n"
    )


def _bank(d: Path, *extra: str) -> None:
    _tvs(d)
    code, _, err = cli(d, "bases", "build", "tv0.safetensors", "tv1.safetensors", "-o", "bank", "--m", "1", *extra)
    assert code == 0, err


def simple(fault: str, setup: Callable[[Path], object], *args: object, **kw: object) -> Callable[[Path], Result]:
    """A case: `setup(d)`, then `taskvec ARGS` in `d`; what the user sees and what was lost."""

    def case(d: Path) -> Result:
        setup(d)
        seen, lost, _ = run_case(d, *args, **kw)  # type: ignore[arg-type]
        return fault, seen, lost

    case.__name__ = fault
    return case


# ---------------------------------------------------------------- setups
def lock_symlink(d: Path) -> None:
    models(d)
    _config(d)
    (d / ".out.safetensors.lock").symlink_to("base.safetensors")


def lock_hardlink(d: Path) -> None:
    models(d)
    _config(d)
    os.link(d / "base.safetensors", d / ".out.safetensors.lock")


def bank_lock_symlink(d: Path) -> None:
    _bank(d)
    (d / ".bank.lock").symlink_to("tv2.safetensors")


def png_data_folder(d: Path) -> None:
    (d / "data").mkdir()
    _tvs(d / "data", 2)
    (d / "data" / "notes.md").write_text("months of notes")


def png_user_file(d: Path) -> None:
    _tvs(d, 2)
    (d / "photo.png").write_bytes(b"\x89PNG the user's own picture")


def sharded_bank_with_notes(d: Path) -> None:
    _bank(d, "--shard-size", "600B")
    (d / "bank" / "basis-000" / "my_notes.txt").write_text("mine")


def bank_with_lookalikes(d: Path) -> None:
    _bank(d)
    (d / "bank" / "basis-007.safetensors").write_bytes((d / "tv0.safetensors").read_bytes())
    (d / "bank" / "basis-000.r9.safetensors").write_bytes(b"the user's")


def partial_lookalike(d: Path) -> None:
    models(d)
    _config(d)
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    (d / f".mrg.partial-{p.pid}").mkdir()
    (d / f".mrg.partial-{p.pid}" / "notes.md").write_text("kept for years")


def bank_source_replaced(d: Path) -> None:
    _bank(d)
    (d / "tv0.safetensors").write_bytes((d / "tv2.safetensors").read_bytes())


def overflow_models(d: Path) -> None:
    save_file({"w": torch.zeros(4, 4)}, d / "base.safetensors")
    for i in range(2):
        save_file({"w": torch.full((4, 4), 3e38)}, d / f"ft{i}.safetensors")
    _config(d)


def big_tv(d: Path) -> None:
    save_file({"w": torch.ones(3, 3)}, d / "base.safetensors")
    save_file({"w": torch.full((3, 3), 10.0)}, d / "tv.safetensors")


def yaml_text(text: str | bytes) -> Callable[[Path], None]:
    def setup(d: Path) -> None:
        models(d)
        p = d / "merge.yaml"
        p.write_bytes(text if isinstance(text, bytes) else text.encode())

    return setup


def adapter(config: dict, tensors: object = None, bin_file: bool = False) -> Callable[[Path], None]:
    def setup(d: Path) -> None:
        (d / "adapter").mkdir()
        (d / "adapter" / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", **config}))
        t = tensors
        if t is None:
            t = {
                "base_model.model.fc.lora_A.weight": torch.ones(2, 8),
                "base_model.model.fc.lora_B.weight": torch.ones(5, 2),
            }
        if bin_file:
            torch.save(t, d / "adapter" / "adapter_model.bin")
        else:
            save_file(t, d / "adapter" / "adapter_model.safetensors")  # type: ignore[arg-type]

    return setup


def deep_header(d: Path) -> None:
    body = ('{"w": ' + "[" * 100_000 + "]" * 100_000 + "}").encode()
    (d / "deep.safetensors").write_bytes(len(body).to_bytes(8, "little") + body)


def deep_index(d: Path) -> None:
    models(d)
    (d / "m").mkdir()
    (d / "m" / "a.safetensors").write_bytes((d / "ft0.safetensors").read_bytes())
    (d / "m" / "model.safetensors.index.json").write_text('{"weight_map": ' + "[" * 100_000 + "]" * 100_000 + "}")


def deep_manifest(d: Path) -> None:
    _bank(d)
    text = (d / "bank" / "manifest.json").read_text()
    deep = "[" * 100_000 + "]" * 100_000
    (d / "bank" / "manifest.json").write_text(text.replace('"info": {', '"info": {"deep": ' + deep + ", ", 1))


def fp8(d: Path) -> None:
    models(d)
    for name in ("base", "ft0"):
        t = load_file(d / f"{name}.safetensors")
        save_file(
            {k: v.to(torch.float8_e4m3fn) if v.is_floating_point() else v for k, v in t.items()},
            d / f"{name}8.safetensors",
        )
    (d / "merge8.yaml").write_text("method: ties\nbase: base8.safetensors\nmodels:\n  - finetuned: ft08.safetensors\n")


def inputs_file(name: str, raw: bytes | Callable[[Path], None]) -> Callable[[Path], None]:
    def setup(d: Path) -> None:
        if callable(raw):
            raw(d / name)
        else:
            (d / name).write_bytes(raw)

    return setup


def fifo(d: Path) -> None:
    models(d)
    os.mkfifo(d / "ft.safetensors")


def urandom(d: Path) -> None:
    models(d)
    (d / "ft.safetensors").symlink_to("/dev/urandom")


def suite_not_callable(d: Path) -> None:
    (d / "suite.yaml").write_text(
        'name: s\nbackbone: {factory: "os:sep", images: {size: 8}}\ntasks:\n'
        "  - name: a\n    data: {kind: csv, path: a.csv}\n    split: {train: 1, val: 1, test: 1}\n"
    )


# ---------------------------------------------------------------- cases that need more than one command
def disk_full_bank_add(d: Path) -> Result:
    """ENOSPC injected where `bases add` writes its new manifest (the new basis file was written)."""
    _bank(d)
    before = digest(d)
    code = (
        "import errno, pathlib, sys\n"
        "real = pathlib.Path.write_text\n"
        "def full(self, *a, **k):\n"
        "    if self.name.startswith('.manifest.json.partial-'):\n"
        "        raise OSError(errno.ENOSPC, 'No space left on device', str(self))\n"
        "    return real(self, *a, **k)\n"
        "pathlib.Path.write_text = full\n"
        "from taskvec.cli import app\n"
        "sys.argv = ['taskvec', 'bases', 'add', 'bank', 'tv2.safetensors']\n"
        "app()\n"
    )
    p = subprocess.run([sys.executable, "-c", code], cwd=d, capture_output=True, text=True, check=False)
    seen = shown(p.returncode, p.stdout, p.stderr, d)
    lost = loss(before, digest(d))
    c2, _, e2 = cli(d, "bases", "build", "tv0.safetensors", "tv1.safetensors", "-o", "bank", "--m", "1", "--force")
    return (
        "disk full while `bases add` writes the manifest",
        seen + f"; the next `bases build --force` exits {c2}",
        lost,
    )


def add_beside_lookalikes(d: Path) -> Result:
    bank_with_lookalikes(d)
    mine = [d / "bank" / "basis-007.safetensors", d / "bank" / "basis-000.r9.safetensors"]
    before = {str(p): digest(p.parent)[p.name] for p in mine}
    code, out, err = cli(d, "bases", "add", "bank", "tv2.safetensors")
    after = {str(p): digest(p.parent).get(p.name) for p in mine}
    cv, _, _ = cli(d, "bases", "verify", "bank")
    kept = after == before
    return (
        "`bases add` beside user files `basis-007.safetensors`, `basis-000.r9.safetensors`",
        shown(code, out, err, d, grep="added") + f"; `bases verify` exit {cv}",
        ("nothing: the user's look-alike files intact (sha256 equal)" if kept else "LOST: a user file was removed"),
    )


def changed_source(d: Path) -> Result:
    bank_source_replaced(d)
    before = digest(d)
    cv, out, err = cli(d, "bases", "verify", "bank")
    seen, lost, _ = run_case(d, "bases", "add", "bank", "tv1.safetensors", "--name", "again")
    warn = next((ln.strip() for ln in err.splitlines() if "warning" in ln), "(no warning)")
    return (
        "`bases add` after a member's source file was replaced by another task",
        f"{seen}; `bases verify` exit {cv}: `{warn[:200]}`",
        loss(before, digest(d)),
    )


def npz_object(p: Path) -> None:
    np.savez(p, x=np.array([{"a": 1}, None], dtype=object))


CASES: list[Callable[[Path], Result]] = [
    simple(
        "lock file `.out.safetensors.lock` is a symbolic link to the base",
        lock_symlink,
        "merge",
        "merge.yaml",
        "-o",
        "out.safetensors",
    ),
    simple("lock file is a hard link to the base", lock_hardlink, "merge", "merge.yaml", "-o", "out.safetensors"),
    simple(
        "`.bank.lock` is a symbolic link, then `bases add`",
        bank_lock_symlink,
        "bases",
        "add",
        "bank",
        "tv2.safetensors",
    ),
    simple(
        "`compress tv -o tv --force` (its own input)",
        lambda d: _tvs(d, 1),
        "compress",
        "tv0.safetensors",
        "-o",
        "tv0.safetensors",
        "--rank",
        "1",
        "--force",
    ),
    simple(
        "`compress tv -o ./tv --force`",
        lambda d: _tvs(d, 1),
        "compress",
        "tv0.safetensors",
        "-o",
        "./tv0.safetensors",
        "--rank",
        "1",
        "--force",
    ),
    simple(
        "`similarity --png data --force`: data/ holds the inputs and notes",
        png_data_folder,
        "similarity",
        "data/tv0.safetensors",
        "data/tv1.safetensors",
        "--png",
        "data",
        "--force",
    ),
    simple(
        "`similarity --png photo.png --force` onto a user's picture",
        png_user_file,
        "similarity",
        "tv0.safetensors",
        "tv1.safetensors",
        "--png",
        "photo.png",
        "--force",
    ),
    simple(
        "`similarity --png cos.bmpx` (unknown format)",
        lambda d: _tvs(d, 2),
        "similarity",
        "tv0.safetensors",
        "tv1.safetensors",
        "--png",
        "cos.bmpx",
    ),
    simple(
        "`bases build --force` over a bank with a user file inside a sharded basis",
        sharded_bank_with_notes,
        "bases",
        "build",
        "tv0.safetensors",
        "tv1.safetensors",
        "-o",
        "bank",
        "--m",
        "1",
        "--force",
    ),
    add_beside_lookalikes,
    simple(
        "a user folder `.mrg.partial-PID/` of a dead PID beside `merge -o mrg`",
        partial_lookalike,
        "merge",
        "merge.yaml",
        "-o",
        "mrg",
        grep="merged",
        outputs=("mrg",),
    ),
    disk_full_bank_add,
    changed_source,
    simple(
        "a merge of finite inputs near 3e38 that overflows float32",
        overflow_models,
        "merge",
        "merge.yaml",
        "-o",
        "out.safetensors",
    ),
    simple(
        "`apply --coef 1e38` that overflows float32",
        big_tv,
        "apply",
        "base.safetensors",
        "tv.safetensors",
        "-o",
        "out.safetensors",
        "--coef",
        "1e38",
    ),
    simple(
        "`apply --coef 1e39`",
        big_tv,
        "apply",
        "base.safetensors",
        "tv.safetensors",
        "-o",
        "out.safetensors",
        "--coef",
        "1e39",
    ),
    simple(
        "`bases compose --coef 1e39`",
        _bank,
        "bases",
        "compose",
        "bank",
        "--add",
        "tv0",
        "-o",
        "out.safetensors",
        "--coef",
        "1e39",
    ),
    simple(
        "merge config with `method:` twice",
        yaml_text(
            "method: task_arithmetic\nmethod: ties\nbase: base.safetensors\nmodels:\n  - finetuned: ft0.safetensors\n"
        ),
        "merge",
        "merge.yaml",
        "-o",
        "out",
    ),
    simple(
        "merge config `weight: true`",
        yaml_text("method: ties\nbase: base.safetensors\nmodels:\n  - {finetuned: ft0.safetensors, weight: true}\n"),
        "merge",
        "merge.yaml",
        "-o",
        "out",
    ),
    simple(
        "merge config that is not UTF-8",
        yaml_text(b"method: ties\nbase: caf\xe9.safetensors\n"),
        "merge",
        "merge.yaml",
        "-o",
        "out",
    ),
    simple(
        "suite YAML that is not UTF-8",
        inputs_file("suite.yaml", b"name: caf\xe9\n"),
        "bench",
        "run",
        "suite.yaml",
        "-o",
        "out",
    ),
    simple(
        "a suite whose backbone factory is not callable (`os:sep`)",
        suite_not_callable,
        "bench",
        "run",
        "suite.yaml",
        "-o",
        "out",
        "--cache",
        "cache",
    ),
    simple("`info --top -1`", models, "info", "base.safetensors", "--top", "-1"),
    simple('LoRA config with `r: "2"` (a string)', adapter({"r": "2", "lora_alpha": 4}), "info", "adapter"),
    simple('LoRA config with `lora_alpha: "4"`', adapter({"r": 2, "lora_alpha": "4"}), "info", "adapter"),
    simple(
        "LoRA `rank_pattern` key `fc(`",
        adapter({"r": 2, "lora_alpha": 4, "rank_pattern": {"fc(": 2}}),
        "info",
        "adapter",
    ),
    simple(
        "LoRA `alpha_pattern` given as a list",
        adapter({"r": 2, "lora_alpha": 4, "alpha_pattern": [["fc", 2]]}),
        "info",
        "adapter",
    ),
    simple(
        "int32 LoRA weights",
        adapter(
            {"r": 2, "lora_alpha": 4},
            {
                "base_model.model.fc.lora_A.weight": torch.ones(2, 8, dtype=torch.int32),
                "base_model.model.fc.lora_B.weight": torch.ones(5, 2, dtype=torch.int32),
            },
        ),
        "info",
        "adapter",
    ),
    simple(
        "adapter `.bin` holding a list",
        adapter({"r": 2, "lora_alpha": 4}, [torch.ones(2)], bin_file=True),
        "info",
        "adapter",
    ),
    simple("safetensors header nested 100,000 levels deep", deep_header, "info", "deep.safetensors"),
    simple(
        "shard index nested 100,000 levels deep", deep_index, "extract", "base.safetensors", "m", "-o", "tv.safetensors"
    ),
    simple("bank manifest nested 100,000 levels deep", deep_manifest, "bases", "verify", "bank"),
    simple(
        "fp8 (float8_e4m3fn) checkpoints to `extract`",
        fp8,
        "extract",
        "base8.safetensors",
        "ft08.safetensors",
        "-o",
        "tv8.safetensors",
        grep="wrote",
        outputs=("tv8.safetensors",),
    ),
    simple(
        "fp8 checkpoints to `merge`",
        fp8,
        "merge",
        "merge8.yaml",
        "-o",
        "m8.safetensors",
        grep="merged",
        outputs=("m8.safetensors",),
    ),
    simple(
        "`compose predict` CSV with an unterminated quote",
        inputs_file("in.csv", b'text,label\n"a, b,x\nc,y\n'),
        "compose",
        "predict",
        "composer",
        "in.csv",
        "--task",
        "t",
        "-o",
        "p.jsonl",
    ),
    simple(
        "`compose predict` CSV with a ragged row",
        inputs_file("in.csv", b"text,label\na,x,extra\nc,y\n"),
        "compose",
        "predict",
        "composer",
        "in.csv",
        "--task",
        "t",
        "-o",
        "p.jsonl",
    ),
    simple(
        "`compose predict` CSV that is not UTF-8",
        inputs_file("in.csv", b"text,label\ncaf\xe9,x\n"),
        "compose",
        "predict",
        "composer",
        "in.csv",
        "--task",
        "t",
        "-o",
        "p.jsonl",
    ),
    simple(
        "`compose predict` CSV with a field over 128 KiB",
        inputs_file("in.csv", b"text,label\n" + b"a" * 200_000 + b",x\n"),
        "compose",
        "predict",
        "composer",
        "in.csv",
        "--task",
        "t",
        "-o",
        "p.jsonl",
    ),
    simple(
        "`compose predict` with a corrupt .npz",
        inputs_file("in.npz", b"PK\x03\x04" + b"\0" * 64),
        "compose",
        "predict",
        "composer",
        "in.npz",
        "--task",
        "t",
        "-o",
        "p.jsonl",
    ),
    simple(
        "`compose predict` with an .npz of object arrays",
        inputs_file("in.npz", npz_object),
        "compose",
        "predict",
        "composer",
        "in.npz",
        "--task",
        "t",
        "-o",
        "p.jsonl",
    ),
    simple(
        "a named pipe (FIFO) given as the fine-tuned checkpoint",
        fifo,
        "extract",
        "base.safetensors",
        "ft.safetensors",
        "-o",
        "tv.safetensors",
    ),
    simple(
        "`/dev/urandom` given as the fine-tuned checkpoint",
        urandom,
        "extract",
        "base.safetensors",
        "ft.safetensors",
        "-o",
        "tv.safetensors",
    ),
]


if __name__ == "__main__":
    for c in CASES:
        with tempfile.TemporaryDirectory(prefix="taskvec-reliability-") as tmp:
            print(" | ".join(c(Path(tmp))), flush=True)
