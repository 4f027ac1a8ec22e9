"""Attempts, reconciliation and leases under faults, on real processes: an agent stopped past its lease that
gets its own job back, a master stopped past the lease (once, and again and again) with healthy agents, an
agent's connections cut while its take is parked. Each asserts from the journal file: every job one final
outcome, nothing left running, and (from what the jobs themselves append) how many times each really ran."""

from __future__ import annotations

import signal
import time
from pathlib import Path

import pytest

from corral.agent.protocol import JobSpec
from tests.cluster import wait_until
from tests.faultkit import (
    CutProxy,
    assert_nothing_running,
    descendants,
    journal_outcomes,
    journal_rows,
    record_run,
    running_cluster,
    runs_of,
    times_run,
)

LEASE = "3"
# Each test stops a process for several leases and waits out real jobs: seconds idle, minutes on a loaded
# 2-core machine, past pytest-timeout's default of 120 s.
SLOW = pytest.mark.timeout(360)


def agent_states(c) -> dict[str, tuple[str, int]]:  # type: ignore[no-untyped-def]
    return {a["name"]: (a["state"], a["pid"]) for a in c.agents()}


def lost_counts(db: Path, ids: list[int]) -> dict[int, int]:
    marks = ",".join("?" * len(ids))
    return dict(journal_rows(db, f"SELECT id, lost FROM jobs WHERE id IN ({marks})", *ids))


@SLOW
def test_an_agent_stopped_past_its_lease_gets_its_job_back_and_keeps_both_attempts_apart(tmp_path: Path) -> None:
    """The only agent is SIGSTOPped past its lease: its job is queued again, and, the agent back, dispatched
    to it again (attempt 2) while attempt 1 still runs there. The agent keeps the two apart: attempt 1
    finishes first and counts; attempt 2 is cancelled by its (job id, attempt), and nothing of it is left."""
    runs = tmp_path / "runs"
    db = tmp_path / "home" / "corral.db"
    with running_cluster(tmp_path / "home", "--lease", LEASE) as cluster:
        agent = cluster.start_agent("solo", slots=2)
        with cluster.client() as c:
            [job] = c.submit([JobSpec(command=record_run(runs) + "sleep 12; echo attempt $CORRAL_ATTEMPT")])
            wait_until(lambda: runs_of(runs), timeout=60, what="attempt 1 to start")
            agent.send_signal(signal.SIGSTOP)
            try:
                wait_until(lambda: agent_states(c)["solo"][0] == "lost", timeout=60, what="the stopped agent to be lost")
                record = c.job(job)
                assert record["state"] == "queued" and record["lost"] == 1, record
            finally:
                agent.send_signal(signal.SIGCONT)
            wait_until(lambda: (job, 2) in runs_of(runs), timeout=60, what="attempt 2 to start on the same agent")
            assert c.job(job)["agent"] == "solo"
            assert c.wait([job], timeout=60) == {job: "done"}
            wait_until(lambda: c.agents()[0]["busy"] == 0, timeout=30, what="the agent to hold nothing")
            wait_until(lambda: not [p for p in descendants(agent.pid) if _is_sleep(p)], timeout=30,
                     what="attempt 2's process to be gone")
            record = c.job(job)
            assert agent_states(c)["solo"] == ("up", agent.pid)
        counted = [(a["attempt"], a["agent"], a["stdout"]) for a in record["attempt_list"] if a["counted"]]
        assert counted == [(1, "solo", b"attempt 1\n")], record["attempt_list"]
        assert runs_of(runs) == {(job, 1): 1, (job, 2): 1}
        states = {a["attempt"]: a["state"] for a in record["attempt_list"]}
        assert states.get(2) == "cancelled", record["attempt_list"]
        journal_outcomes(db, [job], states=("done",))
        assert_nothing_running(db)


