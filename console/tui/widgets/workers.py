"""The Workers pane: each agent's name, host, state, slots busy/total, jobs done, heartbeat age, tags, who started it; sorted by name, state or busy."""

from __future__ import annotations

from typing import Any, Callable, ClassVar, NamedTuple

from textual.binding import Binding, BindingType

from ..format import age, count
from .table import Column, WindowTable

STATE_CLASSES = {"up": "cell--good", "lost": "cell--bad", "draining": "cell--warn", "stopped": "cell--muted"}
# `s` cycles through these orders. By state, trouble comes first (lost, then draining), as k9s puts
# failing pods on top; by busy, the fullest agents first; ties by name, so rows never jump about.
SORTS = ("name", "state", "busy")
STATE_ORDER = {"lost": 0, "draining": 1, "up": 2, "stopped": 3}


class WorkerRow(NamedTuple):
    """An agent in the Workers pane."""

    name: str
    host: str
    state: str  # master/records.py's AgentState values: up, draining, lost, stopped
    busy: int
    slots: int
    done: int
    failed: int
    heartbeat_age: float
    tags: str  # comma-separated
    started_by: str


def worker_row(agent: dict[str, Any]) -> WorkerRow:
    """The row of one agent as the master describes it (records.AgentRecord.wire)."""
    return WorkerRow(agent["name"], agent["host"], agent["state"], agent["busy"], agent["slots"], agent["done"],
                     agent["failed"], agent["heartbeat_age"], ",".join(agent["tags"]), agent["started_by"])


def sort_key(order: str) -> Callable[[WorkerRow], tuple[Any, ...]]:
    if order == "state":
        return lambda row: (STATE_ORDER.get(row.state, len(STATE_ORDER)), row.name)
    if order == "busy":
        return lambda row: (-row.busy, -row.slots, row.name)
    return lambda row: (row.name,)


class WorkersTable(WindowTable[WorkerRow]):
    """The agents (hundreds at most): the table holds them all, so the filter and the sort run here."""

    TITLE = "Workers"
    EMPTY = "no agents: start one with `corral agent`, or `corral` without --no-local-agent"
    PAGED = False
    AUTO_HEIGHT = True
    BINDINGS: ClassVar[list[BindingType]] = [
        # k is "up" in the other tables; here it stops, as in `corral stop` (up still moves the cursor).
        Binding("k", "screen.stop_agent(False)", "Stop agent"),
        Binding("D", "screen.stop_agent(True)", "Drain agent"),
        Binding("s", "sort", "Sort"),
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

    def __init__(self, *, id: str | None = None) -> None:
        super().__init__(id=id)
        self.order = SORTS[0]
        self.everyone: list[WorkerRow] = []

    def show_all(self, rows: list[WorkerRow], now: float) -> None:
        self.everyone = rows
        super().show_all(sorted(rows, key=sort_key(self.order)), now)

    def action_sort(self) -> None:
        """Next order (name, state, busy); the cursor stays on the agent it was on."""
        chosen = self.selected()
        self.order = SORTS[(SORTS.index(self.order) + 1) % len(SORTS)]
        self.show_all(self.everyone, self.now)
        if chosen is not None:
            names = [row.name for row in self.rows]
            if chosen.name in names:
                self.cursor = names.index(chosen.name)
        self.refresh()

    def _update_title(self) -> None:
        super()._update_title()
        if self.order != SORTS[0]:
            self.border_subtitle = " · ".join(filter(None, [str(self.border_subtitle or ""), f"by {self.order}"]))

    def cells(self, row: WorkerRow, now: float) -> tuple[str, ...]:
        return (row.name, row.host, row.state, f"{row.busy}/{row.slots}", count(row.done), count(row.failed),
                age(row.heartbeat_age), row.tags or "-", row.started_by)

    def classes_of(self, row: WorkerRow) -> tuple[str | None, ...]:
        # One class per column, in COLUMNS' order: STATE coloured by state, FAILED red when any failed.
        return (None, None, STATE_CLASSES.get(row.state), None, None, "cell--bad" if row.failed else None,
                None, None, None)

    def key_of(self, row: WorkerRow) -> str:
        return row.name
