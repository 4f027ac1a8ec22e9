"""CorralApp: the console's App. Global keys, the worker threads that talk to the master, and message routing."""

from __future__ import annotations

import functools

import gc
import logging
from pathlib import Path
from typing import Any, ClassVar, Iterable

from textual import work
from textual.worker import get_current_worker
from textual.app import App, SystemCommand
from textual.notifications import SeverityLevel
from textual.binding import Binding, BindingType
from textual.reactive import reactive
from textual.screen import Screen
from textual.worker import Worker, WorkerState

from corral.agent.errors import CorralError

from corral.agent.protocol import JobSpec

from ..client import Client
from ..escape import escape
from .format import one_line
from .messages import (
    AnswerHostKey,
    CancelJobs,
    DeployAgents,
    DeployHostsLoaded,
    JobLoaded,
    JobsCancelled,
    JobsRequeued,
    JobsSubmitted,
    LoadDeployHosts,
    LoadJob,
    MasterFound,
    MasterLost,
    OperationProgressed,
    RequeueJobs,
    SnapshotArrived,
    StopAgents,
    SubmitJobs,
    WatchViews,
)
from .poller import POLL_SECONDS, Poller
from .screens.detail import JobDetailScreen
from .screens.help import HelpScreen, key_sections
from .screens.hostkey import HostKeyScreen
from .screens.main import MainScreen
from .screens.progress import DeployProgressScreen, failure
from .screens.quit import DETACH, STOP, QuitScreen

log = logging.getLogger(__name__)

PROGRESS_WAIT = 0.5  # each look at an operation's progress long-polls this long: a stopped worker ends soon


