"""The rows of the console's job panes, named: master/views.py builds them, the TUI's tables show them.

They cross the wire as plain tuples (a NamedTuple would pickle with its class, and the console must not
need the master's modules to read a snapshot): `pack` at the master's edge, `Row._make` at the TUI's.
"""

from __future__ import annotations

from typing import Any, Iterable, NamedTuple


class DispatchedRow(NamedTuple):
    """A queued, running or held job in the Dispatched pane."""

    id: int
    what: str  # name, else command, else "module:function()"
    state: str
    priority: int
    agent: str | None
    attempt: int
    started: float | None
    submitted: float
    tags: str  # comma-separated, sorted


class FinishedRow(NamedTuple):
    """A final job in the Finished pane."""

    id: int
    what: str
    state: str
    agent: str | None
    exit_code: int | None
    started: float | None
    ended: float | None
    error: str
    attempts: int


def pack(rows: Iterable[tuple[Any, ...]]) -> list[tuple[Any, ...]]:
    """Named rows as the plain tuples that go over the wire."""
    return [tuple(row) for row in rows]
