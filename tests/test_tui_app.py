"""The real console (CorralApp) driven by Textual's pilot against a real master and real agents on loopback."""

from __future__ import annotations

import os
import re
import signal
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest
from corral.console.local import attach_or_start, stop_embedded
from corral.console.state import StateDir
from corral.console.tui.app import CorralApp
from corral.console.tui.screens.confirm import ConfirmScreen
from corral.console.tui.screens.detail import JobDetailScreen
from corral.console.tui.screens.help import HelpScreen
from corral.console.tui.screens.main import MainScreen
from corral.console.tui.screens.quit import QuitScreen
from corral.console.tui.screens.submit import SubmitScreen
from corral.console.tui.widgets.stats import StatsHeader
from corral.console.tui.widgets.table import WindowTable
from textual.pilot import Pilot
from textual.widgets import Input

from tests.cluster import Cluster
from tests.waiting import wait_until_async

SIZE = (120, 36)
TIMEOUT = 30.0  # generous: the machine is shared and slow


async def until(pilot: Pilot, predicate: Callable[[], Any], what: str, timeout: float = TIMEOUT) -> Any:
    """Let the app run until predicate() is truthy (tests/waiting.py's wait, on the pilot's loop)."""
    return await wait_until_async(pilot.pause, predicate, what, timeout)


def notes(app: CorralApp) -> list[str]:
    return [n.message for n in app._notifications]


def errors(app: CorralApp) -> list[str]:
    return [n.message for n in app._notifications if n.severity == "error"]


def main(app: CorralApp) -> MainScreen:
    return app.main


def ids_of(table: WindowTable) -> list[int]:
    return [r[0] for r in table.rows]


def row_of(table: WindowTable, job_id: int) -> tuple | None:
    return next((r for r in table.rows if r[0] == job_id), None)


async def type_text(pilot: Pilot, text: str) -> None:
    await pilot.press(*[{" ": "space", "!": "exclamation_mark", "/": "slash"}.get(ch, ch) for ch in text])


async def loaded(pilot: Pilot, app: CorralApp) -> None:
    await until(pilot, lambda: main(app).dispatched_pane.loaded and main(app).finished_pane.loaded, "the first snapshot")


async def select(pilot: Pilot, table: WindowTable, job_id: int) -> None:
    """Focus `table` and move its cursor onto `job_id`."""
    table.focus()
    index = await until(pilot, lambda: next((table.start + i + 1 for i, r in enumerate(table.rows) if r[0] == job_id), 0),
                        f"job {job_id} in {table.TITLE}") - 1
    table.cursor = index
    await pilot.pause()
    assert table.selected()[0] == job_id


async def select_running(pilot: Pilot, dispatched: WindowTable, job_id: int) -> None:
    """Wait until `job_id` runs, then put Dispatched's cursor on it."""
    await until(pilot, lambda: (r := row_of(dispatched, job_id)) and r[2] == "running", f"job {job_id} running")
    await select(pilot, dispatched, job_id)


@pytest.fixture
def home(tmp_path: Path) -> Iterator[Path]:
    """A fresh state directory; whatever a console started in it is stopped afterwards."""
    path = tmp_path / "home"
    try:
        yield path
    finally:
        stop_embedded(StateDir(path))


def _gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    with open(f"/proc/{pid}/stat") as f:
        return f.read().rsplit(")", 1)[1].split()[0] == "Z"


# ---- start-up ---------------------------------------------------------------------------


