"""The console sees a Pool's batch: its jobs named "pool-N [i/n]", filtered to that batch alone, and cancelled
together (marked, then c), while another job runs on."""

from __future__ import annotations

import types

from corral import Pool
from corral.console.tui.app import CorralApp
from corral.console.tui.screens.confirm import ConfirmScreen
from tests.cluster import Cluster
from tests.shipkit import tasks  # noqa: F401 (fixture)
from tests.test_tui_app import SIZE, loaded, main, type_text, until


async def test_a_pools_batch_is_filtered_and_cancelled_as_a_group(cluster: Cluster, tasks: types.ModuleType) -> None:  # noqa: F811
    cluster.start_agent("a", slots=2)
    with cluster.client() as c:
        other = c.submit_command("sleep 30", name="unrelated")
    pool = Pool(home=cluster.home)
    result = pool.starmap_async(tasks.sqr, [(x, 30.0) for x in range(5)], chunksize=1)
    app = CorralApp(home=cluster.home)
    try:
        async with app.run_test(size=SIZE) as pilot:
            await loaded(pilot, app)
            dispatched = main(app).dispatched_pane
            await until(pilot, lambda: dispatched.total == 6, "the batch and the other job")
            dispatched.focus()
            await pilot.press("slash")
            await type_text(pilot, f"{pool.name} [")
            await pilot.press("enter")
            await until(pilot, lambda: dispatched.total == 5, "the batch alone")
            assert sorted(r[1] for r in dispatched.rows) == [f"{pool.name} [{i}/5]" for i in range(1, 6)]
            await pilot.press("home", *["space"] * 5, "c")
            await until(pilot, lambda: isinstance(app.screen, ConfirmScreen), "the confirmation")
            assert "Cancel 5 marked jobs" in app.screen.question
            await pilot.press("y")
            await until(pilot, lambda: dispatched.total == 0, "the batch gone from Dispatched")
            await pilot.press("escape")  # the filter off: the other job is still there
            await until(pilot, lambda: [r[1] for r in dispatched.rows] == ["unrelated"], "the other job alone")
        try:
            result.get(timeout=15)
        except Exception as exc:  # noqa: BLE001 - asserted just below
            assert "cancelled" in str(exc)
        else:
            raise AssertionError("the cancelled batch returned values")
        with cluster.client() as c:
            assert c.wait([other], 0.1) == {}  # still running
    finally:
        pool.terminate()
