"""The stats header: counts by state, agents up, slots busy, and a sparkline of jobs finished per second."""

from __future__ import annotations

import time
from typing import Any, ClassVar, Sequence

from rich.console import Group
from rich.text import Text
from textual.reactive import reactive
from textual.widget import Widget

from ..format import count

STATE_STYLES = {"queued": "", "running": "bold", "done": "green", "failed": "red", "timeout": "red",
                "cancelled": "yellow", "lost": "red"}
BARS = "▁▂▃▄▅▆▇█"
SPARK_MAX = 60  # columns: one per second of the last minute


def sparkline(values: Sequence[int], width: int) -> str:
    """The last `width` values as bars, scaled to the largest (all-low when nothing happened)."""
    values = list(values)[-width:] if width > 0 else []
    top = max(values, default=0)
    if top <= 0:
        return BARS[0] * len(values)
    return "".join(BARS[min(len(BARS) - 1, v * (len(BARS) - 1) // top)] if v else BARS[0] for v in values)


class StatsHeader(Widget):
    """Two lines atop the main screen, drawn as one renderable: a new snapshot is a repaint, not a layout."""

    COMPONENT_CLASSES: ClassVar[set[str]] = {"stats--spark"}

    connected: reactive[bool] = reactive(True)
    """Whether the master answered the last look."""

    def __init__(self, *, id: str | None = None) -> None:
        super().__init__(id=id)
        self.last: dict[str, Any] = {}
        self.lost_at: tuple[str, int] | None = None  # the address of the master lost (None: none ever answered)
        self.lost_since = 0.0

    def show(self, snapshot: dict[str, Any]) -> None:
        self.last = snapshot
        self.connected = True
        self.refresh()

    def master_lost(self, address: tuple[str, int] | None, since: float) -> None:
        """The console lost its master: the header says so, with where it was and since when, until
        the next snapshot (the poller keeps trying)."""
        self.lost_at, self.lost_since = address, since or time.time()
        self.connected = False
        self.refresh()

    def counts_text(self) -> Text:
        counts = self.last.get("counts", {})
        line = Text(no_wrap=True, overflow="crop")
        for state, style in STATE_STYLES.items():
            n = counts.get(state, 0)
            if line:
                line.append("  ")
            line.append(f"{state} ", style="dim")
            line.append(count(n), style=style if n else "dim")
            if state == "running" and counts.get("assigned"):
                # Taken by agents, not started yet (prefetched): apart from the running, never among them.
                line.append(f" +{count(counts['assigned'])} assigned", style="dim")
        return line

    def status_text(self) -> Text:
        snapshot = self.last
        agents = snapshot.get("agents", [])
        up = sum(1 for a in agents if a["state"] in ("up", "draining"))
        lost = sum(1 for a in agents if a["state"] == "lost")
        rate = snapshot.get("rate", [])
        info = Text(no_wrap=True, overflow="crop")
        if self.connected:
            info.append("● master up", style="green")
        else:
            info.append(f"✕ {self.down_text()}", style="bold red")
        journal = snapshot.get("journal") or {}
        if self.connected and not journal.get("ok", True):
            info.append("  ✕ journal failing", style="bold red")
            info.append(f" ({journal.get('refused', 0)} writes refused)", style="red")
        info.append("  agents ", style="dim")
        info.append(f"{up}/{len(agents)} up", style="bold" if up else "red")
        if lost:
            info.append(f" {lost} lost", style="bold red")
        info.append("  slots ", style="dim")
        info.append(f"{snapshot.get('busy', 0)}/{snapshot.get('slots', 0)} busy")  # running jobs only
        if snapshot.get("assigned"):
            info.append(f" +{count(snapshot['assigned'])} prefetched", style="dim")
        info.append("  done/s ", style="dim")
        info.append(f"{rate[-1] if rate else 0:,} ")
        room = min(SPARK_MAX, self.size.width - info.cell_len)
        info.append(sparkline(rate, room), style=self.get_component_rich_style("stats--spark"))
        return info

    def down_text(self) -> str:
        """"master down at 127.0.0.1:4000 since 12:03:04 (master unreachable)"."""
        where = f" at {self.lost_at[0]}:{self.lost_at[1]}" if self.lost_at else ""
        since = time.strftime("%H:%M:%S", time.localtime(self.lost_since or time.time()))
        return f"master down{where} since {since} (master unreachable)"

    def render(self) -> Group:
        return Group(self.counts_text(), self.status_text())
