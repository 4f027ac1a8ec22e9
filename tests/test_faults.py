"""Fault injection on real processes: agents and the master killed with SIGKILL, a poison job, a torn
journal, a network partition. Each test asserts, from the journal file itself, that every submitted
job ends with exactly one recorded outcome and that none is lost."""

from __future__ import annotations

import pickle
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest

from corral.agent.protocol import JobSpec
from tests.cluster import REPO, Cluster, wait_until
from tests.faultkit import (
    Namespace,
    alive,
    attempt_rows,
    descendants,
    journal_outcomes,
    kill_pids,
    require_netns,
    running_cluster,
)


def lines(path: Path) -> list[str]:
    return path.read_text().split() if path.exists() else []


def agent_states(c) -> dict[str, tuple[str, int]]:  # type: ignore[no-untyped-def]
    return {a["name"]: (a["state"], a["pid"]) for a in c.agents()}


def started_on(c, job_id: int, agent: str) -> float:  # type: ignore[no-untyped-def]
    return next(a["started"] for a in c.job(job_id)["attempt_list"] if a["agent"] == agent)


def test_killed_agent_jobs_rerun_elsewhere_ahead_of_newer_work(tmp_path: Path) -> None:
    with running_cluster(tmp_path / "home", "--lease", "3") as cluster:
        _killed_agent(cluster, tmp_path / "runs")


def _killed_agent(cluster: Cluster, runs: Path) -> None:
    victim = cluster.start_agent("victim", slots=2)
    with cluster.client() as c:
        # Two jobs running on the victim, then newer work of the same priority queued behind them.
        held = c.submit([JobSpec(command=f"echo $CORRAL_JOB_ID >> {runs}; sleep 2; echo out $CORRAL_JOB_ID")
                         for _ in range(2)])
        wait_until(lambda: len(lines(runs)) == 2, timeout=30, what="both jobs to start on the victim")
        assert {c.job(j)["agent"] for j in held} == {"victim"}
        newer = c.submit([JobSpec(command="echo newer") for _ in range(4)])
        assert all(c.job(j)["state"] == "queued" for j in newer)  # the victim's two slots are full

        victim.send_signal(signal.SIGKILL)
        victim.wait(timeout=10)
        wait_until(lambda: agent_states(c)["victim"][0] == "lost", timeout=30, what="the master to declare the victim lost")
        assert all(c.job(j)["state"] == "queued" for j in held + newer)

        cluster.start_agent("rescuer", slots=1)
        states = c.wait(held + newer, timeout=60)
        assert states == {j: "done" for j in held + newer}
        records = {j: c.job(j) for j in held}
        # The re-queued jobs ran first on the rescuer's single slot, before the newer work.
        order = sorted(held + newer, key=lambda j: started_on(c, j, "rescuer"))
    for j, record in records.items():
        assert record["agent"] == "rescuer" and record["attempts"] == 2 and record["lost"] == 1, record
        assert record["attempt_list"][-1]["stdout"] == f"out {j}\n".encode()
    assert order[:2] == held, order
    journal_outcomes(cluster.home / "corral.db", held + newer, states=("done",))



def test_master_killed_mid_flow_and_restarted(tmp_path: Path) -> None:
    with running_cluster(tmp_path / "home", "--lease", "3") as cluster:
        agents = {name: cluster.start_agent(name, slots=2, verbose=False).pid for name in ("a", "b")}
        with cluster.client() as c:
            calls = c.submit([JobSpec(func="tests.faultjobs:soak", payload=pickle.dumps(((i, 0.02), {})))
                              for i in range(300)])
            shells = c.submit([JobSpec(command=f"sleep 0.{i % 4}; echo shell {i}") for i in range(60)])
            wait_until(lambda: c.status()["counts"]["done"] >= 60, timeout=60, what="some jobs to finish")
        cluster.master.send_signal(signal.SIGKILL)  # mid-flow: jobs queued, running and finished
        cluster.master.wait(timeout=10)
        for name in agents:
            wait_until(lambda: "unreachable" in cluster.agent_log(name), timeout=30,
                     what=f"agent {name} to notice the master is gone")
        cluster.start_master("--lease", "3")  # on a new port: the agents find it in master.json
        with cluster.client() as c:
            states = c.wait(calls + shells, timeout=120)
            assert len(states) == len(calls + shells), "not every job finished after the restart"
            # The agents came back by themselves: the same processes, registered again.
            wait_until(lambda: agent_states(c) == {n: ("up", pid) for n, pid in agents.items()}, timeout=30,
                     what="both agents up again")
            assert c.values(calls) == list(range(300))
            history = {j: c.job(j)["attempt_list"] for j in shells}
        for i, j in enumerate(shells):
            counted = [a for a in history[j] if a["counted"]]
            assert [a["stdout"] for a in counted] == [f"shell {i}\n".encode()], (j, history[j])
        journal_outcomes(cluster.home / "corral.db", calls + shells, states=("done",))


