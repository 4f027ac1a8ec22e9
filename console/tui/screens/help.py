"""Every key, grouped by where it works, read from the bindings themselves so it cannot drift from them."""

from __future__ import annotations

from typing import ClassVar, Iterable

from rich.text import Text
from textual.app import ComposeResult
from textual.binding import Binding, BindingType
from textual.containers import Vertical, VerticalScroll
from textual.screen import ModalScreen
from textual.widgets import Label, Static

from ..widgets.dispatched import DispatchedTable
from ..widgets.finished import FinishedTable
from ..widgets.table import WindowTable
from ..widgets.workers import WorkersTable
from .confirm import ConfirmScreen
from .deploy import DeployScreen
from .detail import JobDetailScreen
from .hostkey import HostKeyScreen
from .main import MainScreen
from .progress import DeployProgressScreen
from .quit import QuitScreen
from .submit import SubmitScreen

# Keys Textual provides rather than our BINDINGS.
BUILT_IN = [
    ("tab / shift+tab", "next / previous pane (or field)"),
    ("ctrl+p", "command palette: every action by name"),
]
FILTER_NOTE = ("/ then text", "only rows matching text; /!text hides them")


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
        ("Workers", _bindings(WorkersTable.BINDINGS)),
        ("Job detail", _bindings(JobDetailScreen.BINDINGS)),
        ("Submit form", _bindings(SubmitScreen.BINDINGS)),
        ("Deploy form", _bindings(DeployScreen.BINDINGS)),
        ("Deploy progress", _bindings(DeployProgressScreen.BINDINGS)),
        ("Unknown host key", _bindings(HostKeyScreen.BINDINGS)),
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
        self.rows: list[tuple[str, str]] = []  # (keys, what they do) as shown; ("heading", "") for a section

    def compose(self) -> ComposeResult:
        everywhere: set[str] = set()
        for title, bindings in self.sections:
            self.rows.append((title, ""))  # a section heading
            seen: set[str] = set()
            for binding in bindings:
                keys = " / ".join(self.app.get_key_display(Binding(k, "")) for k in binding.key.split(","))
                if keys in seen or (binding.action.startswith("app.") and keys in everywhere):
                    continue  # shown once: a screen's shortcut to an app-wide key is the same key
                seen.add(keys)
                self.rows.append((keys, binding.description))
            if title == "Everywhere":
                everywhere = seen
            if title == "Main screen":
                self.rows += [FILTER_NOTE, *BUILT_IN]
        # Laid out once as plain Text (a Rich Table would be measured again every time it shows).
        width = max(len(keys) for keys, what in self.rows if what) + 2
        text = Text()
        for keys, what in self.rows:
            if not what:
                text.append(f"\n{keys}\n", style="underline")
            else:
                text.append(f"{keys:<{width}}", style="bold")
                text.append(f"{what}\n")
        with Vertical(id="help-dialog", classes="dialog"):
            yield Label("Keys", id="title")
            with VerticalScroll():
                yield Static(text, id="keys")
            yield Label("esc closes", classes="muted")

    def action_close(self) -> None:
        self.dismiss(None)
