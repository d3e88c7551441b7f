"""Every module of taskvec imports on its own and in any order, and the modules import each other
without cycles (read from the source with ast, so a cycle hidden by an import inside a function
is found too)."""

from __future__ import annotations

import ast
import random
import subprocess
import sys
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"
PACKAGE = SRC / "taskvec"

# Imports of taskvec modules inside functions allowed outside the CLI (none: optional third-party
# dependencies are imported through taskvec._optional at call time, the helper itself at the top).
ALLOWED_FUNCTION_IMPORTS: set[tuple[str, str]] = set()
# Cycles allowed through imports inside functions (none).
ALLOWED_CYCLES: list[set[str]] = []


def module_names() -> list[str]:
    names = []
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(SRC).with_suffix("").parts
        if parts[-1] == "__main__":
            continue
        names.append(".".join(parts[:-1] if parts[-1] == "__init__" else parts))
    return names


def _path(module: str) -> Path:
    base = SRC.joinpath(*module.split("."))
    return base / "__init__.py" if base.is_dir() else base.with_suffix(".py")


def _is_type_checking(node: ast.If) -> bool:
    t = node.test
    return (isinstance(t, ast.Name) and t.id == "TYPE_CHECKING") or (
        isinstance(t, ast.Attribute) and t.attr == "TYPE_CHECKING"
    )


def imports_of(module: str, known: set[str]) -> tuple[set[str], set[str]]:
    """(taskvec modules imported at module level, those imported inside functions) by `module`;
    imports under `if TYPE_CHECKING:` do not run and are left out."""
    tree = ast.parse(_path(module).read_text())
    package = module if _path(module).name == "__init__.py" else module.rpartition(".")[0]
    top: set[str] = set()
    inner: set[str] = set()

    def targets(node: ast.Import | ast.ImportFrom) -> set[str]:
        out = set()
        if isinstance(node, ast.Import):
            return {a.name for a in node.names if a.name in known}
        base = node.module or ""
        if node.level:
            anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
            base = ".".join([*anchor, *([base] if base else [])])
        for a in node.names:
            sub = f"{base}.{a.name}"
            if sub in known:
                out.add(sub)  # `from package import module` imports that module
            elif base in known:
                out.add(base)
        return out

    def walk(nodes: list[ast.stmt], in_function: bool) -> None:
        for node in nodes:
            if isinstance(node, ast.Import | ast.ImportFrom):
                (inner if in_function else top).update(targets(node))
            elif isinstance(node, ast.If) and _is_type_checking(node):
                continue
            elif isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                walk(node.body, True)
            else:
                for field in ("body", "orelse", "finalbody", "handlers"):
                    children = getattr(node, field, None)
                    if isinstance(children, list):
                        walk([c for c in children if isinstance(c, ast.stmt | ast.ExceptHandler)], in_function)

    walk(tree.body, False)
    return top - {module}, inner - {module}


