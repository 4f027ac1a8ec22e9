"""The deploy modal: pick hosts from the inventory, optional slots and tags; it returns a DeployRequest or None."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, ClassVar

from textual.app import ComposeResult
from textual.binding import Binding, BindingType
from textual.containers import Horizontal, Vertical
from textual.screen import ModalScreen
from textual.widgets import Input, Label, SelectionList
from textual.widgets.selection_list import Selection

MAX_SLOTS = 4096  # as the master's
TAG_RE = re.compile(r"^[A-Za-z0-9._:-]+$")  # as the inventory's (not imported: it would load paramiko)


@dataclass(frozen=True)
class DeployRequest:
    """What the operator asked for: these hosts, and slots/tags overriding the hosts' own (None: keep them)."""

    aliases: tuple[str, ...]
    slots: int | None = None
    tags: tuple[str, ...] | None = None


def host_line(host: dict[str, Any]) -> str:
    """One inventory host as the picker shows it: alias, target, slots, tags, what is deployed there."""
    target = f"{host['user']}@{host['hostname']}" + (f":{host['port']}" if host["port"] != 22 else "")
    tags = ",".join(host["tags"]) or "-"
    record = host.get("deployed")
    if not record:
        there = "not deployed"
    elif record.get("stopped"):
        there = "stopped"
    else:
        there = f"agent pid {record['pid']}"
    return f"{host['alias']:<12} {target:<28} slots {host['slots'] or 'auto':<5} tags {tags:<12} {there}"


def parse_deploy(aliases: list[str], slots_text: str, tags_text: str) -> tuple[DeployRequest | None, dict[str, str]]:
    """The request the form describes, or the errors by field (then None)."""
    errors: dict[str, str] = {}
    if not aliases:
        errors["hosts"] = "pick one or more hosts (space)"
    slots: int | None = None
    if slots_text.strip():
        try:
            slots = int(slots_text.strip())
        except ValueError:
            errors["slots"] = f"must be a whole number, not {slots_text.strip()!r}"
        else:
            if not 1 <= slots <= MAX_SLOTS:
                errors["slots"] = f"must be from 1 to {MAX_SLOTS:,}"
    tags: tuple[str, ...] | None = None
    if tags_text.strip():
        tags = tuple(sorted({t.strip() for t in tags_text.split(",") if t.strip()}))
        bad = [t for t in tags if not TAG_RE.match(t)]
        if bad:
            errors["tags"] = f"bad tag {bad[0]!r}: use letters, digits, '.', '_', ':' and '-'"
    if errors:
        return None, errors
    return DeployRequest(tuple(aliases), slots, tags), {}


class DeployScreen(ModalScreen[DeployRequest | None]):
    """`space` picks a host, `enter` deploys (from anywhere in the form), `esc` cancels."""

    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("escape", "cancel", "Cancel"),
        Binding("enter", "deploy", "Deploy", priority=True),
    ]

    def __init__(self, hosts: list[dict[str, Any]]) -> None:
        super().__init__()
        self.hosts = hosts

    def compose(self) -> ComposeResult:
        with Vertical(id="deploy-dialog", classes="dialog"):
            yield Label("Deploy agents over SSH", id="title")
            if self.hosts:
                yield SelectionList[str](*(Selection(host_line(h), h["alias"]) for h in self.hosts), id="hosts")
            else:
                yield Label("no hosts: add one with `corral hosts add ALIAS --hostname ...` or in ~/.ssh/config",
                            classes="muted", markup=False)
            yield Label("", id="hosts-error", classes="field-error", markup=False)
            for field, placeholder in (("slots", "per host (empty: each host's own)"),
                                       ("tags", "comma-separated (empty: each host's own)")):
                with Horizontal(classes="field"):
                    yield Label(field, classes="field-label")
                    yield Input(placeholder=placeholder, id=field, compact=True)
                yield Label("", id=f"{field}-error", classes="field-error", markup=False)
            yield Label("space picks · enter deploys · esc cancels · tab next field", classes="muted")

    def on_mount(self) -> None:
        if self.hosts:
            self.query_one("#hosts", SelectionList).focus()
        else:
            self.query_one("#slots", Input).focus()

    def picked(self) -> list[str]:
        """The picked aliases, in inventory order."""
        if not self.hosts:
            return []
        chosen = set(self.query_one("#hosts", SelectionList).selected)
        return [h["alias"] for h in self.hosts if h["alias"] in chosen]

    def action_deploy(self) -> None:
        request, errors = parse_deploy(self.picked(), self.query_one("#slots", Input).value,
                                       self.query_one("#tags", Input).value)
        for field in ("hosts", "slots", "tags"):
            label = self.query_one(f"#{field}-error", Label)
            label.update(errors.get(field, ""))
            label.display = field in errors
        if request is None:
            return
        self.dismiss(request)

    def action_cancel(self) -> None:
        self.dismiss(None)
