"""The operator acts on what they see: the console's cursor follows the job it is on while thousands of jobs
a second flow through the panes, so enter, c and r act on that job; a key typed right after `/` is never lost.
The real console (Textual's pilot) over a real master and real agents."""

from __future__ import annotations

import time
from typing import Any, Callable

from textual import events
from textual.pilot import Pilot
from textual.widgets import Input

from corral.console.tui.app import CorralApp
from corral.console.tui.screens.main import MainScreen
from tests.cluster import Cluster

SIZE = (120, 36)
TIMEOUT = 60.0  # generous: the machine is shared and slow


async def until(pilot: Pilot, predicate: Callable[[], Any], what: str, timeout: float = TIMEOUT) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        await pilot.pause(0.05)


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