async def test_embedded_start_submit_and_see_it_finish(home: Path) -> None:
    """A newcomer: `corral` starts a master and a local agent, n, `echo hello`, enter: it runs and finishes."""
    attachment = attach_or_start(StateDir(home), local_agent=True, slots=2)
    assert attachment.started and attachment.embedded and attachment.agent_pid
    app = CorralApp(home=home, embedded=True, greeting=attachment.greeting())
    async with app.run_test(size=SIZE) as pilot:
        await loaded(pilot, app)
        assert any("started a master" in n for n in notes(app))
        workers = main(app).workers_pane
        await until(pilot, lambda: [r[0] for r in workers.rows] == ["local"], "the local agent in Workers")
        assert workers.rows[0][2] == "up" and workers.rows[0][4] == 2 and workers.rows[0][9] == "console"
        await pilot.press("n")
        assert isinstance(app.screen, SubmitScreen)
        await type_text(pilot, "echo hello")
        started = time.monotonic()
        await pilot.press("enter")
        assert isinstance(app.screen, MainScreen)
        finished = main(app).finished_pane
        row = await until(pilot, lambda: row_of(finished, 1), "job 1 in Finished")
        took = time.monotonic() - started
        assert row[1] == "echo hello" and row[2] == "done" and row[3] == "local" and row[4] == 0
        assert took < 5.0, f"echo hello took {took:.2f}s to show as finished"
        await pilot.press("q")  # nothing in flight: no question, the console stops what it started
        assert app.return_value == "stop"
    assert stop_embedded(StateDir(home)) == [f"stopped the local agent (pid {attachment.agent_pid})",
                                             f"stopped the master (pid {attachment.master_pid})"]
    assert _gone(attachment.agent_pid) and _gone(attachment.master_pid)


async def test_attaches_to_a_running_master_and_leaves_it_alone(cluster: Cluster) -> None:
    cluster.start_agent("alpha", slots=1)
    with cluster.client() as c:
        c.submit([{"command": "sleep 30"}])
    attachment = attach_or_start(StateDir(cluster.home), local_agent=True, slots=1)
    assert not attachment.started and not attachment.embedded and attachment.agent_pid is None
    assert attachment.master_pid == cluster.master.pid
    app = CorralApp(home=cluster.home, embedded=attachment.embedded)
    async with app.run_test(size=SIZE) as pilot:
        await loaded(pilot, app)
        await until(pilot, lambda: row_of(main(app).dispatched_pane, 1) and row_of(main(app).dispatched_pane, 1)[2] == "running",
                    "job 1 running")
        assert [r[0] for r in main(app).workers_pane.rows] == ["alpha"]  # no local agent added
        await pilot.press("ctrl+c")  # a job runs, but on a master no console started: just leave
        assert app.return_value == "detach"
    assert cluster.master.poll() is None


# ---- submit -----------------------------------------------------------------------------


async def test_submit_modal_shows_bad_values_inline_and_sends_nothing(cluster: Cluster) -> None:
    app = CorralApp(home=cluster.home)
    async with app.run_test(size=SIZE) as pilot:
        await loaded(pilot, app)
        await pilot.press("n")
        modal = app.screen
        assert isinstance(modal, SubmitScreen)
        modal.query_one("#count", Input).value = "two"
        modal.query_one("#timeout", Input).value = "-5"
        modal.query_one("#retries", Input).value = "1000"
        await pilot.press("enter")
        assert app.screen is modal, "a form with errors must stay open"
        shown = {f: str(modal.query_one(f"#{f}-error").render()) for f in ("command", "count", "timeout", "retries")}
        assert all(modal.query_one(f"#{f}-error").display for f in shown)
        assert "give a command" in shown["command"] and "whole number" in shown["count"]
        assert "positive" in shown["timeout"] and "0 to 100" in shown["retries"]
        assert not modal.query_one("#priority-error").display
        assert app.focused is modal.query_one("#command", Input)  # the first bad field
        with cluster.client() as c:
            assert c.status()["counts"]["queued"] == 0  # nothing reached the master
        modal.query_one("#count", Input).value = "3"
        modal.query_one("#timeout", Input).value = "60"
        modal.query_one("#retries", Input).value = "1"
        modal.query_one("#tags", Input).value = "gpu, fast"
        modal.query_one("#priority", Input).value = "7"
        await type_text(pilot, "sleep 30")
        await pilot.press("enter")
        assert isinstance(app.screen, MainScreen)
        dispatched = main(app).dispatched_pane
        await until(pilot, lambda: ids_of(dispatched) == [1, 2, 3], "three queued jobs in Dispatched")
        assert {r[2] for r in dispatched.rows} == {"queued"} and {r[3] for r in dispatched.rows} == {7}
        assert dispatched.rows[0][8] == "fast,gpu"
        with cluster.client() as c:
            record = c.job(2)
        assert record["timeout"] == 60.0 and record["retries"] == 1 and record["env"] == {"CORRAL_INDEX": "1"}
        await pilot.press("n")
        await pilot.press("escape")  # esc cancels: nothing sent
        assert isinstance(app.screen, MainScreen)
        await pilot.pause(0.3)
        with cluster.client() as c:
            assert c.status()["counts"]["queued"] == 3


