"""The Dispatched pane: queued and running jobs, running first, then in the order they will run."""

from __future__ import annotations

from typing import Any, ClassVar

from textual.binding import Binding, BindingType

from ..format import duration
from .table import Column, WindowTable

# Row: (id, what, state, priority, agent, attempt, started, submitted, tags) — Scheduler._console_row.
STATE_CLASSES = {"running": "cell--running", "queued": "cell--muted", "held": "cell--warn"}


class DispatchedTable(WindowTable):
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

    def cells(self, row: tuple[Any, ...], now: float) -> tuple[str, ...]:
        job_id, what, state, priority, agent, attempt, started, _submitted, tags = row
        if tags:
            what = f"{what}  [{tags}]"
        elapsed = duration(now - started) if state == "running" and started else "-"
        return (str(job_id), what, state, str(priority), agent or "-", str(attempt) if attempt else "-", elapsed)

    def classes_of(self, row: tuple[Any, ...]) -> tuple[str | None, ...]:
        return (None, None, STATE_CLASSES.get(row[2]), None, None, None, None)