def test_restarted_master_requeues_jobs_of_an_agent_that_never_returns(tmp_path: Path) -> None:
    with running_cluster(tmp_path / "home", "--lease", "3") as cluster:
        gone = cluster.start_agent("gone", slots=2)
        with cluster.client() as c:
            jobs = c.submit([JobSpec(command="sleep 5; echo finally") for _ in range(2)])
            wait_until(lambda: all(c.job(j)["state"] == "running" for j in jobs), timeout=30, what="jobs to start")
        stays = cluster.start_agent("stays", slots=2)
        # A host crash and a master crash together: the agent and everything it ran, then the master.
        kill_pids([gone.pid, *descendants(gone.pid)])
        gone.wait(timeout=10)
        cluster.master.send_signal(signal.SIGKILL)
        cluster.master.wait(timeout=10)
        cluster.start_master("--lease", "3")
        t0 = time.monotonic()
        with cluster.client() as c:
            assert {c.job(j)["state"] for j in jobs} == {"running"}  # as the journal left them
            assert c.wait(jobs, timeout=60) == {j: "done" for j in jobs}
            took = time.monotonic() - t0
            records = [c.job(j) for j in jobs]
            assert agent_states(c)["stays"] == ("up", stays.pid)
        assert took >= 3 - 0.5, f"re-queued after {took:.1f}s, before the lease ran out"
        for record in records:
            assert record["agent"] == "stays" and record["lost"] == 1 and record["attempts"] == 2, record
        journal_outcomes(cluster.home / "corral.db", jobs, states=("done",))


def test_results_finished_while_the_master_is_away_survive_an_agent_restart(tmp_path: Path) -> None:
    """What finishes while the master is down waits in the agent's spool file: killing the agent
    too, then restarting both, hands the result in instead of running the job again."""
    runs = tmp_path / "runs"
    with running_cluster(tmp_path / "home", "--lease", "3") as cluster:
        agent = cluster.start_agent("a", slots=1)
        with cluster.client() as c:
            [job] = c.submit([JobSpec(command=f"echo x >> {runs}; sleep 2; echo result")])
            wait_until(lambda: lines(runs), timeout=30, what="the job to start")
        cluster.master.send_signal(signal.SIGKILL)
        cluster.master.wait(timeout=10)
        wait_until(lambda: f"Finished job: {job} (done)" in cluster.agent_log("a"), timeout=30,
                 what="the job to finish while the master is away")
        spool = cluster.home / "spool" / "a.pickle"
        wait_until(spool.exists, timeout=10, what="the agent to keep the unreported result in its spool")
        agent.send_signal(signal.SIGKILL)
        agent.wait(timeout=10)
        cluster.start_master("--lease", "3")
        cluster.start_agent("a", slots=1)
        with cluster.client() as c:
            assert c.wait([job], timeout=30) == {job: "done"}
            record = c.job(job)
        assert record["attempts"] == 1 and record["lost"] == 0, record
        assert record["attempt_list"][-1]["stdout"] == b"result\n"
        assert lines(runs) == ["x"], "the job ran again although its result was spooled"
        wait_until(lambda: not spool.exists(), timeout=10, what="the spool to be emptied once handed in")
        journal_outcomes(cluster.home / "corral.db", [job], states=("done",))


