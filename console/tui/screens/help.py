"""Every key, grouped by where it works, read from the bindings themselves so it cannot drift from them."""

from __future__ import annotations

from typing import ClassVar, Iterable

from rich.table import Table
from rich.text import Text
from textual.app import ComposeResult
from textual.binding import Binding, BindingType
from textual.containers import Vertical, VerticalScroll
from textual.screen import ModalScreen
from textual.widgets import Label, Static

from ..widgets.dispatched import DispatchedTable
from ..widgets.finished import FinishedTable
from ..widgets.table import WindowTable
from .confirm import ConfirmScreen
from .detail import JobDetailScreen
from .main import MainScreen
from .quit import QuitScreen
from .submit import SubmitScreen

# Keys Textual provides rather than our BINDINGS.
BUILT_IN = [
    ("tab / shift+tab", "next / previous pane (or field)"),
    ("ctrl+p", "command palette: every action by name"),
]
FILTER_NOTE = ("/ then text", "show rows matching text; /!text hides them; esc clears")


def _bindings(bindings: Iterable[BindingType]) -> list[Binding]:
    return [b for b in bindings if isinstance(b, Binding) and b.description]


def key_sections(app_bindings: Iterable[BindingType]) -> list[tuple[str, list[Binding]]]:
    """(section title, bindings) for every place a key works."""
    return [
        ("Everywhere", _bindings(app_bindings)),
        ("Main screen", _bindings(MainScreen.BINDINGS)),
        ("Any table", _bindings(WindowTable.BINDINGS)),
        ("Dispatched", _bindings(DispatchedTable.BINDINGS)),
        ("Finished", _bindings(FinishedTable.BINDINGS)),
        ("Job detail", _bindings(JobDetailScreen.BINDINGS)),
        ("Submit form", _bindings(SubmitScreen.BINDINGS)),
        ("Confirm", _bindings(ConfirmScreen.BINDINGS)),
        ("Quit with jobs in flight", _bindings(QuitScreen.BINDINGS)),
    ]


class HelpScreen(ModalScreen[None]):
    """`esc`, `?` or `q` closes it."""

    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("escape,question_mark,q", "close", "Close"),
    ]

    def __init__(self, sections: list[tuple[str, list[Binding]]]) -> None:
        super().__init__()
        self.sections = sections
        self.rows: list[tuple[str, str]] = []  # (keys, what they do), as shown

    def compose(self) -> ComposeResult:
        table = Table.grid(padding=(0, 2))
        table.add_column(style="bold", no_wrap=True)
        table.add_column()
        everywhere: set[str] = set()
        for title, bindings in self.sections:
            table.add_row(Text(title, style="underline"), "")
            seen: set[str] = set()
            for binding in bindings:
                keys = " / ".join(self.app.get_key_display(Binding(k, "")) for k in binding.key.split(","))
                if keys in seen or (binding.action.startswith("app.") and keys in everywhere):
                    continue  # shown once: a screen's shortcut to an app-wide key is the same key
                seen.add(keys)
                self.rows.append((keys, binding.description))
                table.add_row(keys, binding.description)
            if title == "Everywhere":
                everywhere = seen
            if title == "Main screen":
                for row in (FILTER_NOTE, *BUILT_IN):
                    self.rows.append(row)
                    table.add_row(*row)
            table.add_row("", "")
        with Vertical(id="help-dialog", classes="dialog"):
            yield Label("Keys", id="title")
            with VerticalScroll():
                yield Static(table, id="keys")
            yield Label("esc closes", classes="muted")

    def action_close(self) -> None:
        self.dismiss(None)
