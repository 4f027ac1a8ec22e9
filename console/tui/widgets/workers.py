"""The Workers pane: each agent's name, host, state, slots busy/total, jobs done, heartbeat age, tags, who started it."""

from __future__ import annotations

from typing import Any, ClassVar

from textual.binding import Binding, BindingType

from ..format import age, count
from .table import Column, WindowTable

STATE_CLASSES = {"up": "cell--good", "lost": "cell--bad", "draining": "cell--warn", "stopped": "cell--muted"}


def worker_row(agent: dict[str, Any]) -> tuple[Any, ...]:
    """(name, host, state, busy, slots, done, failed, heartbeat age, tags, started by) from Scheduler's agent wire."""
    return (agent["name"], agent["host"], agent["state"], agent["busy"], agent["slots"], agent["done"],
            agent["failed"], agent["heartbeat_age"], ",".join(agent["tags"]), agent["started_by"])


class WorkersTable(WindowTable):
    """The agents; few enough to hold them all, so the filter runs here."""

    TITLE = "Workers"
    EMPTY = "no agents: start one with `corral agent`, or `corral` without --no-local-agent"
    PAGED = False
    AUTO_HEIGHT = True
    BINDINGS: ClassVar[list[BindingType]] = [
        # k is "up" in the other tables; here it stops, as in `corral stop` (up still moves the cursor).
        Binding("k", "screen.stop_agent(False)", "Stop agent"),
        Binding("D", "screen.stop_agent(True)", "Drain agent"),
    ]
    COLUMNS = (
        Column("NAME", 12),
        Column("HOST", 10),
        Column("STATE", 8),
        Column("BUSY", 7, right=True),
        Column("DONE", 8, right=True),
        Column("FAILED", 6, right=True),
        Column("SEEN", 5, right=True),
        Column("TAGS", 4, flex=True),  # narrow, so STARTED still fits at 80 columns
        Column("STARTED", 10),
    )

    def cells(self, row: tuple[Any, ...], now: float) -> tuple[str, ...]:
        name, host, state, busy, slots, done, failed, heartbeat, tags, _by = row
        return (name, host, state, f"{busy}/{slots}", count(done), count(failed), age(heartbeat), tags or "-", _by)

    def classes_of(self, row: tuple[Any, ...]) -> tuple[str | None, ...]:
        out: list[str | None] = [None] * len(self.COLUMNS)
        out[2] = STATE_CLASSES.get(row[2])
        if row[6]:
            out[5] = "cell--bad"
        return tuple(out)