def _is_sleep(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip() == "sleep"
    except OSError:
        return False


@SLOW
def test_a_master_stopped_past_the_lease_blames_no_healthy_agent(tmp_path: Path) -> None:
    """SIGSTOP the master for more than twice the lease while two healthy agents run long jobs: when it
    wakes, no agent is lost, no job's lost count rises, and nothing runs a second time."""
    runs = tmp_path / "runs"
    db = tmp_path / "home" / "corral.db"
    with running_cluster(tmp_path / "home", "--lease", LEASE, "-v") as cluster:
        pids = {name: cluster.start_agent(name, slots=2).pid for name in ("a", "b")}
        with cluster.client() as c:
            jobs = c.submit([JobSpec(command=record_run(runs) + "sleep 10") for _ in range(4)])
            wait_until(lambda: len(runs_of(runs)) == 4, timeout=60, what="all four jobs to start")
            assert cluster.master is not None
            cluster.master.send_signal(signal.SIGSTOP)
            try:
                time.sleep(7)  # > 2 leases, < the agents' call deadlines
            finally:
                cluster.master.send_signal(signal.SIGCONT)
            assert c.wait(jobs, timeout=90) == {j: "done" for j in jobs}
            assert agent_states(c) == {name: ("up", pid) for name, pid in pids.items()}
            records = [c.job(j) for j in jobs]
        log = (cluster.logs / "master.log").read_text()
        assert " lost" not in log, log
        assert "every lease extended" in log, log
        assert all(r["attempts"] == 1 and r["lost"] == 0 for r in records), records
        assert times_run(runs) == {j: 1 for j in jobs}
        assert lost_counts(db, jobs) == {j: 0 for j in jobs}
        journal_outcomes(db, jobs, states=("done",))
        assert_nothing_running(db)


@SLOW
def test_repeated_short_master_stalls_lose_nothing(tmp_path: Path) -> None:
    """Eight stalls of the master, each just under the lease, barely apart, while jobs flow."""
    runs = tmp_path / "runs"
    db = tmp_path / "home" / "corral.db"
    with running_cluster(tmp_path / "home", "--lease", LEASE, "-v") as cluster:
        pids = {name: cluster.start_agent(name, slots=2).pid for name in ("a", "b")}
        with cluster.client() as c:
            jobs = c.submit([JobSpec(command=record_run(runs) + f"sleep {1 + i % 3}") for i in range(24)])
            wait_until(lambda: runs_of(runs), timeout=60, what="jobs to start")
            assert cluster.master is not None
            for _ in range(8):
                cluster.master.send_signal(signal.SIGSTOP)
                time.sleep(2.5)
                cluster.master.send_signal(signal.SIGCONT)
                time.sleep(0.3)
            assert c.wait(jobs, timeout=120) == {j: "done" for j in jobs}
            assert agent_states(c) == {name: ("up", pid) for name, pid in pids.items()}
            records = [c.job(j) for j in jobs]
        log = (cluster.logs / "master.log").read_text()
        assert " lost" not in log, log
        assert all(r["attempts"] == 1 and r["lost"] == 0 for r in records), records
        assert times_run(runs) == {j: 1 for j in jobs}
        journal_outcomes(db, jobs, states=("done",))
        assert_nothing_running(db)


@SLOW
def test_an_agents_connections_cut_while_its_take_is_parked(tmp_path: Path) -> None:
    """The agent reaches the master through a relay; all its connections are cut while its take is parked
    on the master, and new work is submitted at once. The parked take belongs to a session the agent
    replaces by registering again: no job is handed to it, or, handed to it before that, is queued again
    as a new attempt that counts nothing. Every job runs exactly once and none is left running."""
    runs = tmp_path / "runs"
    db = tmp_path / "home" / "corral.db"
    # A lease long enough for the agent's back-off: cut again and again, it waits longer each time (its
    # sessions are short), and an agent silent past its lease is rightly lost; that is not this test.
    with running_cluster(tmp_path / "home", "--lease", "12", "-v") as cluster:
        proxy = CutProxy(cluster.address())
        try:
            host, port = proxy.address
            agent = cluster.start_agent("relayed", 2, "", "--connect", f"{host}:{port}")
            jobs: list[int] = []
            with cluster.client() as c:
                for _ in range(4):
                    time.sleep(0.5)  # idle: its take is parked on the master
                    assert proxy.cut_agent_side() > 0
                    jobs += c.submit([JobSpec(command=record_run(runs) + "sleep 0.2") for _ in range(3)])
                    wait_until(lambda: c.wait(jobs, timeout=1) == {j: "done" for j in jobs}, timeout=60,
                             what="the jobs submitted so far to finish")
                records = [c.job(j) for j in jobs]
                assert agent_states(c)["relayed"] == ("up", agent.pid)
        finally:
            proxy.close()
        log = (cluster.logs / "master.log").read_text()
        assert log.count("agent relayed up") >= 5, log  # it registered again after each cut
        assert " lost" not in log, log
        assert all(r["lost"] == 0 for r in records), records
        assert times_run(runs) == {j: 1 for j in jobs}
        assert lost_counts(db, jobs) == {j: 0 for j in jobs}
        journal_outcomes(db, jobs, states=("done",))
        assert_nothing_running(db)
