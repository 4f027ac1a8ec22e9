"""The main screen: stats header, the Dispatched, Finished and Workers panes, the filter bar and the footer."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar, cast

from textual.app import ComposeResult
from textual.binding import Binding, BindingType
from textual.screen import Screen
from textual.widgets import Input

from corral.agent.protocol import JobSpec

from ..messages import CancelJobs, DeployAgents, LoadDeployHosts, RequeueJobs, StopAgents, SubmitJobs, WatchViews, WindowMoved
from ..widgets.dispatched import DispatchedTable
from ..widgets.finished import FinishedTable
from ..widgets.keybar import KeyBar
from ..widgets.stats import StatsHeader
from ..widgets.table import WindowTable
from ..widgets.workers import WorkersTable, worker_row
from .confirm import ConfirmScreen
from .deploy import DeployRequest, DeployScreen
from .detail import JobDetailScreen
from .submit import SubmitScreen

if TYPE_CHECKING:
    from ..app import CorralApp


def parse_filter(text: str) -> tuple[str, bool]:
    """`text` matches, `!text` hides the matches; case does not matter."""
    text = text.strip()
    if text.startswith("!"):
        return text[1:].strip().lower(), True
    return text.lower(), False


class MainScreen(Screen[None]):
    """Everything at once, every action a key away."""

    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("n", "submit", "Submit"),
        Binding("d", "deploy", "Deploy"),
        # priority: the app runs it as it reads the key, before it hands the next key to whatever has
        # focus; a plain binding runs later, in the table's own queue, after the keys typed behind `/`
        # were already handed to the table (j moved its cursor, c asked to cancel, n opened the form).
        Binding("slash", "filter", "Filter", priority=True),
        Binding("escape", "close_filter", "Clear filter", show=False),
        # The job panes bind c and r themselves; here they only catch the Workers pane, to say so.
        Binding("c", "cancel", "", show=False),
        Binding("r", "requeue", "", show=False),
        Binding("question_mark", "app.help", "Help"),
        Binding("q", "app.request_quit", "Quit"),
    ]

    def __init__(self) -> None:
        super().__init__()
        self.filter_target: WindowTable[Any] | None = None
        self._stashed: tuple[dict[str, Any], dict[str, dict[str, Any]]] | None = None

    def compose(self) -> ComposeResult:
        yield StatsHeader(id="stats")
        yield DispatchedTable(id="dispatched")
        yield FinishedTable(id="finished")
        yield WorkersTable(id="workers")
        yield Input(id="filter", compact=True, placeholder="filter: text shows matches, !text hides them · enter keeps · esc clears")
        yield KeyBar()

    def on_mount(self) -> None:
        self.query_one(DispatchedTable).focus()

    @property
    def dispatched_pane(self) -> DispatchedTable:
        return self.query_one(DispatchedTable)

    @property
    def finished_pane(self) -> FinishedTable:
        return self.query_one(FinishedTable)

    @property
    def workers_pane(self) -> WorkersTable:
        return self.query_one(WorkersTable)

    def focused_table(self) -> WindowTable[Any]:
        focused = self.focused
        if isinstance(focused, WindowTable):
            return focused
        return self.filter_target or self.dispatched_pane

    # ---- data in ------------------------------------------------------------------------

    def show_snapshot(self, snapshot: dict[str, Any], views: dict[str, dict[str, Any]]) -> None:
        if not self.is_active:
            # Under a dialog or the detail screen: keep the latest, draw it on return. Repainting a
            # hidden screen four times a second only slows the screen in front. A later look that
            # brought no rows (nothing changed) keeps the rows of the one before.
            if self._stashed is not None:
                old, old_views = self._stashed
                for name in ("dispatched", "finished"):
                    if name not in snapshot and name in old:
                        snapshot, views = {**snapshot, name: old[name]}, {**views, name: old_views[name]}
            self._stashed = (snapshot, views)
            return
        self._stashed = None
        now = snapshot["now"]
        self.query_one(StatsHeader).show(snapshot)
        panes: tuple[tuple[str, WindowTable[Any]], ...] = (("dispatched", self.dispatched_pane),
                                                           ("finished", self.finished_pane))
        for name, table in panes:
            part, asked = snapshot.get(name), views.get(name)
            # Rows asked under another filter are stale: the next look (already on its way) brings the right ones.
            if part is not None and asked is not None and (asked["match"], asked["invert"]) == (table.match, table.invert):
                table.show(part["offset"], part["total"], table.named(part["rows"]), now, anchor=asked.get("anchor"))
            else:
                table.tick(now)
        self.workers_pane.show_all([worker_row(a) for a in snapshot["agents"]], now)

    def on_screen_resume(self) -> None:
        if self._stashed is not None:
            self.show_snapshot(*self._stashed)

    def master_lost(self, address: tuple[str, int] | None = None, since: float = 0.0) -> None:
        self.query_one(StatsHeader).master_lost(address, since)

    def on_window_moved(self, message: WindowMoved) -> None:
        message.stop()
        self.post_message(WatchViews({"dispatched": self.dispatched_pane.window(), "finished": self.finished_pane.window()}))

    # ---- actions ------------------------------------------------------------------------

    def action_submit(self) -> None:
        def submitted(specs: list[JobSpec] | None) -> None:
            if specs:
                self.post_message(SubmitJobs(specs))

        if not self.app.is_screen_installed("submit"):
            self.app.install_screen(SubmitScreen(), "submit")  # kept: built once, reset each time it shows
            app = cast("CorralApp", self.app)
            app.call_after_refresh(app.freeze_heap)
        self.app.push_screen("submit", submitted)

    def action_deploy(self) -> None:
        """The deploy modal needs the inventory first: the app fetches it, then calls pick_hosts()."""
        self.post_message(LoadDeployHosts())

    def pick_hosts(self, hosts: list[dict[str, Any]]) -> None:
        def picked(request: DeployRequest | None) -> None:
            if request is not None:
                self.post_message(DeployAgents(list(request.aliases), request.slots,
                                               list(request.tags) if request.tags is not None else None))

        self.app.push_screen(DeployScreen(hosts), picked)

    def action_stop_agent(self, drain: bool) -> None:
        """k (stop, after a confirm) or D (drain) on the Workers pane's selected agent, over SSH."""
        row = self.workers_pane.selected()
        if row is None:
            self.notify("no agent selected", severity="warning")
            return
        name, started_by = row.name, row.started_by
        if not started_by.startswith("ssh"):
            self.notify(f"{name} was not deployed over SSH (started by {started_by}): stop it where it runs",
                        severity="warning")
            return
        if row.state == "stopped":
            self.notify(f"{name} is stopped already", severity="warning")
            return
        if drain:
            self.post_message(StopAgents([name], drain=True))
            return

        def confirmed(yes: bool | None) -> None:
            if yes:
                self.post_message(StopAgents([name], drain=False))

        self.app.push_screen(ConfirmScreen(f"Stop agent {name} on {row.host}?",
                                           f"Its {row.busy} running job(s) are killed and go back to the queue. "
                                           "D drains instead: running jobs finish first."), confirmed)

    def action_open(self) -> None:
        table = self.focused_table()
        if isinstance(table, WorkersTable):
            return
        row = table.selected()
        if row is None:
            self.notify("no job selected", severity="warning")
            return
        self.app.push_screen(JobDetailScreen(row.id))

    def action_cancel(self) -> None:
        table = self.focused_table()
        if not isinstance(table, DispatchedTable):
            self.notify("c cancels queued or running jobs: tab to Dispatched", severity="warning")
            return
        ids = table.targets()
        if not ids:
            self.notify("no job selected to cancel", severity="warning")
            return
        if len(ids) == 1:
            row = table.selected()
            what = f" ({row.what})" if row is not None and row.id == ids[0] else ""
            question = f"Cancel job {ids[0]}{what}?"
        else:
            question = f"Cancel {len(ids)} marked jobs ({', '.join(map(str, ids[:5]))}{', …' if len(ids) > 5 else ''})?"

        def confirmed(yes: bool | None) -> None:
            if yes:
                table.clear_marks()
                self.post_message(CancelJobs(ids))

        self.app.push_screen(ConfirmScreen(question, "Running jobs are killed; queued ones never start."), confirmed)

    def action_requeue(self) -> None:
        table = self.focused_table()
        if not isinstance(table, FinishedTable):
            self.notify("r requeues finished jobs: tab to Finished", severity="warning")
            return
        ids = table.targets()
        if not ids:
            self.notify("no job selected to requeue", severity="warning")
            return
        table.clear_marks()
        self.post_message(RequeueJobs(ids))

    def action_focus_pane(self, pane: str) -> None:
        self.query_one(f"#{pane}", WindowTable).focus()

    # ---- the filter bar -----------------------------------------------------------------

    def action_filter(self) -> None:
        bar = self.query_one("#filter", Input)
        if self.focused is bar:  # `/` typed in the filter itself (a path, `a/b`): it is text there
            bar.insert_text_at_cursor("/")
            return
        target = self.focused_table()
        self.filter_target = target
        bar.value = ("!" if target.invert else "") + target.match
        bar.placeholder = f"filter {target.TITLE}: text shows matches, !text hides them · enter keeps · esc clears"
        bar.display = True
        # Now, not with bar.focus() (which is a call_later, queued behind the keys already read): a key
        # typed right after `/` is in the queue already, and must reach the bar, not the table.
        self.set_focus(bar)

    def on_input_changed(self, event: Input.Changed) -> None:
        if event.input.id == "filter" and self.filter_target is not None:
            self.filter_target.set_filter(*parse_filter(event.value))

    def on_input_submitted(self, event: Input.Submitted) -> None:
        if event.input.id == "filter":
            self._hide_filter()

    def action_close_filter(self) -> None:
        bar = self.query_one("#filter", Input)
        if bar.display and self.filter_target is not None:
            self.filter_target.set_filter("", False)
            self._hide_filter()

    def _hide_filter(self) -> None:
        bar = self.query_one("#filter", Input)
        bar.display = False
        # At once too: a key typed right after enter/esc is for the table again (j, c, enter...).
        self.set_focus(self.filter_target or self.dispatched_pane)
