"""docs/results.md and the benchmark reports agree: every generated table on the page is the table
of its report, and `benchmarks/assemble_results.py` refills a stale block or says a report is missing."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path
from types import ModuleType

ROOT = Path(__file__).parents[1]
SCRIPT = ROOT / "benchmarks" / "assemble_results.py"


def _script() -> ModuleType:
    spec = importlib.util.spec_from_file_location("assemble_results", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_page_agrees_with_reports() -> None:
    script = _script()
    page = (ROOT / "docs" / "results.md").read_text(encoding="utf-8")
    assert script.sources(page), "docs/results.md has no generated tables"
    for path in script.sources(page):
        assert (ROOT / path).is_file(), f"{path}: linked from docs/results.md but missing"
    assert script.assemble(page, ROOT) == page


def test_check_mode_exit_status(tmp_path: Path) -> None:
    page = tmp_path / "results.md"
    page.write_text(
        "# R\n\n<!-- generated from benchmarks/results/suites/tiny/results.md, table 1 -->\n"
        "| stale | table |\n<!-- end generated -->\n",
        encoding="utf-8",
    )
    run = [sys.executable, str(SCRIPT), "--page", str(page)]
    assert subprocess.run([*run, "--check"], capture_output=True).returncode == 1
    assert subprocess.run(run, capture_output=True).returncode == 0
    assert subprocess.run([*run, "--check"], capture_output=True).returncode == 0
    tiny = (ROOT / "benchmarks" / "results" / "suites" / "tiny" / "results.md").read_text(encoding="utf-8")
    first = tiny.split("\n\n")[1]  # the heading, then the first table
    assert first.startswith("| method |")
    assert first + "\n" in page.read_text(encoding="utf-8")


def test_refill_picks_the_numbered_table_and_notes_a_missing_report(tmp_path: Path) -> None:
    script = _script()
    (tmp_path / "r.md").write_text("# t\n\n| a |\n|---|\n| 1 |\n\ntext\n\n| b |\n|---|\n| 2 |\n", encoding="utf-8")
    page = (
        "<!-- generated from r.md, table 2 -->\nold\n<!-- end generated -->\n"
        "<!-- generated from r.md, table 3 -->\n<!-- end generated -->\n"
        "<!-- generated from gone.md, table 1 -->\n| 9 |\n<!-- end generated -->\n"
    )
    out = script.assemble(page, tmp_path)
    assert "table 2 -->\n| b |\n|---|\n| 2 |\n<!-- end generated -->" in out
    assert "_Not available: r.md has 2 table(s), not a table 3._" in out
    assert "_Not measured: gone.md is missing" in out
    assert "| 9 |" not in out and "old" not in out
