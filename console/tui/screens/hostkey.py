"""The host-key modal: an unknown host's key type and SHA256 fingerprint; it returns True (accept) or False."""

from __future__ import annotations

from typing import Any, ClassVar

from textual.app import ComposeResult
from textual.binding import Binding, BindingType
from textual.containers import Horizontal, Vertical
from textual.screen import ModalScreen
from textual.widgets import Button, Label

from ..format import one_line


class HostKeyScreen(ModalScreen[bool]):
    """`a` accepts (the key goes to corral's known_hosts), `r`/esc rejects (that host's deploy fails)."""

    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("a", "answer(True)", "Accept key"),
        Binding("r,escape", "answer(False)", "Reject key"),
    ]

    def __init__(self, op_id: str, question: dict[str, Any]) -> None:
        """`question`: one of Client.deploy_progress()'s questions (alias, host_id, key_type, fingerprint)."""
        super().__init__()
        self.op_id = op_id
        self.alias: str = question["alias"]
        self.host_id: str = question["host_id"]
        self.key_type: str = question["key_type"]
        self.fingerprint: str = question["fingerprint"]

    def compose(self) -> ComposeResult:
        with Vertical(id="hostkey-dialog", classes="dialog"):
            # The key type and the host's name come from the host itself (or its DNS): escaped.
            yield Label(one_line(f"Unknown host key for {self.alias}"), id="question", markup=False)
            yield Label(one_line(f"host         {self.host_id}"), id="host", markup=False)
            yield Label(one_line(f"key type     {self.key_type}"), id="key-type", markup=False)
            yield Label(one_line(f"fingerprint  {self.fingerprint}"), id="fingerprint", markup=False)
            yield Label("It is in no known_hosts file. Accept it only if it is the key you expect "
                        "(ssh-keygen -lf on the host's key shows it); accepted keys go to corral's known_hosts.",
                        classes="muted", markup=False)
            with Horizontal(classes="buttons"):
                yield Button("Accept (a)", id="accept", variant="warning")
                yield Button("Reject (r)", id="reject")

    def on_mount(self) -> None:
        self.query_one("#reject", Button).focus()  # enter on a reflex must not trust a key

    def on_button_pressed(self, event: Button.Pressed) -> None:
        self.dismiss(event.button.id == "accept")

    def action_answer(self, accept: bool) -> None:
        self.dismiss(accept)