def cycles(graph: dict[str, set[str]]) -> list[set[str]]:
    """The strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[set[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = set()
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.add(w)
                if w == v:
                    break
            if len(comp) > 1:
                found.append(comp)

    sys.setrecursionlimit(max(sys.getrecursionlimit(), 10_000))
    for v in graph:
        if v not in index:
            visit(v)
    return found


@pytest.fixture(scope="module")
def graphs() -> tuple[dict[str, set[str]], dict[str, set[str]]]:
    names = module_names()
    known = set(names)
    top, inner = {}, {}
    for m in names:
        top[m], inner[m] = imports_of(m, known)
    return top, inner


def test_no_import_cycle_at_module_level(graphs: tuple[dict[str, set[str]], dict[str, set[str]]]) -> None:
    top, _ = graphs
    assert cycles(top) == []


def test_no_cycle_hidden_by_an_import_inside_a_function(
    graphs: tuple[dict[str, set[str]], dict[str, set[str]]],
) -> None:
    top, inner = graphs
    both = {m: top[m] | inner[m] for m in top}
    left = [c for c in cycles(both) if not any(c <= allowed for allowed in ALLOWED_CYCLES)]
    assert left == []


def test_imports_inside_functions_only_in_the_cli_or_for_optional_dependencies(
    graphs: tuple[dict[str, set[str]], dict[str, set[str]]],
) -> None:
    _, inner = graphs
    found = {(m, t) for m, ts in inner.items() if not m.startswith("taskvec.cli") for t in ts}
    assert found - ALLOWED_FUNCTION_IMPORTS == set()


def test_the_library_does_not_import_the_bench(
    graphs: tuple[dict[str, set[str]], dict[str, set[str]]],
) -> None:
    """Only the CLI and the bench itself reach taskvec.bench (the harness sits on the library)."""
    top, inner = graphs
    both = {m: top[m] | inner[m] for m in top}
    library = [m for m in both if not m.startswith(("taskvec.bench", "taskvec.cli"))]
    reached: dict[str, set[str]] = {}
    for m in library:
        seen, todo = set(), [m]
        while todo:
            for t in both.get(todo.pop(), ()):
                if t not in seen:
                    seen.add(t)
                    todo.append(t)
        reached[m] = {t for t in seen if t.startswith("taskvec.bench")}
    assert {m: r for m, r in reached.items() if r} == {}


def test_no_private_name_is_imported_from_another_module() -> None:
    """A name shared between modules is public (no leading underscore)."""
    found = []
    for module in module_names():
        for node in ast.walk(ast.parse(_path(module).read_text())):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("taskvec"):
                found += [f"{module}: {node.module}.{a.name}" for a in node.names if a.name.startswith("_")]
    assert found == []


def test_the_graph_sees_real_imports() -> None:
    """The reader finds what the files import (a check of the test itself)."""
    known = set(module_names())
    top, inner = imports_of("taskvec.core.taskvector", known)
    assert {"taskvec.core.similarity", "taskvec.core.sources", "taskvec.io"} <= top
    top, inner = imports_of("taskvec.core.similarity", known)
    assert "taskvec.core.taskvector" not in top  # only under TYPE_CHECKING
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [{"a", "b", "c"}]


# Heavy third-party modules are imported once by the parent; each child then imports taskvec
# modules in a fresh state (nothing of taskvec loaded), so a missing import or an order that
# needs a module to be loaded first fails there.
_RUNNER = """
import importlib, os, random, sys, traceback
import numpy, pydantic, rich, safetensors, torch, typer, yaml  # noqa: F401
names, orders, seed = {names!r}, {orders!r}, {seed!r}
jobs = [[n] for n in names]
rng = random.Random(seed)
for _ in range(orders):
    order = list(names)
    rng.shuffle(order)
    jobs.append(order)
failed = []
for job in jobs:
    pid = os.fork()
    if pid == 0:
        code = 0
        try:
            for n in job:
                importlib.import_module(n)
        except BaseException:
            traceback.print_exc()
            code = 1
        sys.stdout.flush(); sys.stderr.flush()
        os._exit(code)
    _, status = os.waitpid(pid, 0)
    if status != 0:
        failed.append(job if len(job) == 1 else "random order: " + " ".join(job))
print("FAILED", failed)
sys.exit(1 if failed else 0)
"""


@pytest.mark.skipif(not hasattr(__import__("os"), "fork"), reason="needs fork")
def test_every_module_imports_alone_and_in_random_orders() -> None:
    names = module_names()
    seed = random.randrange(1 << 30)
    r = subprocess.run(
        [sys.executable, "-c", _RUNNER.format(names=names, orders=4, seed=seed)],
        capture_output=True,
        text=True,
        cwd=SRC,
        timeout=600,
    )
    assert r.returncode == 0, f"seed {seed}: {r.stdout[-2000:]}\n{r.stderr[-6000:]}"