def test_late_result_of_a_requeued_job_wins_while_it_waits_in_the_queue(tmp_path: Path) -> None:
    """An agent stalls (SIGSTOP) past its lease: its job goes back to the queue, where it waits, for
    only that agent can run it (tags). The agent wakes and reports the run it finished meanwhile:
    that result counts (it finished first), rather than the job running a second time."""
    runs, ends = tmp_path / "runs", tmp_path / "ends"
    with running_cluster(tmp_path / "home", "--lease", "3") as cluster:
        agent = cluster.start_agent("slow", slots=1, tags="only")
        with cluster.client() as c:
            [job] = c.submit([JobSpec(command=f"echo $CORRAL_ATTEMPT >> {runs}; sleep 1;"
                                              f" echo attempt $CORRAL_ATTEMPT; echo end >> {ends}", tags=("only",))])
            wait_until(lambda: lines(runs), timeout=30, what="the job to start")
            agent.send_signal(signal.SIGSTOP)
            try:
                wait_until(lambda: agent_states(c)["slow"][0] == "lost", timeout=30, what="the stalled agent to be lost")
                record = c.job(job)
                assert record["state"] == "queued" and record["lost"] == 1, record
                wait_until(lambda: lines(ends), timeout=30, what="the first run to finish, unreported")
            finally:
                agent.send_signal(signal.SIGCONT)
            assert c.wait([job], timeout=30) == {job: "done"}
            wait_until(lambda: agent_states(c)["slow"] == ("up", agent.pid), timeout=30, what="the agent back up")
            record = c.job(job)
        counted = [(a["attempt"], a["agent"], a["stdout"]) for a in record["attempt_list"] if a["counted"]]
        assert counted == [(1, "slow", b"attempt 1\n")], record["attempt_list"]
        journal_outcomes(cluster.home / "corral.db", [job], states=("done",))


@pytest.mark.parametrize("max_lost", [None, 1])
def test_poison_job_that_kills_its_agent_ends_lost(tmp_path: Path, max_lost: int | None) -> None:
    limit = 3 if max_lost is None else max_lost  # the default is 3
    runs = tmp_path / "poison-runs"
    options = ["--lease", "3", *(["--max-lost", str(max_lost)] if max_lost is not None else [])]
    with running_cluster(tmp_path / "home", *options) as cluster:
        # Tags keep the two apart: only the victim can take the poison, only `healthy` the rest.
        cluster.start_agent("healthy", slots=2, tags="safe")
        victims = [cluster.start_agent("victim", slots=1, tags="poison").pid]
        with cluster.client() as c:
            [poison] = c.submit([JobSpec(command=f"echo $CORRAL_AGENT_PID >> {runs}; kill -9 $CORRAL_AGENT_PID",
                                         tags=("poison",))])
            innocent = c.submit([JobSpec(command="echo fine", tags=("safe",)) for _ in range(10)])
            deadline = time.monotonic() + 150
            # The operator's supervisor: once the master has given the dead victim up (its lease ran
            # out, so the name is free again), start a new one; until the job itself gives up.
            while c.job(poison)["state"] != "lost":
                assert time.monotonic() < deadline, f"poison job still {c.job(poison)['state']} after 150s"
                if cluster.agents["victim"].poll() is not None and agent_states(c)["victim"][0] == "lost":
                    victims.append(cluster.start_agent("victim", slots=1, tags="poison", wait=False).pid)
                time.sleep(0.1)
            record = c.job(poison)
            assert c.wait(innocent, timeout=60) == {j: "done" for j in innocent}
        assert record["lost"] == limit + 1
        assert f"its agent was lost {limit + 1} times" in record["error"], record["error"]
        ran = [int(pid) for pid in lines(runs)]
        # It ran once per incarnation of the victim, each time killing the agent that ran it.
        assert len(ran) == limit + 1 and ran == victims[: limit + 1], (ran, victims)
        assert len(victims) == limit + 1, victims
        assert not any(alive(pid) for pid in ran)
        states = journal_outcomes(cluster.home / "corral.db", [poison, *innocent], states=("done", "lost"))
        assert states[poison] == "lost" and [states[j] for j in innocent] == ["done"] * 10


