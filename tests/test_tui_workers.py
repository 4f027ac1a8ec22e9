"""The Workers pane with 200 agents registered on a real master: it scrolls, filters and sorts, and the header sums them."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Iterator

import pytest

from corral.agent.protocol import PROTOCOL_VERSION, AgentInfo
from corral.agent.runner import connect as agent_connect
from corral.console.tui.app import CorralApp
from corral.console.tui.widgets.stats import StatsHeader
from corral.console.tui.widgets.workers import WorkersTable
from tests.cluster import Cluster
from tests.test_tui_app import SIZE, loaded, main, type_text, until

CROWD = 200
SILENT = "w042"  # stops heartbeating: lost after the lease


class Crowd:
    """CROWD agents registered through the agents' own protocol (one connection, one session each),
    heartbeating once a second, as agent/runner.py's report loop does when idle."""

    def __init__(self, cluster: Cluster) -> None:
        self.scheduler = agent_connect(cluster.address(), (cluster.home / "authkey").read_bytes().strip())
        self.sessions: dict[str, str] = {}
        for i in range(CROWD):
            name = f"w{i:03d}"
            info = AgentInfo(name=name, host=f"host{i % 20}", pid=10_000 + i, slots=1 + i % 4, tags=(),
                             python="3.11", started_by="test", protocol=PROTOCOL_VERSION, instance=f"{name}-1")
            self.sessions[name] = str(self.scheduler.register(info.to_wire(), [])["session"])
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._beat, daemon=True)
        self.thread.start()

    def _beat(self) -> None:
        while not self.stop.wait(1.0):
            for name, session in self.sessions.items():
                if name != SILENT:
                    self.scheduler.report(session, [], [], 0)


@pytest.fixture
def crowd(tmp_path: Path) -> Iterator[tuple[Cluster, Crowd]]:
    cluster = Cluster(tmp_path / "home")
    try:
        cluster.start_master("--lease", "4")
        crowd = Crowd(cluster)
        try:
            yield cluster, crowd
        finally:
            crowd.stop.set()
            crowd.thread.join(timeout=10)
    finally:
        cluster.stop()


async def test_workers_pane_with_200_agents(crowd: tuple[Cluster, Crowd]) -> None:
    cluster, _ = crowd
    # One real agent with both its slots busy, so "busy" has something to sort by.
    cluster.start_agent("real", slots=2, verbose=False)
    with cluster.client() as client:
        client.submit([{"command": "sleep 60"} for _ in range(2)])
    app = CorralApp(home=cluster.home)
    async with app.run_test(size=SIZE) as pilot:
        await loaded(pilot, app)
        workers = main(app).query_one(WorkersTable)
        await until(pilot, lambda: workers.total == CROWD + 1, "201 agents in the Workers pane")
        header = main(app).query_one(StatsHeader)
        workers.focus()
        # Scrolling: the pane keeps its few lines and the cursor reaches the last agent.
        await pilot.press("end")
        await pilot.pause()
        assert workers.cursor == CROWD and workers.selected().name == "w199"
        assert workers.size.height <= 8
        await pilot.press("home")
        assert workers.selected().name == "real"
        # By busy: the real agent's 2/2 first.
        await until(pilot, lambda: any(r.name == "real" and r.busy == 2 for r in workers.rows), "the real agent busy")
        await pilot.press("s")  # state
        await pilot.press("s")  # busy
        await pilot.pause()
        assert workers.order == "busy" and workers.rows[0].name == "real" and "by busy" in str(workers.border_subtitle)
        # By state: the silent one, lost after its lease, comes first.
        await until(pilot, lambda: any(r.name == SILENT and r.state == "lost" for r in workers.rows),
                    f"{SILENT} lost", timeout=60)
        await pilot.press("s", "s")  # name, then state
        await pilot.pause()
        assert workers.order == "state" and workers.rows[0].name == SILENT
        assert f"{CROWD}/{CROWD + 1} up 1 lost" in header.status_text().plain
        # The filter runs over all of them.
        await pilot.press("slash")
        await type_text(pilot, "w19")
        await pilot.press("enter")
        await until(pilot, lambda: workers.total == 10, "10 agents matching w19")
        assert sorted(r.name for r in workers.rows) == [f"w19{i}" for i in range(10)]
