"""The operator acts on what they see: the console's cursor follows the job it is on while thousands of jobs
a second flow through the panes, so enter, c and r act on that job; a key typed right after `/` is never lost.
The real console (Textual's pilot) over a real master and real agents."""

from __future__ import annotations

import contextlib
import pickle
import subprocess
import sys
import time
from typing import Iterator

import pytest
from corral.console.client import Client
from corral.console.tui.app import CorralApp
from corral.console.tui.screens.confirm import ConfirmScreen
from corral.console.tui.screens.detail import JobDetailScreen
from corral.console.tui.screens.main import MainScreen
from corral.console.tui.widgets.table import WindowTable
from textual import events
from textual.widgets import Input

from tests.cluster import REPO, Cluster
from tests.test_tui_app import SIZE, notes, until


def burst(app: CorralApp, *keys: tuple[str, str | None]) -> None:
    """Keys as a terminal delivers a quick typist's: all queued at once, none waiting for the one before
    to be handled (pilot.press waits for the app to be idle after each key, so it never shows a race)."""
    for key, char in keys:
        app.post_message(events.Key(key, char))


async def test_keys_typed_right_after_slash_all_reach_the_filter(cluster: Cluster) -> None:
    with cluster.client() as c:
        c.submit([{"command": f"echo {name}-{i}", "tags": ["nobody"]} for i in range(3) for name in ("jade", "ruby")])
    app = CorralApp(home=cluster.home)
    async with app.run_test(size=SIZE) as pilot:
        screen = app.main
        dispatched = screen.dispatched_pane
        await until(pilot, lambda: dispatched.total == 6, "six queued jobs")
        # j moves a table's cursor, n opens the submit form, c cancels, q quits: typed right after `/`,
        # each must land in the filter instead.
        burst(app, ("slash", "/"), ("j", "j"), ("a", "a"), ("d", "d"), ("e", "e"))
        await until(pilot, lambda: screen.query_one("#filter", Input).value == "jade", "the whole word in the filter")
        assert dispatched.cursor == 0 and app.screen is screen
        await until(pilot, lambda: dispatched.total == 3 and all("jade" in r[1] for r in dispatched.rows), "jade only")
        await pilot.press("enter")  # keeps the filter, back to the table
        # `/` again: the bar holds the filter, selected, so what is typed next replaces it, all of it.
        burst(app, ("slash", "/"), ("exclamation_mark", "!"), ("j", "j"), ("a", "a"), ("d", "d"), ("e", "e"))
        bar = screen.query_one("#filter", Input)
        await until(pilot, lambda: bar.value == "!jade", "the filter turned round")
        await pilot.press("enter")
        await until(pilot, lambda: dispatched.total == 3 and all("ruby" in r[1] for r in dispatched.rows), "ruby only")
        burst(app, ("slash", "/"), ("n", "n"), ("c", "c"), ("q", "q"))
        await until(pilot, lambda: bar.value == "ncq", "n, c and q in the filter, none of them acted on")
        assert isinstance(app.screen, MainScreen) and app.is_running
        burst(app, ("slash", "/"), ("x", "x"))  # in the bar, `/` is text (a path's)
        await until(pilot, lambda: bar.value == "ncq/x", "a slash in the filter")
        await pilot.press("escape")
        await until(pilot, lambda: dispatched.total == 6, "all six again")


# ---- the cursor follows its job through the flow ----------------------------------------------------

# A feeder process (its CPU is not the console's): `tests.jobs:inc` callables at `rate` a second, in batches.
FEEDER = r"""
import pickle, sys, time
from corral.agent.protocol import JobSpec
from corral.console.client import Client
rate, batch = float(sys.argv[1]), int(sys.argv[2])
with Client() as client:
    i, start = 0, time.monotonic()
    while True:
        client.submit([JobSpec(func="tests.jobs:inc", payload=pickle.dumps(((i + k,), {}))) for k in range(batch)])
        i += batch
        time.sleep(max(0.0, start + i / rate - time.monotonic()))
"""