async def test_job_moves_from_dispatched_to_finished(cluster: Cluster) -> None:
    cluster.start_agent("alpha", slots=1)
    app = CorralApp(home=cluster.home)
    async with app.run_test(size=SIZE) as pilot:
        await loaded(pilot, app)
        await pilot.press("n")
        await type_text(pilot, "sleep 1; echo done-now")
        await pilot.press("enter")
        dispatched, finished = main(app).dispatched_pane, main(app).finished_pane
        await until(pilot, lambda: (r := row_of(dispatched, 1)) and r[2] == "running" and r[4] == "alpha",
                    "job 1 running in Dispatched")
        await until(pilot, lambda: row_of(finished, 1), "job 1 in Finished")
        assert row_of(dispatched, 1) is None and dispatched.total == 0
        assert row_of(finished, 1)[2] == "done"


# ---- detail -----------------------------------------------------------------------------


async def test_detail_follows_a_running_job_to_its_output(cluster: Cluster) -> None:
    cluster.start_agent("alpha", slots=1)
    with cluster.client() as c:
        job = c.submit([{"command": "sleep 1.5; echo out-line; echo err-line >&2; exit 4", "name": "slow"}])[0]
    app = CorralApp(home=cluster.home)
    async with app.run_test(size=SIZE) as pilot:
        await loaded(pilot, app)
        dispatched = main(app).dispatched_pane
        await select_running(pilot, dispatched, job)
        await pilot.press("enter")
        detail = app.screen
        assert isinstance(detail, JobDetailScreen) and detail.job_id == job
        await until(pilot, lambda: detail.record and detail.record["state"] == "running", "the running record")
        text = str(detail.query_one("#detail-text").render())
        assert "running for" in text and "slow" in str(detail.query_one("#detail-title").render())
        # Without a key press, the screen follows the job to its end and shows both streams.
        await until(pilot, lambda: detail.record["state"] == "failed", "the job to fail (exit 4)", timeout=60)
        text = str(detail.query_one("#detail-text").render())
        assert "out-line" in text and "err-line" in text and "exit 4" in text and "attempt 1 on alpha" in text
        await pilot.press("escape")
        assert isinstance(app.screen, MainScreen)


async def test_detail_notes_the_processes_a_job_left_running(cluster: Cluster, tmp_path: Path) -> None:
    """A job that ended leaving a daemon behind: the agent killed it, and the detail says so."""
    cluster.start_agent("alpha", slots=1)
    pidfile = tmp_path / "daemon.pid"
    with cluster.client() as c:
        job = c.submit([{"command": f"setsid sleep 300 >/dev/null 2>&1 & echo $! > {pidfile}", "name": "leaves"}])[0]
        assert c.wait([job], timeout=60) == {job: "done"}
    daemon = int(pidfile.read_text())
    app = CorralApp(home=cluster.home)
    async with app.run_test(size=SIZE) as pilot:
        await loaded(pilot, app)
        await select(pilot, main(app).finished_pane, job)
        await pilot.press("enter")
        detail = app.screen
        assert isinstance(detail, JobDetailScreen)
        await until(pilot, lambda: detail.record and detail.record["state"] == "done", "the record")
        text = str(detail.query_one("#detail-text").render())
    # named as it was when killed: `setsid` until it has exec'd `sleep`, the same pid either way
    assert re.search(rf"note: 1 process left running at its end was killed: (setsid|sleep) \(pid {daemon}\)\n", text)


# ---- cancel, requeue, marks -------------------------------------------------------------


