"""Rooms stay rooms: no product module over MODULE_LINES, no function over FUNCTION_LINES unless a comment
right above it says why it is one piece (the package issue's rule, kept by a test rather than by memory)."""

from __future__ import annotations

import ast

from tests.unit.test_imports import module_files

MODULE_LINES = 600
FUNCTION_LINES = 60
WHY = "One piece"  # the comment that explains a long function, in the lines just above its def


def long_functions(source: str) -> list[tuple[str, int, int]]:
    """(name, first line, length) of each function over FUNCTION_LINES without a WHY comment above it."""
    lines = source.splitlines()
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            first = min([node.lineno, *(d.lineno for d in node.decorator_list)])
            length = (node.end_lineno or node.lineno) - node.lineno + 1
            above = "\n".join(lines[max(0, first - 6):first - 1])
            if length > FUNCTION_LINES and WHY not in above:
                found.append((node.name, node.lineno, length))
    return found


def test_no_module_is_over_the_limit() -> None:
    over = {name: n for name, path in module_files().items()
            if (n := len(path.read_text().splitlines())) > MODULE_LINES}
    assert not over, f"modules over {MODULE_LINES} lines (split them by job): {over}"


def test_no_long_function_without_a_reason() -> None:
    over = {name: found for name, path in module_files().items() if (found := long_functions(path.read_text()))}
    assert not over, f"functions over {FUNCTION_LINES} lines with no '# {WHY} (...)' comment above them: {over}"


def test_the_rule_sees_a_long_function_and_its_reason() -> None:
    body = "\n".join(f"    x = {i}" for i in range(FUNCTION_LINES + 1))
    assert [name for name, _, _ in long_functions(f"def f():\n{body}\n")] == ["f"]
    assert long_functions(f"# {WHY} (~61 lines): a loop over opcodes\ndef f():\n{body}\n") == []
    assert long_functions("def g():\n    return 1\n") == []
