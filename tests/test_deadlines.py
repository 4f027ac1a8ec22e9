"""No call without a deadline: a master that stops answering mid-call (SIGSTOP) holds no agent and no client for ever."""

from __future__ import annotations

import signal
import threading
import time

from corral.agent.protocol import JobSpec
from corral.agent.runner import CALL_MARGIN_SECONDS, TAKE_WAIT_SECONDS
from corral.console import client as client_module
from tests.cluster import Cluster, wait_until
from tests.faultkit import journal_outcomes

AGENTS = ("d1", "d2", "d3")
# Longer than every deadline in play: an agent's take (its long poll plus the margin), its report and
# heartbeat (the margin), and a waiting client's wait() (its poll plus the client's margin).
STALL_SECONDS = max(TAKE_WAIT_SECONDS + CALL_MARGIN_SECONDS,
                    client_module.WAIT_POLL_SECONDS + client_module.CALL_MARGIN_SECONDS) + 4


def test_master_stopped_past_the_deadlines_agents_and_a_waiting_client_recover(cluster: Cluster) -> None:
    for name in AGENTS:
        cluster.start_agent(name, slots=2)
    with cluster.client() as c:
        ids = c.submit([JobSpec(command="sleep 0.4") for _ in range(60)])
    waited: dict[int, str] = {}
    failure: list[BaseException] = []
    reconnects: list[float] = []  # when the waiting client gave up on a call and connected again

    def waiter() -> None:
        try:
            with cluster.client() as c:
                reconnect = c._reconnect

                def counted() -> None:
                    reconnects.append(time.monotonic())
                    reconnect()

                c._reconnect = counted  # type: ignore[method-assign]
                waited.update(c.wait(ids, timeout=300))
        except BaseException as exc:  # noqa: BLE001 - handed to the test's thread, which asserts on it
            failure.append(exc)

    thread = threading.Thread(target=waiter, daemon=True)
    thread.start()
    with cluster.client() as c:
        wait_until(lambda: c.status()["counts"].get("done", 0) >= 6, timeout=60, what="the first jobs to finish")
    master = cluster.master
    assert master is not None
    # Mid-call: takes are parked, reports and heartbeats in flight, the client's wait() long-polling.
    master.send_signal(signal.SIGSTOP)
    stopped = time.monotonic()
    try:
        # A one-shot command meanwhile: one line, non-zero, by its deadline (not the master's return).
        status = cluster.corral("status", timeout=STALL_SECONDS + 30)
        status_took = time.monotonic() - stopped
        time.sleep(max(0.0, STALL_SECONDS - (time.monotonic() - stopped)))
    finally:
        master.send_signal(signal.SIGCONT)
    assert status.returncode != 0 and status.stdout == "", status
    said = status.stderr.strip()
    assert said.count("\n") == 0 and ("did not answer" in said or "in time" in said), said
    assert status_took < STALL_SECONDS, f"corral status took {status_took:.1f}s against a stopped master"
    thread.join(timeout=300)
    assert not thread.is_alive(), "the waiting client never came back"
    assert not failure, f"the waiting client failed: {failure[0]!r}"
    assert sorted(waited) == sorted(ids) and set(waited.values()) == {"done"}, waited
    # It did not just sit in a read until SIGCONT: its call passed its deadline while the master was
    # stopped, and it connected again by itself (the tries in the stall fail; one after it succeeds).
    assert any(stopped < when < stopped + STALL_SECONDS for when in reconnects), (reconnects, stopped)
    for name in AGENTS:
        log = cluster.agent_log(name)
        # Each agent gave up on a call past its deadline (not on a connection the kernel closed), and
        # registered again by itself.
        assert "in time" in log, log[-3000:]
        assert log.count("registered with master") >= 2, log[-3000:]
        assert cluster.agents[name].poll() is None, f"agent {name} exited"
    with cluster.client() as c:
        wait_until(lambda: sorted(a["name"] for a in c.agents() if a["state"] == "up") == sorted(AGENTS),
                 timeout=60, what="every agent up again")
        more = c.submit([JobSpec(command="sleep 0.3") for _ in range(12)])
        assert set(c.wait(more, timeout=120).values()) == {"done"}
        assert {c.job(j)["agent"] for j in more} == set(AGENTS)  # every agent takes work again
    journal_outcomes(cluster.home / "corral.db", ids + more)