def _wal_commits(db: Path) -> tuple[int, list[int]]:
    """(page size, offsets of the commit frames of the WAL's current generation not yet copied into
    the database by a checkpoint). WAL layout: a 32-byte header (magic, version, page size,
    checkpoint seq, salt-1, salt-2, checksums), then frames: a 24-byte header (page number, database
    size after the commit or 0, salt-1, salt-2, checksums) and a page. The -shm file's checkpoint
    info (offset 96, native order) starts with nBackfill, the frames already checkpointed."""
    data = Path(f"{db}-wal").read_bytes()
    shm = Path(f"{db}-shm").read_bytes()
    if len(data) < 32 or len(shm) < 100:
        return 0, []
    page_size = struct.unpack(">I", data[8:12])[0]
    backfilled = struct.unpack("=I", shm[96:100])[0]
    salts = data[16:24]
    commits = []
    offset, index = 32, 0
    while offset + 24 + page_size <= len(data) and data[offset + 8 : offset + 16] == salts:
        if index >= backfilled and struct.unpack(">I", data[offset + 4 : offset + 8])[0]:
            commits.append(offset)
        offset += 24 + page_size
        index += 1
    return page_size, commits


def test_half_written_journal_opens_cleanly_and_stays_consistent(tmp_path: Path) -> None:
    """A power cut mid-write: kill -9 the master while it journals, cut the WAL inside a frame of a
    transaction no checkpoint has copied yet, start again. The journal opens, passes SQLite's
    integrity check, holds whole transactions only, and every job in it runs to one outcome."""
    import sqlite3
    import threading

    with running_cluster(tmp_path / "home") as cluster:
        db = cluster.home / "corral.db"
        agent = cluster.start_agent("a", slots=2, verbose=False)
        with cluster.client() as c:
            first = c.submit([JobSpec(command="echo early") for _ in range(20)])
            c.wait(first, timeout=30)
        stop = threading.Event()
        submitted: list[list[int]] = []
        writer_error: list[BaseException] = []

        def submit_until_stopped() -> None:
            try:
                with cluster.client() as c:
                    # Enough to fill the WAL; few enough that all of them run in seconds afterwards.
                    while not stop.is_set() and len(submitted) < 20:
                        submitted.append(c.submit([JobSpec(command="sleep 0.2; echo late", name="x" * 200)
                                                   for _ in range(5)]))
            except Exception as exc:  # noqa: BLE001 - the master dies under us: that is the point
                writer_error.append(exc)

        writer = threading.Thread(target=submit_until_stopped, daemon=True)
        writer.start()
        # The early jobs' own commits may already fill the WAL (no checkpoint yet): wait also for late
        # submissions the master confirmed, more than the two transactions the cut below tears, so
        # that some of them must survive it.
        wait_until(lambda: writer_error or (len(submitted) >= 5 and len(_wal_commits(db)[1]) >= 20),
                   timeout=30, what="confirmed late submissions and transactions in the WAL")
        assert not writer_error, f"the writer failed before the kill: {writer_error[0]!r}"
        cluster.master.send_signal(signal.SIGKILL)
        cluster.master.wait(timeout=10)
        stop.set()
        writer.join(timeout=30)
        page_size, commits = _wal_commits(db)
        assert len(commits) >= 2, "too few unchecked-pointed transactions in the WAL to cut one"
        agent.send_signal(signal.SIGKILL)
        agent.wait(timeout=10)
        # Inside the frame that commits the last-but-one transaction: it and the last one are torn.
        with open(f"{db}-wal", "r+b") as wal:
            wal.truncate(commits[-2] + 24 + page_size // 2)

        cluster.start_master()
        status = cluster.corral("status", "--json")
        assert status.returncode == 0, status.stderr
        check = sqlite3.connect(str(db), timeout=30)
        try:
            assert check.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
            ids = [row[0] for row in check.execute("SELECT id FROM jobs ORDER BY id")]
        finally:
            check.close()
        # Whole transactions survive or vanish: the ids still there are exactly 1..N.
        assert ids == list(range(1, len(ids) + 1)) and len(ids) > len(first)
        cluster.start_agent("a", slots=2, verbose=False)
        with cluster.client() as c:
            assert all(c.job(j)["state"] == "done" for j in first)
            assert len(c.wait(ids, timeout=120)) == len(ids), "not every surviving job finished"
            more = c.submit([JobSpec(command="echo after")])
            assert more == [len(ids) + 1]
            assert c.wait(more, timeout=30) == {more[0]: "done"}
        journal_outcomes(db, ids + more, states=("done",))


# ---- a network partition, with a real network namespace -----------------------------------------

@pytest.mark.netns
def test_partitioned_host_loses_its_lease_and_rejoins(tmp_path: Path) -> None:
    """An agent in its own network namespace runs jobs; its link goes down: its lease runs out and
    its jobs run on the local agent. The link comes back: the same agent process rejoins, its late
    results are kept as history only, and it takes work again. Nothing is recorded twice."""
    require_netns()
    ns = Namespace("part")
    go = tmp_path / "go"
    started = tmp_path / "started"
    far: subprocess.Popen | None = None
    try:
        ns.create()
        with running_cluster(tmp_path / "home", "--listen", f"{ns.host_addr}:0", "--allow-remote",
                             "--lease", "3") as cluster:
            host, port = cluster.address()
            assert host == ns.host_addr
            log = open(cluster.logs / "agent-far.log", "ab")
            far = subprocess.Popen(
                ["ip", "netns", "exec", ns.name, sys.executable, "-m", "corral.agent", "-v", "--connect",
                 f"{host}:{port}", "--name", "far", "--slots", "2", "--tags", "far"],
                env=cluster.env, cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
            with cluster.client() as c:
                wait_until(lambda: agent_states(c).get("far") == ("up", far.pid), timeout=30,
                         what="the far agent to register from its namespace")
                # Each job waits for the test's go-ahead, so none can finish before the cut.
                jobs = c.submit([JobSpec(command=f"echo $CORRAL_JOB_ID >> {started};"
                                                 f" while [ ! -e {go} ]; do sleep 0.05; done; echo ran")
                                 for _ in range(2)])
                wait_until(lambda: len(lines(started)) == 2, timeout=30, what="both jobs to start on the far agent")
                assert {c.job(j)["agent"] for j in jobs} == {"far"}
                cluster.start_agent("near", slots=2)

                ns.link(up=False)
                wait_until(lambda: agent_states(c)["far"][0] == "lost", timeout=30,
                         what="the far agent's lease to run out")
                go.touch()  # the far runs finish too, but their results cannot reach the master
                assert c.wait(jobs, timeout=60) == {j: "done" for j in jobs}
                for j in jobs:
                    record = c.job(j)
                    assert record["agent"] == "near" and record["lost"] == 1, record
                assert far.poll() is None  # cut off, not dead

                ns.link(up=True)
                wait_until(lambda: agent_states(c)["far"] == ("up", far.pid), timeout=120,
                         what="the far agent to rejoin by itself")
                db = cluster.home / "corral.db"
                wait_until(lambda: all(("far", "done", 0) in {r[1:] for r in attempt_rows(db, j)} for j in jobs),
                         timeout=60, what="the far agent's late results, kept as history")
                [again] = c.submit([JobSpec(command="echo back", tags=("far",))])
                assert c.wait([again], timeout=60) == {again: "done"}
                assert c.job(again)["agent"] == "far"
                for j in jobs:
                    record = c.job(j)
                    assert record["state"] == "done" and record["agent"] == "near", record
            journal_outcomes(db, [*jobs, again], states=("done",))
    finally:
        if far is not None and far.poll() is None:
            far.kill()
        ns.destroy()
        if far is not None:
            far.wait(timeout=10)
