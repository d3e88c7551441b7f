"""Every bad input and fault tried through the real `taskvec` CLI: what the user sees, and what is lost.

Each case takes an empty folder, sets up one bad input, runs `python -m taskvec ...` in a fresh
process and returns (fault tried, what the user sees, what was lost). What was lost is measured:
the sha256 of every file in the folder before and after the command, never assumed. The faults
of the writing side come from `reliability_writers.py` next to this script, and the second
hostile trial (locks planted as links, self-overwrites, plots, leftovers, stale sources, overflow,
strict parsing) from `reliability_second.py`. Run it with the taskvec to check on the path, e.g.
`PYTHONPATH=src python benchmarks/reliability.py`.

    python benchmarks/reliability.py            # writes docs/reliability.md and prints it
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import struct
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

Result = tuple[str, str, str]
OUT = Path(__file__).resolve().parent.parent / "docs" / "reliability.md"
COMMAND = "python benchmarks/reliability.py"


def cli(folder: Path, *args: object) -> tuple[int, str, str]:
    """Run `taskvec ARGS` in `folder`: (exit code, stdout, stderr)."""
    env = {**os.environ, "COLUMNS": "1000"}
    p = subprocess.run(
        [sys.executable, "-m", "taskvec", *map(str, args)],
        cwd=folder,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    return p.returncode, p.stdout, p.stderr


def shown(code: int, out: str, err: str, folder: Path, grep: str | None = None) -> str:
    """The exit code and the line the user reads (the error line, or the stdout line matching `grep`)."""
    lines = [ln.strip() for ln in (err if grep is None else out + err).splitlines() if ln.strip()]
    if grep is not None:
        lines = [ln for ln in lines if grep in ln] or lines
    else:
        lines = [ln for ln in lines if ln.startswith(("error:", "Error", "│ Invalid", "warning:"))] or lines
    first = lines[0].replace(str(folder) + "/", "").strip("│ ") if lines else "(nothing)"
    return f"exit {code}: `{first[:260]}`"


def digest(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def loss(before: dict[str, str], after: dict[str, str], outputs: tuple[str, ...] = ()) -> str:
    """Files deleted or changed, and stray outputs; 'nothing' when every file is as it was."""
    gone = [f for f in before if f not in after]
    changed = [f for f in before if f in after and before[f] != after[f]]
    new = [f for f in after if f not in before and not f.startswith(outputs)]
    if not (gone or changed or new):
        return f"nothing ({len(before)} files, sha256 equal; no stray output)"
    return "LOST: " + "; ".join(
        [*(f"{f} deleted" for f in gone), *(f"{f} changed" for f in changed), *(f"{f} left behind" for f in new)]
    )


def run_case(
    folder: Path, *args: object, grep: str | None = None, outputs: tuple[str, ...] = ()
) -> tuple[str, str, int]:
    before = digest(folder)
    code, out, err = cli(folder, *args)
    return shown(code, out, err, folder, grep), loss(before, digest(folder), outputs), code


# ---------------------------------------------------------------- inputs
def models(d: Path) -> None:
    g = torch.Generator().manual_seed(0)
    base = {
        "embed.weight": torch.randn(50, 8, generator=g),
        "head.weight": torch.randn(3, 8, generator=g),
        "bn.num_batches_tracked": torch.tensor(3),
    }
    save_file(base, d / "base.safetensors")
    for i in range(2):
        save_file(
            {k: v + 0.05 * torch.randn(v.shape, generator=g) if v.is_floating_point() else v for k, v in base.items()},
            d / f"ft{i}.safetensors",
        )


def with_header(src: Path, dst: Path, edit: Callable[[dict], object]) -> None:
    raw = src.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + n])
    new = edit(header)
    body = json.dumps(header if new is None else new).encode()
    dst.write_bytes(struct.pack("<Q", len(body)) + body + raw[8 + n :])


def config(d: Path, extra: str = "", weight: str = "1.0", ft: str = "ft0.safetensors") -> Path:
    (d / "merge.yaml").write_text(
        f"method: ties\nbase: base.safetensors\nmodels:\n  - {{finetuned: {ft}, weight: {weight}}}\n"
        f"  - {{finetuned: ft1.safetensors}}\n{extra}"
    )
    return d / "merge.yaml"


def nan_ft(d: Path) -> None:
    t = load_file(d / "ft0.safetensors")
    t["head.weight"][1, 2] = float("nan")
    save_file(t, d / "nan.safetensors")


# ---------------------------------------------------------------- cases
def header_case(fault: str, edit: Callable[[dict], object]) -> Callable[[Path], Result]:
    def case(d: Path) -> Result:
        models(d)
        with_header(d / "ft0.safetensors", d / "bad.safetensors", edit)
        seen, lost, _ = run_case(d, "extract", "base.safetensors", "bad.safetensors", "-o", "tv.safetensors")
        return fault, seen, lost

    case.__name__ = fault
    return case


def _overlap(h: dict) -> None:
    h["head.weight"]["data_offsets"] = list(h["embed.weight"]["data_offsets"][:1]) + [
        h["embed.weight"]["data_offsets"][0] + 96
    ]


def _reverse(h: dict) -> None:
    h["head.weight"]["data_offsets"] = h["head.weight"]["data_offsets"][::-1]


def _short(h: dict) -> None:
    h["head.weight"]["shape"] = [2, 8]


def _no_offsets(h: dict) -> None:
    del h["head.weight"]["data_offsets"]


def duplicate_names(d: Path) -> Result:
    models(d)
    raw = (d / "ft0.safetensors").read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    text = raw[8 : 8 + n].decode().rstrip()
    h = json.loads(text)
    text = text[:-1] + ', "embed.weight": ' + json.dumps(h["head.weight"]) + "}"
    (d / "bad.safetensors").write_bytes(struct.pack("<Q", len(text)) + text.encode() + raw[8 + n :])
    seen, lost, _ = run_case(d, "extract", "base.safetensors", "bad.safetensors", "-o", "tv.safetensors")
    return "safetensors header: a tensor name twice", seen, lost


def truncated(d: Path) -> Result:
    models(d)
    (d / "cut.safetensors").write_bytes((d / "ft0.safetensors").read_bytes()[:-20])
    seen, lost, _ = run_case(d, "extract", "base.safetensors", "cut.safetensors", "-o", "tv.safetensors")
    return "truncated safetensors file", seen, lost


def _sharded(d: Path, weight_map: object) -> None:
    models(d)
    (d / "m").mkdir()
    t = load_file(d / "ft0.safetensors")
    save_file({"embed.weight": t["embed.weight"]}, d / "m" / "a.safetensors")
    save_file(
        {"head.weight": t["head.weight"], "bn.num_batches_tracked": t["bn.num_batches_tracked"]},
        d / "m" / "b.safetensors",
    )
    (d / "m" / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


def index_case(fault: str, weight_map: object) -> Callable[[Path], Result]:
    def case(d: Path) -> Result:
        _sharded(d, weight_map)
        seen, lost, _ = run_case(d, "extract", "base.safetensors", "m", "-o", "tv.safetensors")
        return fault, seen, lost

    case.__name__ = fault
    return case


def config_case(fault: str, **kw: str) -> Callable[[Path], Result]:
    def case(d: Path) -> Result:
        models(d)
        config(d, **kw)
        seen, lost, _ = run_case(d, "merge", "merge.yaml", "-o", "out")
        return fault, seen, lost

    case.__name__ = fault
    return case


def apply_coef_nan(d: Path) -> Result:
    models(d)
    cli(d, "extract", "base.safetensors", "ft0.safetensors", "-o", "tv.safetensors")
    seen, lost, _ = run_case(d, "apply", "base.safetensors", "tv.safetensors", "-o", "out.safetensors", "--coef", "nan")
    return "`apply --coef nan`", seen, lost


def bases_compose_coef_nan(d: Path) -> Result:
    models(d)
    for i in range(2):
        cli(d, "extract", "base.safetensors", f"ft{i}.safetensors", "-o", f"tv{i}.safetensors")
    cli(d, "bases", "build", "tv0.safetensors", "tv1.safetensors", "-o", "bank", "--m", "1")
    seen, lost, _ = run_case(d, "bases", "compose", "bank", "--add", "tv0", "-o", "out.safetensors", "--coef", "nan")
    return "`bases compose --coef nan`", seen, lost


def nan_extract(d: Path) -> Result:
    models(d)
    nan_ft(d)
    seen, lost, _ = run_case(d, "extract", "base.safetensors", "nan.safetensors", "-o", "tv.safetensors")
    return "NaN inside a fine-tuned checkpoint (`extract`)", seen, lost


def nan_ties(d: Path) -> Result:
    models(d)
    nan_ft(d)
    config(d, ft="nan.safetensors")
    seen, lost, _ = run_case(d, "merge", "merge.yaml", "-o", "out")
    return "NaN inside a fine-tuned checkpoint (`merge`, TIES)", seen, lost


def nan_allowed(d: Path) -> Result:
    models(d)
    nan_ft(d)
    config(d, ft="nan.safetensors")
    seen, lost, code = run_case(
        d, "merge", "merge.yaml", "-o", "out", "--allow-nonfinite", grep="merged", outputs=("out",)
    )
    return "the same, with `--allow-nonfinite`", seen, lost


def nan_bases_build(d: Path) -> Result:
    models(d)
    nan_ft(d)
    cli(d, "extract", "base.safetensors", "nan.safetensors", "-o", "tv0.safetensors", "--allow-nonfinite")
    cli(d, "extract", "base.safetensors", "ft1.safetensors", "-o", "tv1.safetensors")
    seen, lost, _ = run_case(d, "bases", "build", "tv0.safetensors", "tv1.safetensors", "-o", "bank")
    return "a NaN task vector in `bases build`", seen, lost


def fp16_overflow(d: Path) -> Result:
    save_file({"w": torch.zeros(4)}, d / "pre.safetensors")
    save_file({"w": torch.tensor([0.0, 1.0, -70000.0, 2.0])}, d / "ft.safetensors")
    seen, lost, _ = run_case(
        d, "extract", "pre.safetensors", "ft.safetensors", "-o", "tv.safetensors", "--dtype", "float16"
    )
    return "`extract --dtype float16` of a difference that overflows fp16", seen, lost


def extract_case(fault: str, *opts: str) -> Callable[[Path], Result]:
    """`taskvec extract base ft0 -o tv.safetensors OPTS` on good inputs with one bad option."""

    def case(d: Path) -> Result:
        models(d)
        seen, lost, _ = run_case(d, "extract", "base.safetensors", "ft0.safetensors", "-o", "tv.safetensors", *opts)
        return fault, seen, lost

    case.__name__ = fault
    return case


def png_overwrite(d: Path) -> Result:
    models(d)
    for i in range(2):
        cli(d, "extract", "base.safetensors", f"ft{i}.safetensors", "-o", f"tv{i}.safetensors")
    (d / "photo.png").write_bytes(b"the user's own picture")
    seen, lost, _ = run_case(d, "similarity", "tv0.safetensors", "tv1.safetensors", "--png", "photo.png")
    return "`similarity --png` onto an existing file, no `--force`", seen, lost


def zero_cosine(d: Path) -> Result:
    models(d)
    cli(d, "extract", "base.safetensors", "ft0.safetensors", "-o", "tv0.safetensors")
    cli(d, "extract", "base.safetensors", "base.safetensors", "-o", "zero.safetensors")
    seen, lost, _ = run_case(d, "similarity", "tv0.safetensors", "zero.safetensors", grep="undefined")
    return "cosine of a zero task vector", seen, lost


def legacy_torch(d: Path) -> Result:
    models(d)
    torch.save(load_file(d / "base.safetensors"), d / "base.pth", _use_new_zipfile_serialization=False)
    seen, lost, _ = run_case(
        d, "extract", "base.pth", "ft0.safetensors", "-o", "tv.safetensors", outputs=("tv.safetensors",)
    )
    ok = (d / "tv.safetensors").exists()
    return "legacy (non-zip) `torch.save` checkpoint", seen + (" and the task vector is written" if ok else ""), lost


class _Plant:
    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):  # type: ignore[no-untyped-def]
        return (os.mkdir, (self.marker,))


def pickle_in_checkpoint(d: Path) -> Result:
    models(d)
    marker = d / "code-ran"
    torch.save({"w": torch.ones(2), "x": _Plant(str(marker))}, d / "evil.pth", _use_new_zipfile_serialization=False)
    seen, lost, _ = run_case(d, "info", "evil.pth")
    return (
        "a `.pth` whose pickle runs code when loaded",
        seen,
        lost + ("; the planted code RAN" if marker.exists() else "; the planted code did not run"),
    )


CASES: list[Callable[[Path], Result]] = [
    header_case("safetensors header: overlapping `data_offsets`", _overlap),
    header_case("safetensors header: reversed `data_offsets`", _reverse),
    header_case("safetensors header: shape too small for its bytes", _short),
    header_case("safetensors header: JSON list instead of an object", lambda h: list(h)),
    header_case("safetensors header: JSON string", lambda h: "weights"),
    header_case("safetensors header: JSON number", lambda h: 42),
    header_case("safetensors header: missing `data_offsets`", _no_offsets),
    duplicate_names,
    truncated,
    index_case("shard index: `weight_map` is a list", ["a.safetensors", "b.safetensors"]),
    index_case(
        "shard index: a tensor in a null shard",
        {"embed.weight": "a.safetensors", "head.weight": None, "bn.num_batches_tracked": "b.safetensors"},
    ),
    index_case(
        "shard index omits a tensor that a shard holds",
        {"embed.weight": "a.safetensors", "bn.num_batches_tracked": "b.safetensors"},
    ),
    index_case(
        "shard index names a file outside the folder",
        {
            "embed.weight": "../ft0.safetensors",
            "head.weight": "b.safetensors",
            "bn.num_batches_tracked": "b.safetensors",
        },
    ),
    config_case("merge config `scale: .nan`", extra="scale: .nan\n"),
    config_case("merge config `weight: .inf`", weight=".inf"),
    config_case("merge config `params: {density: .nan}`", extra="params: {density: .nan}\n"),
    config_case("merge config `shard_size: infGB`", extra="shard_size: infGB\n"),
    config_case("per-layer weights whose `'*'` comes first", weight="{'*': 0.5, 'head.*': 0.0}"),
    config_case(
        "per-layer weights: a later pattern covered by earlier ones",
        weight="{'*.weight': 1.0, 'head.*': 0.0, '*': 1.0}",
    ),
    apply_coef_nan,
    bases_compose_coef_nan,
    nan_extract,
    nan_ties,
    nan_allowed,
    nan_bases_build,
    fp16_overflow,
    extract_case("`extract --shard-size 0`", "--shard-size", "0"),
    extract_case("`--include` that matches no tensor", "--include", "encoder.*"),
    extract_case("`--exclude` that matches no tensor (a typo)", "--exclude", "*clasifier*"),
    png_overwrite,
    zero_cosine,
    legacy_torch,
    pickle_in_checkpoint,
]


def all_cases() -> list[Callable[[Path], Result]]:
    cases = list(CASES)
    if importlib.util.find_spec("reliability_writers") is not None:  # next to this script, when run as one
        from reliability_writers import CASES as WRITERS  # type: ignore[import-not-found]

        cases += WRITERS
    if importlib.util.find_spec("reliability_second") is not None:
        from reliability_second import CASES as SECOND  # type: ignore[import-not-found]

        cases += SECOND
    return cases


def run_cases(cases: list[Callable[[Path], Result]]) -> list[tuple[str, str, str]]:
    """Run each case in a fresh empty folder; a broken case is reported, not hidden."""
    rows = []
    for case in cases:
        with tempfile.TemporaryDirectory(prefix="taskvec-reliability-") as tmp:
            try:
                fault, seen, lost = case(Path(tmp))
            except Exception as e:  # a broken case is reported, not hidden
                fault, seen, lost = case.__name__, f"the case itself failed: {type(e).__name__}: {e}", "?"
        rows.append((fault, seen.replace("|", "\\|"), lost.replace("|", "\\|")))
        print(f"{fault}: {seen} | {lost}", flush=True)
    return rows


def write_report(rows: list[tuple[str, str, str]]) -> None:
    bad = [r for r in rows if not r[2].startswith("nothing")]
    text = [
        "# Reliability: bad input and faults, tried through the real CLI",
        "",
        f"Generated by `{COMMAND}` (each case runs `python -m taskvec ...` in a fresh process on files it",
        'sets up in an empty folder; "nothing lost" compares the sha256 of every file in that folder before and',
        "after the command, and lists any stray file left behind).",
        "",
        f"{len(rows)} cases; {len(rows) - len(bad)} lose nothing"
        + (f"; {len(bad)} do not: see the rows marked LOST." if bad else "."),
        "",
        "The rules every case checks:",
        "",
        "- **Outputs.** An output is written beside itself to a temporary and renamed into place when complete.",
        "  It is never a file the command reads (compared by inode: `./x`, `/abs/x` and a hard link are one file),",
        "  never contains or lies inside one, and `--force` replaces only a file or folder taskvec wrote (nested",
        "  files included). Plots (`--png`: .png, .pdf or .svg) follow the same rule: taskvec marks its plots in",
        "  their metadata.",
        "- **Locks.** The lock file `.NAME.lock` is opened without following links and used only when it is a",
        "  regular file with one link; it records the writer's process id.",
        "- **Removal.** taskvec removes only what it recorded: the temporaries of a killed writer named by the lock",
        "  it left, and in a bank the basis an unfinished `bases add` recorded in `.taskvec-pending.json`.",
        "- **Inputs.** Every input must be a regular file or folder (a pipe or device is refused at once); JSON is",
        "  parsed with depth (64) and size limits, YAML refuses duplicate keys, text must be UTF-8, CSV rows must",
        "  match the header; a bank records a digest of each source and refuses one that changed.",
        "- **Numbers.** NaN/Inf inputs and results that overflow float32 are refused by tensor name; coefficients",
        "  must be numbers (not booleans) within the float32 range. fp8 inputs are computed in float32.",
        "",
        "| case | what the user sees | nothing lost |",
        "| --- | --- | --- |",
        *(f"| {a} | {b} | {c} |" for a, b, c in rows),
        "",
    ]
    OUT.write_text("\n".join(text))
    print(f"wrote {OUT}")


def main() -> None:
    write_report(run_cases(all_cases()))


if __name__ == "__main__":
    main()
