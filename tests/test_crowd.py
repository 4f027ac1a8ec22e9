"""A master that takes a crowd: 100 agents started at once all join, none is declared lost, a 5,000-job burst is recorded once."""

from __future__ import annotations

import pickle
import threading
import time

import pytest

from corral.agent.protocol import JobSpec
from tests.cluster import Cluster, wait_until
from tests.faultkit import journal_outcomes

pytestmark = [pytest.mark.scale, pytest.mark.timeout(600)]

AGENTS = 100
JOIN_SECONDS = 90.0
WATCH_SECONDS = 60.0  # after the last one joined: none may be declared lost meanwhile
BURST = 5_000


class StateWatch:
    """Polls the master's agent list from the moment the agents start; remembers every agent ever seen lost."""

    def __init__(self, cluster: Cluster) -> None:
        self.cluster = cluster
        self.lost: dict[str, float] = {}  # name -> when first seen lost (seconds since the watch began)
        self.began = time.monotonic()
        self.errors: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        client = None
        while not self._stop.wait(0.5):
            try:
                client = client or self.cluster.client()
                agents = client.agents()
            except Exception as exc:  # noqa: BLE001 - a missed poll is noted; the test asserts on none missed
                self.errors.append(repr(exc))
                if client is not None:
                    client.close()
                client = None
                continue
            for agent in agents:
                if agent["state"] == "lost":
                    self.lost.setdefault(agent["name"], time.monotonic() - self.began)
        if client is not None:
            client.close()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=30)


def test_a_hundred_agents_at_once(cluster: Cluster) -> None:
    names = [f"crowd{i:03d}" for i in range(AGENTS)]
    began = time.monotonic()
    for name in names:
        cluster.start_agent(name, slots=1, wait=False, verbose=False)
    watch = StateWatch(cluster)
    try:
        with cluster.client() as c:
            wait_until(lambda: sum(a["state"] == "up" for a in c.agents()) == AGENTS, timeout=JOIN_SECONDS,
                     interval=0.5, what=f"all {AGENTS} agents to register")
            joined = time.monotonic() - began
            watched_until = time.monotonic() + WATCH_SECONDS
            payloads = [pickle.dumps(((i,), {})) for i in range(BURST)]
            ids = c.submit([JobSpec(func="tests.jobs:inc", payload=p) for p in payloads])
            states = c.wait(ids, timeout=300)
            assert set(states.values()) == {"done"} and len(states) == BURST
            assert c.values(ids) == [i + 1 for i in range(BURST)]
            wanted = set(ids)
            ran = {job["agent"] for job in c.jobs(["done"], limit=2 * BURST) if job["id"] in wanted}
            # Spread over the crowd: each agent asks for ~100 ms of these (thousands), and gets its share.
            assert len(ran) >= 0.9 * AGENTS, f"the burst ran on {len(ran)} of {AGENTS} agents"
            time.sleep(max(0.0, watched_until - time.monotonic()))
            agents = {a["name"]: a for a in c.agents()}
    finally:
        watch.stop()
    assert joined <= JOIN_SECONDS
    assert not watch.lost, f"agents declared lost while healthy: {watch.lost}"
    assert sorted(agents) == names and {a["state"] for a in agents.values()} == {"up"}
    # The master's own count: a lease that ran out between two polls (up again a beat later) shows here.
    assert not {n: a["times_lost"] for n, a in agents.items() if a["times_lost"]}, "agents declared lost while healthy"
    assert not watch.errors, f"the watcher's calls failed {len(watch.errors)} times: {watch.errors[:3]}"
    dead = [name for name in names if cluster.agents[name].poll() is not None]
    assert not dead, f"agents exited: {dead}"
    journal_outcomes(cluster.home / "corral.db", ids)  # each job exactly one outcome, one counted attempt
    print(f"{AGENTS} agents up in {joined:.1f}s")
