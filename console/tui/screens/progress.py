"""The deploy progress modal: a progress bar per host stepping through the deploy; failures with step and log tail."""

from __future__ import annotations

from typing import Any, ClassVar

from textual.app import ComposeResult
from textual.binding import Binding, BindingType
from textual.containers import Horizontal, Vertical, VerticalScroll
from textual.screen import ModalScreen
from textual.widgets import Label, ProgressBar

from ...deploy import STEPS
from ..format import one_line, output

STATE_WORDS = {"running": "", "waiting": "waiting", "ok": "ready", "failed": "FAILED"}
LOG_LINES = 6  # of a failed host's remote agent log


def failure(alias: str, host: dict[str, Any]) -> str:
    """A failed host's "ALIAS: STEP: error — hint" (the master's message may name host and step already)."""
    step = host["step"] or "?"
    prefix = f"{alias}: {step}: "
    error = host["error"][len(prefix):] if host["error"].startswith(prefix) else host["error"]
    return f"{prefix}{error}" + (f" — {host['hint']}" if host["hint"] else "")


def host_status(alias: str, host: dict[str, Any]) -> str:
    """One host's line: where it is and what the master last said about it."""
    if host["state"] == "failed":
        return "failed at " + failure(alias, host)[len(alias) + 2:]
    if host["state"] == "ok":
        return host["message"] or "ready"
    if not host["step"]:
        return "starting"
    return f"{host['step']}: {host['message']}" if host["message"] else host["step"]


def log_tail(host: dict[str, Any]) -> str:
    lines = host["log_tail"].rstrip("\n").splitlines()[-LOG_LINES:] if host["log_tail"].strip() else []
    return "\n".join(f"| {line}" for line in lines)


class DeployProgressScreen(ModalScreen[None]):
    """Shows one operation as the app feeds it (show()); `esc` hides it, the operation carries on in the master."""

    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("escape", "close", "Close"),
    ]

    def __init__(self, aliases: list[str], title: str = "Deploying") -> None:
        super().__init__()
        self.aliases = list(aliases)
        self.title_text = title
        self.op_id: str | None = None
        self.done = False
        self.hosts: dict[str, dict[str, Any]] = {}

    def compose(self) -> ComposeResult:
        with Vertical(id="progress-dialog", classes="dialog"):
            yield Label(f"{self.title_text} {len(self.aliases)} host{'s' if len(self.aliases) != 1 else ''}",
                        id="title", markup=False)
            yield Label(" › ".join(STEPS), classes="muted steps", markup=False)
            with VerticalScroll(id="progress-hosts"):
                for i, alias in enumerate(self.aliases):
                    with Horizontal(classes="host-row", id=f"row-{i}"):
                        yield Label(alias, classes="host-alias", markup=False)
                        yield ProgressBar(total=1.0, show_eta=False, id=f"bar-{i}")
                        yield Label("", classes="host-state", id=f"state-{i}", markup=False)
                    yield Label("waiting for the master", classes="host-status muted", id=f"status-{i}", markup=False)
                    yield Label("", classes="host-log", id=f"log-{i}", markup=False)
            yield Label("", id="progress-summary", markup=False)
            yield Label("esc closes (the deploy carries on in the master)", classes="muted")

    def show(self, snapshot: dict[str, Any]) -> None:
        """A new progress snapshot of this screen's operation."""
        self.op_id = snapshot["id"]
        self.hosts = snapshot["hosts"]
        for i, alias in enumerate(self.aliases):
            host = snapshot["hosts"].get(alias)
            if host is None:
                continue
            bar = self.query_one(f"#bar-{i}", ProgressBar)
            bar.update(progress=host["progress"])
            bar.set_class(host["state"] == "failed", "-failed")
            bar.set_class(host["state"] == "ok", "-ok")
            state = self.query_one(f"#state-{i}", Label)
            state.update(STATE_WORDS.get(host["state"], host["state"]))
            for name in ("ok", "failed", "waiting"):
                state.set_class(host["state"] == name, f"-{name}")
            status = self.query_one(f"#status-{i}", Label)
            status.update(one_line(host_status(alias, host)))
            status.set_class(host["state"] == "failed", "-failed")
            tail = self.query_one(f"#log-{i}", Label)
            tail.update(output(log_tail(host)) if host["state"] == "failed" else "")  # the host's own words
            tail.display = bool(host["state"] == "failed" and host["log_tail"].strip())
        if snapshot["done"]:
            self.done = True
            ok, failed = snapshot["ok"], snapshot["failed"]
            summary = f"{len(ok)} of {len(self.aliases)} ready" + (f"; failed: {', '.join(failed)}" if failed else "")
            self.query_one("#progress-summary", Label).update(one_line(summary))

    def action_close(self) -> None:
        self.dismiss(None)
