"""The Finished pane: done, failed, timed-out, cancelled and lost jobs, newest first, failures coloured."""

from __future__ import annotations

from typing import Any, ClassVar

from textual.binding import Binding, BindingType

from ...master.rows import FinishedRow
from ..format import clock, duration
from .table import Column, WindowTable

ROW_CLASSES = {"failed": "cell--bad", "timeout": "cell--bad", "lost": "cell--bad", "cancelled": "cell--warn"}


class FinishedTable(WindowTable[FinishedRow]):
    """Final jobs, most recently finished first, paged from the master (which keeps the history)."""

    TITLE = "Finished"
    EMPTY = "no finished jobs yet"
    COLUMNS = (
        Column("ID", 7, right=True),
        Column("COMMAND", 16, flex=True),
        Column("STATE", 9),
        Column("AGENT", 10),
        Column("EXIT", 4, right=True),
        Column("TOOK", 7, right=True),
        Column("ENDED", 8),
    )
    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("enter", "screen.open", "Detail"),
        Binding("r", "screen.requeue", "Requeue"),
        Binding("c", "screen.cancel", "Cancel", show=False),
    ]

    def named(self, rows: list[Any]) -> list[FinishedRow]:
        return [FinishedRow._make(row) for row in rows]

    def cells(self, row: FinishedRow, now: float) -> tuple[str, ...]:
        took = duration(row.ended - row.started) if row.started and row.ended else "-"
        exit_code = "-" if row.exit_code is None else str(row.exit_code)
        return (str(row.id), row.what, row.state, row.agent or "-", exit_code, took, clock(row.ended))

    def classes_of(self, row: FinishedRow) -> tuple[str | None, ...]:
        state = row.state
        if state == "done":
            return (None, None, "cell--good", None, None, None, None)
        bad = ROW_CLASSES.get(state)
        return (bad,) * len(self.COLUMNS)

    def key_of(self, row: FinishedRow) -> int:
        return row.id
