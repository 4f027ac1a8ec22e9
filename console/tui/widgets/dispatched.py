"""The Dispatched pane: queued and running jobs, running first, then in the order they will run."""

from __future__ import annotations

from typing import Any, ClassVar

from textual.binding import Binding, BindingType

from ...master.rows import DispatchedRow
from ..format import duration
from .table import Column, WindowTable

STATE_CLASSES = {"running": "cell--running", "queued": "cell--muted", "held": "cell--warn"}


class DispatchedTable(WindowTable[DispatchedRow]):
    """Queued and running jobs, paged from the master."""

    TITLE = "Dispatched"
    EMPTY = "no jobs queued or running — press n to submit one"
    COLUMNS = (
        Column("ID", 7, right=True),
        Column("NAME/COMMAND", 16, flex=True),
        Column("STATE", 7),
        Column("PRI", 4, right=True),
        Column("AGENT", 10),
        Column("TRY", 3, right=True),
        Column("ELAPSED", 7, right=True),
    )
    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("enter", "screen.open", "Detail"),
        Binding("c", "screen.cancel", "Cancel"),
        Binding("r", "screen.requeue", "Requeue", show=False),
    ]

    def named(self, rows: list[Any]) -> list[DispatchedRow]:
        return [DispatchedRow._make(row) for row in rows]

    def cells(self, row: DispatchedRow, now: float) -> tuple[str, ...]:
        what = f"{row.what}  [{row.tags}]" if row.tags else row.what
        elapsed = duration(now - row.started) if row.state == "running" and row.started else "-"
        return (str(row.id), what, row.state, str(row.priority), row.agent or "-",
                str(row.attempt) if row.attempt else "-", elapsed)

    def classes_of(self, row: DispatchedRow) -> tuple[str | None, ...]:
        return (None, None, STATE_CLASSES.get(row.state), None, None, None, None)

    def key_of(self, row: DispatchedRow) -> int:
        return row.id