async def test_cancel_asks_first(cluster: Cluster) -> None:
    cluster.start_agent("alpha", slots=1)
    with cluster.client() as c:
        job = c.submit([{"command": "sleep 60"}])[0]
    app = CorralApp(home=cluster.home)
    async with app.run_test(size=SIZE) as pilot:
        await loaded(pilot, app)
        dispatched = main(app).dispatched_pane
        await select_running(pilot, dispatched, job)
        await pilot.press("c")
        assert isinstance(app.screen, ConfirmScreen) and f"job {job}" in app.screen.question
        await pilot.press("n")  # declined: nothing happens
        assert isinstance(app.screen, MainScreen)
        await pilot.pause(0.5)
        with cluster.client() as c:
            assert c.job(job)["state"] == "running"
        await pilot.press("c")
        await pilot.press("y")
        finished = main(app).finished_pane
        await until(pilot, lambda: (r := row_of(finished, job)) and r[2] == "cancelled", "the job cancelled")
        assert any("cancelling" in n for n in notes(app))
        await pilot.press("tab")
        assert app.focused is finished
        await pilot.press("c")  # finished jobs cannot be cancelled: one clear line
        assert any("tab to Dispatched" in n for n in notes(app))


async def test_requeue_a_finished_job(cluster: Cluster) -> None:
    cluster.start_agent("alpha", slots=1)
    with cluster.client() as c:
        job = c.submit([{"command": "echo again", "priority": 3}])[0]
        c.wait([job])
    app = CorralApp(home=cluster.home)
    async with app.run_test(size=SIZE) as pilot:
        await loaded(pilot, app)
        finished = main(app).finished_pane
        await select(pilot, finished, job)
        await pilot.press("r")
        await until(pilot, lambda: any(f"requeued {job} → {job + 1}" in n for n in notes(app)), "the requeue notice")
        await until(pilot, lambda: (r := row_of(finished, job + 1)) and r[2] == "done", "the new job done")
        assert row_of(finished, job + 1)[1] == "echo again"
        with cluster.client() as c:
            assert c.job(job + 1)["priority"] == 3


async def test_marks_and_bulk_cancel(cluster: Cluster) -> None:
    with cluster.client() as c:  # no agent: they stay queued
        ids = c.submit([{"command": f"echo {i}"} for i in range(6)])
    app = CorralApp(home=cluster.home)
    async with app.run_test(size=SIZE) as pilot:
        await loaded(pilot, app)
        dispatched = main(app).dispatched_pane
        await until(pilot, lambda: ids_of(dispatched) == ids, "six queued jobs")
        dispatched.focus()
        await pilot.press("space", "down", "space", "space")  # marks 1, skips 2, marks 3 and 4
        assert dispatched.marks == {ids[0], ids[2], ids[3]}
        assert "3 marked" in str(dispatched.border_subtitle)
        await pilot.press("c")
        assert isinstance(app.screen, ConfirmScreen) and "3 marked jobs" in app.screen.question
        await pilot.press("y")
        await until(pilot, lambda: ids_of(dispatched) == [ids[1], ids[4], ids[5]], "three left queued")
        assert dispatched.marks == set()
        finished = main(app).finished_pane
        await until(pilot, lambda: sorted(ids_of(finished)) == [ids[0], ids[2], ids[3]], "three cancelled")
        assert {r[2] for r in finished.rows} == {"cancelled"}
        await pilot.press("space", "escape")  # esc drops marks
        assert dispatched.marks == set()


# ---- filter, tab, help, palette ---------------------------------------------------------


async def test_filter_and_inverted_filter(cluster: Cluster) -> None:
    with cluster.client() as c:
        c.submit([{"command": f"echo {name}-{i}"} for i in range(4) for name in ("alpha", "beta")])
    app = CorralApp(home=cluster.home)
    async with app.run_test(size=SIZE) as pilot:
        await loaded(pilot, app)
        dispatched = main(app).dispatched_pane
        await until(pilot, lambda: dispatched.total == 8, "eight jobs")
        await pilot.press("slash")
        assert app.focused.id == "filter"
        await type_text(pilot, "BETA")
        await until(pilot, lambda: dispatched.total == 4 and all("beta" in r[1] for r in dispatched.rows), "beta only")
        await pilot.press("enter")  # keeps the filter, back to the table
        assert app.focused is dispatched and "filter beta" in str(dispatched.border_subtitle)
        await pilot.press("slash", "home", "exclamation_mark", "enter")
        await until(pilot, lambda: dispatched.total == 4 and all("alpha" in r[1] for r in dispatched.rows), "!beta")
        await pilot.press("escape")  # esc on the table clears the filter
        await until(pilot, lambda: dispatched.total == 8, "all eight again")
        await pilot.press("tab", "slash")  # the filter applies to the focused pane, now Finished
        assert main(app).filter_target is main(app).finished_pane
        await type_text(pilot, "nothing-matches")
        await pilot.press("escape")  # esc in the bar clears it and closes it
        assert main(app).finished_pane.match == "" and not main(app).query_one("#filter").display


