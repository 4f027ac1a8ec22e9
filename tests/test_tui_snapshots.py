"""Snapshot tests (pytest-textual-snapshot) of the console's screens: a real master over a deterministic journal.

The journal (scripts/demo.py) holds fixed jobs with fixed times and no agent runs them, so every cell is the
same on every run; the clock is pinned to UTC. Update after an intended change: pytest --snapshot-update.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest
from textual.pilot import Pilot
from textual.widgets import Input

from corral.console.tui.app import CorralApp
from scripts.demo import write_demo_journal
from tests.cluster import Cluster

FINISHED, QUEUED = 60, 25


@pytest.fixture
def demo(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Cluster]:
    monkeypatch.setenv("TZ", "UTC")
    time.tzset()
    cluster = Cluster(tmp_path / "home")
    write_demo_journal(cluster.home / "corral.db", finished=FINISHED, queued=QUEUED)
    cluster.start_master()
    try:
        yield cluster
    finally:
        cluster.stop()
        monkeypatch.undo()
        time.tzset()


async def _until(pilot: Pilot, predicate: Callable[[], Any], what: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await pilot.pause(0.05)


async def _ready(pilot: Pilot) -> None:
    """The demo's rows are on screen and nothing transient (a toast, a blinking cursor) is."""
    app = pilot.app
    assert isinstance(app, CorralApp)
    main = app.main
    await _until(pilot, lambda: main.dispatched_pane.total == QUEUED and main.finished_pane.total == FINISHED
                 and len(main.finished_pane.rows) > 0, "the demo rows")
    await pilot.pause()


async def _still(pilot: Pilot) -> None:
    pilot.app.clear_notifications()
    for field in pilot.app.screen.query(Input):
        field.cursor_blink = False
    await pilot.pause()


def test_main_screen(demo: Cluster, snap_compare: Any) -> None:
    async def run_before(pilot: Pilot) -> None:
        await _ready(pilot)
        await _still(pilot)

    assert snap_compare(CorralApp(home=demo.home), terminal_size=(120, 36), run_before=run_before)


def test_main_screen_80x24(demo: Cluster, snap_compare: Any) -> None:
    async def run_before(pilot: Pilot) -> None:
        await _ready(pilot)
        await pilot.press("tab")  # the Finished pane focused: its keys in the footer
        await _still(pilot)

    assert snap_compare(CorralApp(home=demo.home), terminal_size=(80, 24), run_before=run_before)


def test_submit_modal_with_errors(demo: Cluster, snap_compare: Any) -> None:
    async def run_before(pilot: Pilot) -> None:
        await _ready(pilot)
        await pilot.press("n")
        screen = pilot.app.screen
        screen.query_one("#count", Input).value = "ten"
        screen.query_one("#timeout", Input).value = "0"
        await pilot.press("enter")
        await _still(pilot)

    assert snap_compare(CorralApp(home=demo.home), terminal_size=(100, 30), run_before=run_before)


def test_job_detail(demo: Cluster, snap_compare: Any) -> None:
    async def run_before(pilot: Pilot) -> None:
        await _ready(pilot)
        finished = pilot.app.main.finished_pane
        finished.focus()
        await pilot.press("down", "down", "down", "down")  # 60, 59, 58, 57, 56: a failed one
        await pilot.press("enter")
        await _until(pilot, lambda: getattr(pilot.app.screen, "record", None) is not None, "the job's record")
        await _still(pilot)

    assert snap_compare(CorralApp(home=demo.home), terminal_size=(100, 30), run_before=run_before)


def test_help(demo: Cluster, snap_compare: Any) -> None:
    async def run_before(pilot: Pilot) -> None:
        await _ready(pilot)
        await pilot.press("question_mark")
        await _still(pilot)

    assert snap_compare(CorralApp(home=demo.home), terminal_size=(100, 40), run_before=run_before)


def test_quit_asks_stop_or_detach(demo: Cluster, snap_compare: Any) -> None:
    async def run_before(pilot: Pilot) -> None:
        await _ready(pilot)
        await pilot.press("q")
        await _still(pilot)

    assert snap_compare(CorralApp(home=demo.home, embedded=True), terminal_size=(100, 30), run_before=run_before)


def test_filtered_and_marked(demo: Cluster, snap_compare: Any) -> None:
    async def run_before(pilot: Pilot) -> None:
        await _ready(pilot)
        main = pilot.app.main
        await pilot.press("tab", "slash", *"render", "enter")
        await _until(pilot, lambda: main.finished_pane.total == 8 and len(main.finished_pane.rows) == 8, "the filter")
        await pilot.press("shift+tab", "space", "space")
        await _still(pilot)

    assert snap_compare(CorralApp(home=demo.home), terminal_size=(120, 36), run_before=run_before)


@pytest.fixture
def inventory(tmp_path: Path, demo: Cluster) -> Cluster:
    """The demo master, and a hosts file of fixed hosts (the user's ~/.ssh/config is not read)."""
    config = tmp_path / "ssh_config"
    config.write_text("")
    demo.env["CORRAL_SSH_CONFIG"] = str(config)
    demo.stop()
    demo.start_master()
    for alias, hostname, port, slots, tags in (("gpu-a", "10.0.4.21", "22", "8", "gpu,cuda12"),
                                               ("gpu-b", "10.0.4.22", "22", "8", "gpu,cuda12"),
                                               ("batch-1", "batch1.lab.example", "2222", "32", "batch")):
        done = demo.corral("hosts", "add", alias, "--hostname", hostname, "--port", port, "--user", "ops",
                           "--slots", slots, "--tags", tags)
        assert done.returncode == 0, done.stderr
    return demo


def test_deploy_modal(inventory: Cluster, snap_compare: Any) -> None:
    async def run_before(pilot: Pilot) -> None:
        await _ready(pilot)
        await pilot.press("d")
        await _until(pilot, lambda: pilot.app.screen.query("SelectionList"), "the deploy modal")
        await pilot.press("space", "down", "space", "tab", *"4", "tab", *"gpu,night")
        await _still(pilot)

    assert snap_compare(CorralApp(home=inventory.home), terminal_size=(120, 30), run_before=run_before)
