"""Quitting with jobs in flight: stop the master and its local agent, or detach and leave them running."""

from __future__ import annotations

from typing import ClassVar

from textual.app import ComposeResult
from textual.binding import Binding, BindingType
from textual.containers import Horizontal, Vertical
from textual.screen import ModalScreen
from textual.widgets import Button, Label

STOP, DETACH = "stop", "detach"


class QuitScreen(ModalScreen[str | None]):
    """Returns "stop", "detach", or None (stay)."""

    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("s", "choose('stop')", "Stop"),
        Binding("d", "choose('detach')", "Detach"),
        Binding("escape", "choose(None)", "Stay"),
    ]

    def __init__(self, queued: int, running: int) -> None:
        super().__init__()
        self.queued = queued
        self.running = running

    def compose(self) -> ComposeResult:
        with Vertical(id="quit-dialog", classes="dialog"):
            yield Label(f"{self.queued:,} jobs queued, {self.running:,} running.", id="question")
            yield Label("Stop: the master and the local agent stop; queued jobs wait in the journal,"
                        " running ones run again when corral starts.", classes="muted")
            yield Label("Detach: leave them running; `corral` re-attaches later.", classes="muted")
            with Horizontal(classes="buttons"):
                yield Button("Stop (s)", id="stop", variant="error")
                yield Button("Detach (d)", id="detach", variant="primary")
                yield Button("Stay (esc)", id="stay")

    def on_mount(self) -> None:
        self.query_one("#detach", Button).focus()

    def on_button_pressed(self, event: Button.Pressed) -> None:
        self.dismiss(event.button.id if event.button.id in (STOP, DETACH) else None)

    def action_choose(self, choice: str | None) -> None:
        self.dismiss(choice)
