"""The submit modal: command, count, priority, timeout, retries, tags; bad values are shown inline, nothing is sent."""

from __future__ import annotations

import math
from typing import ClassVar

from textual.app import ComposeResult
from textual.binding import Binding, BindingType
from textual.containers import Horizontal, Vertical
from textual.screen import ModalScreen
from textual.widgets import Input, Label

from corral.agent.protocol import JobSpec

MAX_COUNT = 100_000  # copies from one form; beyond this, a script with the Client is the better tool
MAX_RETRIES = 100  # as the master's

# (field id, label, placeholder, default)
FIELDS = (
    ("command", "command", "a shell command, e.g. echo hello", ""),
    ("count", "count", "copies (each gets CORRAL_INDEX=0..N-1)", "1"),
    ("priority", "priority", "higher runs first", "0"),
    ("timeout", "timeout", "seconds (empty: none)", ""),
    ("retries", "retries", "re-runs after a failure", "0"),
    ("tags", "tags", "comma-separated; runs only on agents with all of them", ""),
)


def parse_submission(values: dict[str, str]) -> tuple[list[JobSpec], dict[str, str]]:
    """The specs the form describes, or the errors by field (then no specs)."""
    errors: dict[str, str] = {}
    command = values.get("command", "").strip()
    if not command:
        errors["command"] = "give a command, e.g. echo hello"

    def whole(field: str, low: int, high: int | None = None) -> int:
        text = values.get(field, "").strip() or "0"
        try:
            value = int(text)
        except ValueError:
            errors[field] = f"must be a whole number, not {text!r}"
            return 0
        if value < low or (high is not None and value > high):
            errors[field] = f"must be from {low} to {high:,}" if high is not None else f"must be at least {low}"
        return value

    copies = whole("count", 1, MAX_COUNT)
    priority = whole("priority", -(10**9), 10**9)
    retries = whole("retries", 0, MAX_RETRIES)
    timeout: float | None = None
    text = values.get("timeout", "").strip()
    if text:
        try:
            timeout = float(text)
        except ValueError:
            errors["timeout"] = f"must be a number of seconds, not {text!r}"
        else:
            if not math.isfinite(timeout) or timeout <= 0:
                errors["timeout"] = f"must be a positive number of seconds, not {text!r}"
    tags = tuple(sorted({t.strip() for t in values.get("tags", "").split(",") if t.strip()}))
    if any(" " in t for t in tags):
        errors["tags"] = "tags are single words, separated by commas"
    if errors:
        return [], errors
    specs = [JobSpec(command=command, priority=priority, timeout=timeout, retries=retries, tags=tags,
                     env={"CORRAL_INDEX": str(i)} if copies > 1 else {})
             for i in range(copies)]
    return specs, {}


class SubmitScreen(ModalScreen[list[JobSpec] | None]):
    """`enter` submits (from any field), `esc` cancels, `tab` moves between fields."""

    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("escape", "cancel", "Cancel"),
        Binding("enter", "submit", "Submit", show=False),
    ]

    def compose(self) -> ComposeResult:
        with Vertical(id="submit-dialog", classes="dialog"):
            yield Label("Submit a job", id="title")
            for field, label, placeholder, default in FIELDS:
                with Horizontal(classes="field"):
                    yield Label(label, classes="field-label")
                    yield Input(default, placeholder=placeholder, id=field, compact=True)
                yield Label("", id=f"{field}-error", classes="field-error", markup=False)
            yield Label("enter submits · esc cancels · tab next field", classes="muted")

    def on_screen_resume(self) -> None:
        """Shown (again): a fresh form. The app keeps one instance, as building it is the slow part."""
        for field, _label, _placeholder, default in FIELDS:
            self.query_one(f"#{field}", Input).value = default
            self.query_one(f"#{field}-error", Label).display = False
        self.query_one("#command", Input).focus()

    def on_input_submitted(self, event: Input.Submitted) -> None:
        event.stop()
        self.action_submit()

    def action_submit(self) -> None:
        values = {field: self.query_one(f"#{field}", Input).value for field, *_ in FIELDS}
        specs, errors = parse_submission(values)
        for field, *_ in FIELDS:
            label = self.query_one(f"#{field}-error", Label)
            label.update(errors.get(field, ""))
            label.display = field in errors
        if errors:
            first = next(field for field, *_ in FIELDS if field in errors)
            self.query_one(f"#{first}", Input).focus()
            return
        self.dismiss(specs)

    def action_cancel(self) -> None:
        self.dismiss(None)
