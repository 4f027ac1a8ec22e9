"""The stats header: counts by state, agents up, slots busy, and a sparkline of jobs finished per second."""

from __future__ import annotations

from typing import Any

from rich.text import Text
from textual.app import ComposeResult
from textual.containers import Horizontal
from textual.reactive import reactive
from textual.widget import Widget
from textual.widgets import Sparkline, Static

from ..format import count

STATE_STYLES = {"queued": "", "running": "bold", "done": "green", "failed": "red", "timeout": "red",
                "cancelled": "yellow", "lost": "red"}


class StatsHeader(Widget):
    """Two lines atop the main screen; fed from each snapshot."""

    connected: reactive[bool] = reactive(True)
    """Whether the master answered the last look."""

    def __init__(self, *, id: str | None = None) -> None:
        super().__init__(id=id)
        self.last: dict[str, Any] = {}

    def compose(self) -> ComposeResult:
        yield Static(id="counts")
        with Horizontal(id="agents-line"):
            yield Static(id="agents")
            yield Sparkline([0.0], id="rate")

    def show(self, snapshot: dict[str, Any]) -> None:
        self.last = snapshot
        self.connected = True
        self._draw()

    def watch_connected(self, connected: bool) -> None:
        if self.last:
            self._draw()

    def _draw(self) -> None:
        snapshot = self.last
        counts = snapshot["counts"]
        line = Text()
        for state, style in STATE_STYLES.items():
            n = counts.get(state, 0)
            if line:
                line.append("  ")
            line.append(f"{state} ", style="dim")
            line.append(count(n), style=style if n else "dim")
        self.query_one("#counts", Static).update(line)
        agents = snapshot["agents"]
        up = sum(1 for a in agents if a["state"] != "lost")
        rate = snapshot["rate"]
        info = Text()
        info.append("● master up" if self.connected else "✕ master unreachable",
                    style="green" if self.connected else "bold red")
        info.append("  agents ", style="dim")
        info.append(f"{up}/{len(agents)} up", style="bold" if up else "red")
        info.append("  slots ", style="dim")
        info.append(f"{snapshot['busy']}/{snapshot['slots']} busy")
        info.append("  done/s ", style="dim")
        info.append(f"{rate[-1] if rate else 0:,} ")
        self.query_one("#agents", Static).update(info)
        self.query_one("#rate", Sparkline).data = [float(n) for n in rate] or [0.0]
