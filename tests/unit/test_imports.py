"""The import graph of corral's own modules: no cycle, and the arrows the design allows, read from the source."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from tests.cluster import REPO

# The folders each wing lives in, and the module name each installs as.
ROOTS = {"corral.agent": REPO / "agent", "corral.console": REPO / "console"}


def module_files() -> dict[str, Path]:
    files = {"corral": REPO / "corral" / "__init__.py"}
    for package, folder in ROOTS.items():
        for path in sorted(folder.rglob("*.py")):
            parts = list(path.relative_to(folder).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            files[".".join([package, *parts])] = path
    return files


def imports(name: str, path: Path, everything: set[str], lazy: bool) -> set[str]:
    """The corral modules `name` imports: at module level (class bodies included), or (lazy) in function
    bodies too. Imports under `if TYPE_CHECKING:` are for annotations, not arrows: left out."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()

    def record(node: ast.Import | ast.ImportFrom) -> None:
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
            return
        base = package
        for _ in range(node.level - 1):
            base = base.rpartition(".")[0]
        target = (f"{base}.{node.module}" if node.module else base) if node.level else node.module or ""
        found.add(target)
        found.update(f"{target}.{alias.name}" for alias in node.names)  # `from pkg import module`

    def visit(node: ast.AST, in_function: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and "TYPE_CHECKING" in ast.unparse(child.test):
                continue
            if isinstance(child, (ast.Import, ast.ImportFrom)):
                if lazy or not in_function:
                    record(child)
                continue
            visit(child, in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)))

    visit(ast.parse(path.read_text()), False)
    # A module's own packages are imported before it anyway (`from . import sibling` names one): no arrow.
    ancestors = {name.rsplit(".", k)[0] for k in range(1, name.count(".") + 1)}
    return {m for m in found if m in everything and m != name and m not in ancestors}


def graph(lazy: bool) -> dict[str, set[str]]:
    files = module_files()
    names = set(files)
    return {name: imports(name, path, names, lazy) for name, path in files.items()}


def test_the_module_list_is_whole() -> None:
    names = set(module_files())
    assert {"corral.agent.runner", "corral.console.master.scheduler", "corral.console.cli"} <= names
    assert len(names) > 40


def test_no_import_cycle_at_module_level() -> None:
    edges = graph(lazy=False)
    seen: dict[str, int] = {}  # 1: on the current path, 2: done

    def walk(node: str, path: list[str]) -> None:
        seen[node] = 1
        for nxt in sorted(edges[node]):
            if seen.get(nxt) == 1:
                cycle = path[path.index(nxt):] + [nxt]
                pytest.fail("import cycle: " + " → ".join(cycle))
            if nxt not in seen:
                walk(nxt, path + [nxt])
        seen[node] = 2

    for start in sorted(edges):
        if start not in seen:
            walk(start, [start])


@pytest.mark.parametrize("source, forbidden, why", [
    ("corral.agent", "corral.console", "the agent is stdlib-only and goes over the wire alone"),
    ("corral.console.master", "corral.console.deploy", "the master knows nothing of what is served beside it"),
    ("corral.console.master", "corral.console.tui", "the master does not draw"),
    ("corral.console.master", "corral.console.cli", "the master does not parse command lines"),
    ("corral.console.deploy", "corral.console.master", "deploy depends on the AgentRegistry protocol only"),
    ("corral.console.deploy", "corral.console.tui", "deploy does not draw"),
    ("corral.console.client", "corral.console.tui", "the client serves the console, not the other way"),
])
def test_layering(source: str, forbidden: str, why: str) -> None:
    for name, targets in graph(lazy=True).items():
        if name == source or name.startswith(source + "."):
            bad = sorted(t for t in targets if t == forbidden or t.startswith(forbidden + "."))
            assert not bad, f"{name} imports {bad}: {why}"