async def test_tab_help_and_command_palette(cluster: Cluster) -> None:
    app = CorralApp(home=cluster.home)
    async with app.run_test(size=SIZE) as pilot:
        await loaded(pilot, app)
        screen = main(app)
        assert app.focused is screen.dispatched_pane
        await pilot.press("tab")
        assert app.focused is screen.finished_pane
        await pilot.press("tab")
        assert app.focused is screen.workers_pane
        await pilot.press("c", "r")  # not the place for them: one line each, nothing else
        assert any("tab to Dispatched" in n for n in notes(app)) and any("tab to Finished" in n for n in notes(app))
        await pilot.press("tab")
        assert app.focused is screen.dispatched_pane
        await pilot.press("question_mark")
        assert isinstance(app.screen, HelpScreen)
        text = "\n".join(f"{keys} {what}" for keys, what in app.screen.rows)
        for expected in ("Submit", "Filter", "Detail", "Cancel", "Requeue", "Mark", "Quit", "Help", "!text",
                         "tab", "ctrl+p", "Stop", "Detach"):
            assert expected in text, expected
        await pilot.press("escape")
        assert isinstance(app.screen, MainScreen)
        await pilot.press("ctrl+p")
        await type_text(pilot, "submit a job")
        await pilot.pause(0.3)
        await pilot.press("enter")
        await until(pilot, lambda: isinstance(app.screen, SubmitScreen), "the palette to open the submit form")


async def test_what_happened_under_a_dialog_is_there_when_it_closes(cluster: Cluster) -> None:
    cluster.start_agent("alpha", slots=1)
    app = CorralApp(home=cluster.home)
    async with app.run_test(size=SIZE) as pilot:
        await loaded(pilot, app)
        await pilot.press("question_mark")
        assert isinstance(app.screen, HelpScreen)
        with cluster.client() as c:
            job = c.submit([{"command": "echo meanwhile"}])[0]
            c.wait([job])
        looks: list[Any] = []  # several more looks, the later ones bringing no rows (nothing changed)
        await until(pilot, lambda: (looks.append(app.latest) if not looks or looks[-1] is not app.latest else None)
                    or len(looks) >= 4, "more snapshots while the help is open")
        assert row_of(main(app).finished_pane, job) is None  # the hidden screen was not redrawn
        await pilot.press("escape")
        await pilot.pause()
        assert (r := row_of(main(app).finished_pane, job)) is not None and r[2] == "done"


# ---- quit, detach, re-attach ------------------------------------------------------------


async def test_quit_with_jobs_in_flight_detach_then_reattach_then_stop(home: Path) -> None:
    state = StateDir(home)
    first = attach_or_start(state, local_agent=True, slots=1)
    app = CorralApp(home=home, embedded=first.embedded)
    async with app.run_test(size=SIZE) as pilot:
        await loaded(pilot, app)
        await pilot.press("n")
        await type_text(pilot, "sleep 60")
        await pilot.press("enter")
        dispatched = main(app).dispatched_pane
        await until(pilot, lambda: (r := row_of(dispatched, 1)) and r[2] == "running", "the job running")
        await pilot.press("q")
        assert isinstance(app.screen, QuitScreen)
        await pilot.press("escape")  # stay
        assert isinstance(app.screen, MainScreen) and app.is_running
        await pilot.press("q", "d")
        assert app.return_value == "detach"
    # Detached: both keep running, and so does the job.
    assert not _gone(first.master_pid) and not _gone(first.agent_pid)
    second = attach_or_start(state, local_agent=True, slots=1)
    assert not second.started and second.embedded and second.agent_pid == first.agent_pid
    app = CorralApp(home=home, embedded=second.embedded)
    async with app.run_test(size=SIZE) as pilot:
        await loaded(pilot, app)
        dispatched = main(app).dispatched_pane
        await until(pilot, lambda: (r := row_of(dispatched, 1)) and r[2] == "running" and r[4] == "local",
                    "the same job, still running, after re-attaching")
        await pilot.press("q", "s")
        assert app.return_value == "stop"
    assert len(stop_embedded(state)) == 2
    assert _gone(first.master_pid) and _gone(first.agent_pid)