class CorralApp(App[str]):
    """Exits with "stop" (stop the master and local agent this console owns) or "detach" (leave them)."""

    CSS_PATH = "corral.tcss"
    TITLE = "corral"
    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("q", "request_quit", "Quit"),
        Binding("ctrl+c", "request_quit", "Quit", show=False, priority=True),
        Binding("question_mark", "help", "Help"),
    ]

    connected: reactive[bool] = reactive(False)
    """Whether the master answered the poller's last look."""

    def __init__(self, home: Path | None = None, embedded: bool = False, greeting: str = "",
                 poll_interval: float = POLL_SECONDS) -> None:
        """`embedded`: this console (or an earlier one) started the master, so quitting may stop it;
        `greeting`: one line shown at start (what start-up did)."""
        super().__init__()
        self.home = home
        self.embedded = embedded
        self.greeting = greeting
        self.poller = Poller(home, self.post_message, poll_interval)
        self.latest: dict[str, Any] | None = None
        self.asked: set[tuple[str, str, str]] = set()  # (op id, alias, fingerprint) of host-key questions shown

    def notify(self, message: str, *, title: str = "", severity: SeverityLevel = "information",
               timeout: float | None = None, markup: bool = True) -> None:
        """Every notice of the console (screens' too: theirs come here): never parsed as markup, its
        control characters escaped. Notices carry errors and names from the master, agents and hosts."""
        super().notify(escape(message), title=one_line(title), severity=severity, timeout=timeout, markup=False)

    def get_default_screen(self) -> Screen:
        return MainScreen()

    @property
    def main(self) -> MainScreen:
        screen = self.screen_stack[0]
        assert isinstance(screen, MainScreen)
        return screen

    def on_mount(self) -> None:
        self.poll()
        if self.greeting:
            self.notify(self.greeting)

    def on_unmount(self) -> None:
        self.poller.stop()

    # ---- worker threads: each its own Client (a proxy is not shared across threads) -------

    @work(thread=True, exclusive=True, exit_on_error=False, group="poll")
    def poll(self) -> None:
        self.poller.run()

    @work(thread=True, exclusive=True, exit_on_error=False, group="submit")
    def submit_jobs(self, specs: list[JobSpec]) -> None:
        with Client(home=self.home) as client:
            self.post_message(JobsSubmitted(client.submit(specs)))

    @work(thread=True, exclusive=True, exit_on_error=False, group="cancel")
    def cancel_jobs(self, ids: list[int]) -> None:
        with Client(home=self.home) as client:
            self.post_message(JobsCancelled(client.cancel(ids)))

    @work(thread=True, exclusive=True, exit_on_error=False, group="requeue")
    def requeue_jobs(self, ids: list[int]) -> None:
        with Client(home=self.home) as client:
            self.post_message(JobsRequeued(list(zip(ids, client.requeue(ids)))))

    @work(thread=True, exclusive=True, exit_on_error=False, group="detail")
    def load_job(self, job_id: int) -> None:
        with Client(home=self.home) as client:
            self.post_message(JobLoaded(client.job(job_id)))

    @work(thread=True, exclusive=True, exit_on_error=False, group="hosts")
    def load_deploy_hosts(self) -> None:
        with Client(home=self.home) as client:
            self.post_message(DeployHostsLoaded(client.deploy_hosts()))

    @work(thread=True, exclusive=True, exit_on_error=False, group="deploy")
    def deploy_agents(self, aliases: list[str], slots: int | None, tags: list[str] | None) -> None:
        """Ask the master to deploy (interactive: unknown host keys become questions) and follow it to the end."""
        with Client(home=self.home) as client:
            self._follow(client, client.deploy(aliases, slots=slots, tags=tags, interactive=True))

    @work(thread=True, exclusive=False, exit_on_error=False, group="stop")
    def stop_agents(self, aliases: list[str], drain: bool) -> None:
        """Not exclusive: a drain may take as long as its jobs, and a stop of another agent must not wait."""
        with Client(home=self.home) as client:
            self._follow(client, client.stop_agents(aliases, drain=drain))

    @work(thread=True, exclusive=False, exit_on_error=False, group="hostkey")
    def answer_host_key(self, op_id: str, alias: str, fingerprint: str, accept: bool) -> None:
        with Client(home=self.home) as client:
            client.answer_host_key(op_id, alias, fingerprint, accept)

    def _follow(self, client: Client, op_id: str) -> None:
        """Post the operation's progress as it changes until it is done (or this worker is cancelled)."""
        worker = get_current_worker()
        since = 0
        while not worker.is_cancelled:
            snapshot = client.deploy_progress(op_id, since, PROGRESS_WAIT)
            if snapshot["events"] or snapshot["done"] or since == 0:
                self.post_message(OperationProgressed(snapshot))
            since = snapshot["next"]
            if snapshot["done"]:
                return

    def on_worker_state_changed(self, event: Worker.StateChanged) -> None:
        """The one place worker failures surface: one line, never a traceback."""
        if event.state != WorkerState.ERROR:
            return
        error = event.worker.error
        if isinstance(error, CorralError):
            self.notify(str(error), title=f"{event.worker.group} failed", severity="error")
        else:
            log.error("%s worker failed", event.worker.group, exc_info=error)
            self.notify(f"{type(error).__name__}: {error}", title=f"{event.worker.group} failed (a bug)",
                        severity="error")

    # ---- requests from the screens --------------------------------------------------------

    def on_submit_jobs(self, message: SubmitJobs) -> None:
        self.submit_jobs(message.specs)

    def on_cancel_jobs(self, message: CancelJobs) -> None:
        self.cancel_jobs(message.ids)

    def on_requeue_jobs(self, message: RequeueJobs) -> None:
        self.requeue_jobs(message.ids)

    def on_load_job(self, message: LoadJob) -> None:
        self.load_job(message.job_id)

    def on_load_deploy_hosts(self, message: LoadDeployHosts) -> None:
        self.load_deploy_hosts()

    def on_deploy_agents(self, message: DeployAgents) -> None:
        self.push_screen(DeployProgressScreen(message.aliases))
        self.deploy_agents(message.aliases, message.slots, message.tags)

    def on_stop_agents(self, message: StopAgents) -> None:
        self.notify(f"{'draining' if message.drain else 'stopping'} {', '.join(message.aliases)}")
        self.stop_agents(message.aliases, message.drain)

    def on_answer_host_key(self, message: AnswerHostKey) -> None:
        self.answer_host_key(message.op_id, message.alias, message.fingerprint, message.accept)

    def on_watch_views(self, message: WatchViews) -> None:
        self.poller.set_views(message.views)

    # ---- facts from the threads -----------------------------------------------------------

    def on_snapshot_arrived(self, message: SnapshotArrived) -> None:
        if self.latest is None:
            self.call_after_refresh(self.freeze_heap)  # the first screenful is drawn: the app has settled
        self.latest = message.snapshot
        self.connected = True
        if not self.screen_stack:  # the app is closing: the poller's last look arrived after its screens went
            return
        self.main.show_snapshot(message.snapshot, message.views)
        for screen in self.screen_stack:
            if isinstance(screen, JobDetailScreen):
                screen.snapshot_arrived(message.snapshot)

    def on_master_lost(self, message: MasterLost) -> None:
        self.connected = False
        self.main.master_lost(message.address, message.since)
        self.notify(message.message, title="master unreachable", severity="error", timeout=10)

    def on_master_found(self, message: MasterFound) -> None:
        if self.latest is not None:  # a reconnection, not the first look
            self.notify(f"reconnected to the master at {message.address[0]}:{message.address[1]}")

    def on_jobs_submitted(self, message: JobsSubmitted) -> None:
        ids = message.ids
        self.notify(f"queued job {ids[0]}" if len(ids) == 1 else f"queued {len(ids):,} jobs ({ids[0]}–{ids[-1]})")
        self.poller.wake()

    def on_jobs_cancelled(self, message: JobsCancelled) -> None:
        by_outcome: dict[str, list[int]] = {}
        for job_id, what in sorted(message.outcome.items()):
            by_outcome.setdefault(what, []).append(job_id)
        parts = [f"{what} {_ids(ids)}" for what, ids in by_outcome.items()]
        self.notify("; ".join(parts))
        self.poller.wake()

    def on_jobs_requeued(self, message: JobsRequeued) -> None:
        pairs = message.pairs
        text = ", ".join(f"{old} → {new}" for old, new in pairs[:5]) + (" …" if len(pairs) > 5 else "")
        self.notify(f"requeued {text}")
        self.poller.wake()

    def on_deploy_hosts_loaded(self, message: DeployHostsLoaded) -> None:
        self.main.pick_hosts(message.hosts)

    def _host_key_answered(self, key: tuple[str, str, str], accept: bool | None) -> None:
        op_id, alias, fingerprint = key
        self.post_message(AnswerHostKey(op_id, alias, fingerprint, bool(accept)))

    def on_operation_progressed(self, message: OperationProgressed) -> None:
        snapshot = message.snapshot
        if snapshot["kind"] == "deploy":
            for screen in self.screen_stack:
                if isinstance(screen, DeployProgressScreen) and screen.op_id in (None, snapshot["id"]):
                    screen.show(snapshot)
            for question in snapshot["questions"]:
                key = (snapshot["id"], question["alias"], question["fingerprint"])
                # One modal at a time (two pushed in one handler race in Textual); the next comes with a later snapshot.
                if key not in self.asked and not any(isinstance(s, HostKeyScreen) for s in self.screen_stack):
                    self.asked.add(key)
                    self.push_screen(HostKeyScreen(snapshot["id"], question), functools.partial(self._host_key_answered, key))
        if not snapshot["done"]:
            return
        self.poller.wake()
        verb = {"deploy": "deployed", "stop": "stopped"}.get(snapshot["kind"], snapshot["kind"])
        if snapshot["ok"]:
            self.notify(f"{verb} {', '.join(snapshot['ok'])}")
        for alias in snapshot["failed"]:
            self.notify(failure(alias, snapshot["hosts"][alias]), title=f"{snapshot['kind']} failed",
                        severity="error", timeout=15)

    def on_job_loaded(self, message: JobLoaded) -> None:
        now = self.latest["now"] if self.latest else 0.0
        for screen in self.screen_stack:
            if isinstance(screen, JobDetailScreen) and screen.job_id == message.record["id"]:
                screen.show(message.record, now)

    # ---- global actions -------------------------------------------------------------------

    def action_help(self) -> None:
        if isinstance(self.screen, HelpScreen):
            return
        if not self.is_screen_installed("help"):
            # Built once and kept: composing it is the slow part of showing it.
            self.install_screen(HelpScreen(key_sections(self.BINDINGS)), "help")
            self.call_after_refresh(self.freeze_heap)
        self.push_screen("help")

    def freeze_heap(self) -> None:
        """Take what exists now (the app, its screens and widgets, the modules) out of the garbage collector's
        scans: it lives as long as the app, and scanning its ~80,000 objects made each full collection a
        30 ms pause that landed on key presses."""
        gc.collect()
        gc.freeze()

    def action_request_quit(self) -> None:
        """With jobs in flight on a master a console started: ask stop or detach. Otherwise just go."""
        if isinstance(self.screen, QuitScreen):
            return
        counts = (self.latest or {}).get("counts", {}) if self.connected else {}
        queued, running = counts.get("queued", 0), counts.get("running", 0)
        if self.embedded and (queued or running):
            self.push_screen(QuitScreen(queued, running), self._quit_with)
        else:
            self._quit_with(STOP if self.embedded else DETACH)

    def _quit_with(self, choice: str | None) -> None:
        if choice is None:
            return
        self.poller.stop()
        self.exit(choice)

    def get_system_commands(self, screen: Screen) -> Iterable[SystemCommand]:
        """The command palette: the same actions as the keys."""
        if isinstance(screen, MainScreen):
            yield SystemCommand("Submit a job", "n: command, count, priority, timeout, retries, tags", screen.action_submit)
            yield SystemCommand("Deploy agents over SSH", "d: pick hosts from the inventory; per-host progress",
                                screen.action_deploy)
            yield SystemCommand("Stop the selected agent", "k on Workers: over SSH, its running jobs re-queued",
                                lambda: screen.action_stop_agent(False))
            yield SystemCommand("Drain the selected agent", "D on Workers: running jobs finish, then it stops",
                                lambda: screen.action_stop_agent(True))
            yield SystemCommand("Open job detail", "enter: the selected job's spec, attempts and output", screen.action_open)
            yield SystemCommand("Cancel jobs", "c: the selected or marked queued/running jobs", screen.action_cancel)
            yield SystemCommand("Requeue jobs", "r: the selected or marked finished jobs", screen.action_requeue)
            yield SystemCommand("Filter the focused pane", "/: text shows matches, !text hides them", screen.action_filter)
            yield SystemCommand("Mark or unmark the selected row", "space", lambda: screen.focused_table().action_mark())
            yield SystemCommand("Clear marks", "escape", lambda: screen.focused_table().clear_marks())
            for pane in ("dispatched", "finished", "workers"):
                yield SystemCommand(f"Go to {pane.title()}", "tab moves between panes",
                                    lambda pane=pane: screen.action_focus_pane(pane))
        elif isinstance(screen, JobDetailScreen):
            yield SystemCommand("Cancel this job", "c", screen.action_cancel)
            yield SystemCommand("Requeue this job", "r", screen.action_requeue)
            yield SystemCommand("Back", "esc", self.pop_screen)
        yield SystemCommand("Help", "?: every key", self.action_help)
        yield SystemCommand("Quit", "q: asks stop or detach when jobs are in flight", self.action_request_quit)
        for command in super().get_system_commands(screen):
            if command.title not in ("Quit",):
                yield command


def _ids(ids: list[int]) -> str:
    shown = ", ".join(map(str, ids[:5]))
    return f"{shown} …(+{len(ids) - 5})" if len(ids) > 5 else shown
