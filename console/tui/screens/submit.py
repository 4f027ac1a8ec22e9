"""The submit modal: command, count, priority, timeout, retries, tags; bad values are shown inline, nothing is sent."""

from __future__ import annotations

from typing import Any, Callable, ClassVar

from textual.app import ComposeResult
from textual.binding import Binding, BindingType
from textual.containers import Horizontal, Vertical
from textual.screen import ModalScreen
from textual.widgets import Input, Label

from corral.agent.protocol import JobSpec

from ...master.validate import (Invalid, command_rule, parse_count, parse_priority, parse_retries, parse_tags,
                                parse_timeout, size_rule, validate)

_REQUIRED = object()  # parse_submission's marker: a field that may not be left blank

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
    """The specs the form describes, or the errors by field (then no specs). Each field is read by the
    job-spec rules the CLI and the master use (master/validate.py)."""
    errors: dict[str, str] = {}

    def read(field: str, parse: Callable[[str], Any], empty: Any = _REQUIRED) -> Any:
        """The field's value; `empty` when left blank (unless required)."""
        text = values.get(field, "").strip()
        if not text and empty is not _REQUIRED:
            return empty
        try:
            return parse(text)
        except Invalid as exc:
            errors[field] = exc.problem
            return None

    command = values.get("command", "").strip()
    if not command:
        errors["command"] = "give a command, e.g. echo hello"
    else:
        try:
            size_rule(command_rule(command), None)
        except Invalid as exc:
            errors["command"] = exc.problem
    copies = read("count", parse_count)
    priority = read("priority", parse_priority, 0)
    timeout = read("timeout", parse_timeout, None)
    retries = read("retries", parse_retries, 0)
    tags = read("tags", parse_tags, ())
    if errors:
        return [], errors
    base = validate(JobSpec(command=command, priority=priority, timeout=timeout, retries=retries, tags=tags))
    # One spec checked; its copies differ only by CORRAL_INDEX, which every rule allows.
    specs = [JobSpec(command=base.command, priority=base.priority, timeout=base.timeout, retries=base.retries,
                     tags=base.tags, env={"CORRAL_INDEX": str(i)} if copies > 1 else {})
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