@contextlib.contextmanager
def flowing(cluster: Cluster, rate: int = 3000) -> Iterator[subprocess.Popen]:
    feeder = subprocess.Popen([sys.executable, "-c", FEEDER, str(rate), str(rate // 20)], env=cluster.env, cwd=REPO)
    try:
        yield feeder
    finally:
        feeder.kill()
        feeder.wait(timeout=10)


def backlog(client: Client, count: int) -> list[int]:
    """`count` callables of 2 ms each queued in few round trips (one template, many payloads): four slots
    run at most 2,000 a second of them, so the backlog lasts while the test looks at its tail."""
    ids: list[int] = []
    nap = pickle.dumps(((0.002,), {}))
    for start in range(0, count, 10_000):
        new, _ = client.submit_batch({"func": "tests.jobs:nap"}, [nap] * min(10_000, count - start))
        ids += new
    return ids


def seen_under_cursor(table: WindowTable) -> str:
    """The text of the screen line the cursor is drawn on, as the operator sees it."""
    return table.render_line(table.cursor - table.top + 1).text


@pytest.mark.timeout(400)  # four waits of up to 60-120 s each on a loaded machine; a pass takes ~15 s
async def test_under_a_flow_the_cursor_follows_its_job_and_keys_act_on_it(cluster: Cluster) -> None:
    for name in ("a", "b"):
        cluster.start_agent(name, slots=2)
    with cluster.client() as c:
        c.map("tests.jobs:inc", range(200))  # a Finished pane to start from
    app = CorralApp(home=cluster.home)
    with flowing(cluster):
        async with app.run_test(size=SIZE) as pilot:
            screen = app.main
            finished, dispatched = screen.finished_pane, screen.dispatched_pane
            await until(pilot, lambda: finished.loaded and finished.total >= 200, "the Finished pane")

            # Finished, newest first: a job the operator picks is pushed down by every job that ends after it.
            finished.focus()
            await pilot.press("down", "down", "down")
            picked = await until(pilot, lambda: finished.selected(), "the picked row")
            job = picked[0]
            at, line, total, held = finished.cursor, finished.cursor - finished.top, finished.total, finished.asked[1]
            assert finished.pinned == job and str(job) in seen_under_cursor(finished)
            # Far more jobs end than the pane holds rows for: without following, the cursor would be on
            # a job that ended a moment ago, and the job picked would be long out of the held window.
            began = time.monotonic()
            await until(pilot, lambda: finished.total > total + 5 * held + 500, "the flow", timeout=120)
            print(f"Finished flow: {(finished.total - total) / (time.monotonic() - began):.0f} jobs/s")
            await until(pilot, lambda: (row := finished.selected()) is not None and row[0] == job, "the job again")
            assert finished.cursor > at + 5 * held  # it went far down, and the cursor with it
            assert finished.cursor - finished.top == line  # on the same line of the screen
            assert str(job) in seen_under_cursor(finished).split()[:1]
            await pilot.press("enter")
            await until(pilot, lambda: isinstance(app.screen, JobDetailScreen), "the detail screen")
            assert app.screen.job_id == job
            await pilot.press("escape")
            await until(pilot, lambda: app.screen is screen, "back on the main screen")
            await until(pilot, lambda: (row := finished.selected()) is not None and row[0] == job, "the job still")
            await pilot.press("r")
            await until(pilot, lambda: any(n.startswith(f"requeued {job} → ") for n in notes(app)), "requeued it")

            # Dispatched: the last of a backlog moves up as those ahead of it run; the cursor goes with it.
            # (Queued now: the agents would have run a backlog queued earlier by this time.)
            with cluster.client() as c:
                queued = backlog(c, 40_000)
            await until(pilot, lambda: dispatched.total >= 30_000, "the backlog in the pane")
            dispatched.focus()
            await pilot.press("end")
            picked = await until(pilot, lambda: dispatched.selected(), "the last queued job")
            job = picked[0]
            assert job >= queued[-1]  # it is one of ours or one the feeder queued after them
            at, held, began = dispatched.cursor, dispatched.asked[1], time.monotonic()  # held: a window's rows
            await until(pilot, lambda: (row := dispatched.selected()) is not None and row[0] == job
                        and dispatched.cursor < at - 5 * held, "the job moving up, far", timeout=120)
            print(f"Dispatched: the job moved up {(at - dispatched.cursor) / (time.monotonic() - began):.0f} rows/s")
            assert str(job) in seen_under_cursor(dispatched).split()[:1]
            await pilot.press("c")
            await until(pilot, lambda: isinstance(app.screen, ConfirmScreen), "the question")
            assert f"Cancel job {job} " in app.screen.question
            await pilot.press("y")
            with cluster.client() as c:
                # Thousands of jobs were still ahead of it: it was queued, and is cancelled, not run.
                await until(pilot, lambda: c.job(job)["state"] == "cancelled", "the job cancelled")
