#!/usr/bin/env python3
"""Fill the generated tables of docs/results.md from the reports under benchmarks/results/.

docs/results.md is written by hand (protocol, readings, summaries across several reports); only
the tables between a pair of markers are generated, each copied verbatim from one report:

    <!-- generated from benchmarks/results/suites/tiny/results.md, table 1 -->
    ...the first markdown table of that file...
    <!-- end generated -->

so a rerun of a benchmark followed by

    python3 benchmarks/assemble_results.py            # rewrite the marked tables in place
    python3 benchmarks/assemble_results.py --check    # exit 1 if the page differs from the reports

keeps the page and the reports in agreement. A report that is missing, or has fewer tables than
the marker asks for, is replaced by a note saying so, never by stale numbers. Everything outside
the markers (readings, condensed summaries, links) is left as it is: edit it by hand after a rerun.
The page is written atomically.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PAGE = REPO / "docs" / "results.md"

BLOCK = re.compile(
    r"(?P<open><!-- generated from (?P<path>\S+), table (?P<index>\d+) -->\n)"
    r"(?P<body>.*?)"
    r"(?P<close><!-- end generated -->)",
    re.DOTALL,
)
"""One generated block: the report's path (relative to the repository) and the table's 1-based index."""


def tables(markdown: str) -> list[str]:
    """The markdown tables of a report, in order: runs of consecutive lines starting with `|`."""
    found: list[str] = []
    run: list[str] = []
    for line in markdown.splitlines():
        if line.startswith("|"):
            run.append(line)
        elif run:
            found.append("\n".join(run) + "\n")
            run = []
    if run:
        found.append("\n".join(run) + "\n")
    return found


def table_of(repo: Path, path: str, index: int) -> str:
    """Table `index` (1-based) of the report at `path`, or a note saying why it is not there."""
    report = repo / path
    if not report.is_file():
        return f"_Not measured: {path} is missing (run the command above)._\n"
    found = tables(report.read_text(encoding="utf-8"))
    if not 1 <= index <= len(found):
        return f"_Not available: {path} has {len(found)} table(s), not a table {index}._\n"
    return found[index - 1]


def assemble(page: str, repo: Path) -> str:
    """The page with every generated block refilled from its report."""

    def fill(m: re.Match[str]) -> str:
        return m.group("open") + table_of(repo, m.group("path"), int(m.group("index"))) + m.group("close")

    return BLOCK.sub(fill, page)


def sources(page: str) -> list[str]:
    """The reports the page's generated blocks come from, in order of appearance."""
    return [m.group("path") for m in BLOCK.finditer(page)]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--check", action="store_true", help="only compare; exit 1 if the page is out of date")
    parser.add_argument("--page", type=Path, default=PAGE, help="the page to fill (default: docs/results.md)")
    args = parser.parse_args(argv)
    old = args.page.read_text(encoding="utf-8")
    new = assemble(old, REPO)
    n = len(sources(old))
    if args.check:
        if new != old:
            print(
                f"{args.page}: generated tables differ from benchmarks/results; run {Path(__file__).name}",
                file=sys.stderr,
            )
            return 1
        print(f"{args.page}: {n} generated tables agree with their reports")
        return 0
    if new != old:
        sys.path.insert(0, str(REPO / "src"))
        from taskvec.io.atomic import write_text_atomic

        write_text_atomic(args.page, new)
    print(f"{args.page}: {n} generated tables filled")
    return 0


if __name__ == "__main__":
    sys.exit(main())
