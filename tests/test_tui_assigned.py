"""The console counts running jobs only: jobs an agent took and has not started show as `assigned`, apart
(in the header's counts and slots, and as their own state in Dispatched, with no elapsed time yet)."""

from __future__ import annotations

import re

from corral.agent.protocol import JobSpec
from corral.console.tui.app import CorralApp
from corral.console.tui.widgets.stats import StatsHeader
from tests.cluster import Cluster
from tests.test_tui_app import SIZE, loaded, main, until


async def test_prefetched_jobs_are_shown_apart_from_running_ones(cluster: Cluster) -> None:
    cluster.start_agent("solo", slots=1)
    with cluster.client() as c:
        ids = c.submit([JobSpec(command="sleep 0.03") for _ in range(600)])
    app = CorralApp(home=cluster.home)
    async with app.run_test(size=SIZE) as pilot:
        await loaded(pilot, app)
        header = main(app).query_one(StatsHeader)
        dispatched = main(app).dispatched_pane

        def apart() -> bool:
            counts, status = header.counts_text().plain, header.status_text().plain
            running = re.search(r"running (\d+) \+(\d+) assigned", counts)
            slots = re.search(r"slots (\d+)/1 busy \+(\d+) prefetched", status)
            rows = [r for r in dispatched.rows if r is not None and r[2] == "assigned"]
            return bool(running and slots and int(running.group(1)) <= 1 and int(slots.group(1)) <= 1 and rows)

        await until(pilot, apart, "running and assigned counted apart, an assigned row in Dispatched", timeout=120)
        assigned = [r for r in dispatched.rows if r is not None and r[2] == "assigned"]
        assert all(r[6] is None for r in assigned), assigned  # no `started` (no elapsed) before it starts
    with cluster.client() as c:
        assert len(c.wait(ids, timeout=300)) == len(ids)
