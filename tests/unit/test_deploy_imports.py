"""deploy/ depends on the master only through its AgentRegistry protocol: no module of it imports master/."""

from __future__ import annotations

import ast
from pathlib import Path

import corral.console.deploy

DEPLOY = Path(corral.console.deploy.__file__).resolve().parent


def imported(path: Path) -> set[str]:
    """Every module name an import statement of this file names (relative ones as written, dots included)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            names.add("." * node.level + (node.module or ""))
    return names


def test_no_deploy_module_imports_the_master() -> None:
    files = sorted(DEPLOY.glob("*.py"))
    assert len(files) >= 9
    for path in files:
        bad = {name for name in imported(path) if "master" in name.split(".")}
        assert not bad, f"{path.name} imports {bad}"