# ---- the master goes away ---------------------------------------------------------------


async def test_master_gone_is_a_notification_and_comes_back(cluster: Cluster) -> None:
    app = CorralApp(home=cluster.home)
    async with app.run_test(size=SIZE) as pilot:
        await loaded(pilot, app)
        cluster.master.send_signal(signal.SIGKILL)
        cluster.master.wait(timeout=10)
        await until(pilot, lambda: any("lost the master" in e or "no master answers" in e for e in errors(app)),
                    "a notification that the master is gone")
        assert not app.connected and "master unreachable" in main(app).query_one(StatsHeader).status_text().plain
        await pilot.press("n")
        await type_text(pilot, "echo into-the-void")
        await pilot.press("enter")  # the submit fails as one line, the console carries on
        await until(pilot, lambda: sum("no master answers" in e for e in errors(app)) >= 1 and
                    any(n.title == "submit failed" for n in app._notifications), "the failed submit")
        assert app.is_running and isinstance(app.screen, MainScreen)
        cluster.start_master()
        await until(pilot, lambda: app.connected and any("reconnected" in n for n in notes(app)), "reconnection")


# ---- 100,000 rows are never held ---------------------------------------------------------


async def test_tables_hold_a_window_not_every_job(cluster: Cluster) -> None:
    with cluster.client() as c:
        c.submit([{"command": f"echo {i}"} for i in range(20_000)])
    app = CorralApp(home=cluster.home)
    async with app.run_test(size=SIZE) as pilot:
        await loaded(pilot, app)
        dispatched = main(app).dispatched_pane
        await until(pilot, lambda: dispatched.total == 20_000, "20,000 queued")
        assert len(dispatched.rows) < 200
        dispatched.focus()
        await pilot.press("end")
        assert dispatched.cursor == 19_999
        await until(pilot, lambda: dispatched.selected() is not None and dispatched.selected()[0] == 20_000,
                    "the last job's row, fetched for the new window")
        assert len(dispatched.rows) < 200 and dispatched.start > 19_000
        await pilot.press("pageup")
        await until(pilot, lambda: dispatched.selected() is not None, "rows a page up")
        assert dispatched.selected()[0] == 20_000 - dispatched._visible()[1]


async def test_detail_follows_a_running_jobs_output_live(cluster: Cluster) -> None:
    """stdout/stderr of a running shell job show in its detail while it runs, not only at its end."""
    cluster.start_agent("alpha", slots=1)
    with cluster.client() as c:
        # Computed by the shell, so the text on screen cannot come from the command line itself.
        job = c.submit([{"command": "echo out-$((40+2)); echo err-$((50+5)) >&2; sleep 30; echo out-$((60+6))"}])[0]
    app = CorralApp(home=cluster.home)
    async with app.run_test(size=SIZE) as pilot:
        await loaded(pilot, app)
        dispatched = main(app).dispatched_pane
        await select_running(pilot, dispatched, job)
        await pilot.press("enter")
        detail = app.screen
        assert isinstance(detail, JobDetailScreen)
        await until(pilot, lambda: "out-42" in str(detail.query_one("#detail-text").render()),
                    "the job's first line, live")
        text = str(detail.query_one("#detail-text").render())
        assert "err-55" in text and "stdout (live" in text and "out-66" not in text
        assert detail.record["state"] == "running"
    with cluster.client() as c:
        c.cancel([job])
        assert c.wait([job], timeout=20) == {job: "cancelled"}
