"""The Finished pane: done, failed, timed-out, cancelled and lost jobs, newest first, failures coloured."""

from __future__ import annotations

from typing import Any, ClassVar

from textual.binding import Binding, BindingType

from ..format import clock, duration
from .table import Column, WindowTable

# Row: (id, what, state, agent, exit code, started, ended, error, attempts) — Scheduler._console_finished.
ROW_CLASSES = {"failed": "cell--bad", "timeout": "cell--bad", "lost": "cell--bad", "cancelled": "cell--warn"}


class FinishedTable(WindowTable):
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

    def cells(self, row: tuple[Any, ...], now: float) -> tuple[str, ...]:
        job_id, what, state, agent, exit_code, started, ended, _error, _attempts = row
        took = duration(ended - started) if started and ended else "-"
        return (str(job_id), what, state, agent or "-", "-" if exit_code is None else str(exit_code), took,
                clock(ended))

    def classes_of(self, row: tuple[Any, ...]) -> tuple[str | None, ...]:
        state = row[2]
        if state == "done":
            return (None, None, "cell--good", None, None, None, None)
        bad = ROW_CLASSES.get(state)
        return (bad,) * len(self.COLUMNS)
