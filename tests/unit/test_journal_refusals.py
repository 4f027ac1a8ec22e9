"""A journal that refuses writes, in-process: every path that writes (submit, dispatch, results, cancel,
lease expiry, register, retire) raises JournalFailed in one line and leaves the scheduler's memory exactly
as it was; sent again once the journal takes writes, the same call does what it would have done, and
memory and journal agree. The refusal is SQLite's own (`PRAGMA query_only`, as a read-only file system
answers), on a real journal file; the full-disk case runs on a real tmpfs in tests/test_journal_full.py."""

from __future__ import annotations

import sqlite3
import time
from contextlib import contextmanager
from typing import Any, Iterator

import pytest

from corral.agent.errors import JournalFailed
from corral.agent.protocol import RELEASED, JobSpec
from corral.console.master.records import QUEUED, AgentState
from corral.console.master.scheduler import Scheduler

from .agentcalls import register, result, take
from .conftest import Master


def cmd(command: str = "true", **options: object) -> dict[str, object]:
    return JobSpec(command=command, **options).to_wire()  # type: ignore[arg-type]


@contextmanager
def refusing(s: Scheduler) -> Iterator[None]:
    """The journal's writer refuses every write while inside (SQLite: attempt to write a readonly database)."""
    s.journal.db.execute("PRAGMA query_only=1")
    try:
        yield
    finally:
        s.journal.db.execute("PRAGMA query_only=0")


def memory(s: Scheduler) -> dict[str, Any]:
    """Everything a call could change in the scheduler's memory, as plain values."""
    queued = sorted(job_id for heap in s.queues.values() for _, job_id in heap
                    if job_id in s.jobs and s.jobs[job_id].state == QUEUED)
    return {
        "jobs": {j.id: (j.state, j.attempts, j.failures, j.lost, j.agent, j.started) for j in s.jobs.values()},
        "queued": queued,
        "agents": {a.name: (a.session, a.state, sorted(a.running), sorted(a.cancel), a.done, a.failed)
                   for a in s.agents.values()},
        "sessions": sorted(s.sessions),
        "final": dict(s.recent_final),
        "final_counts": dict(s.final_counts),
        "next_id": s.next_id,
        "finished_times": len(s.finished_times),
    }


def journal_agrees(s: Scheduler) -> None:
    """Every job's journal row says what memory says (active ones), or is final (the rest)."""
    db = sqlite3.connect(str(s.journal.path))
    try:
        rows = {r[0]: r[1:] for r in db.execute("SELECT id, state, attempts, failures, lost, agent FROM jobs")}
    finally:
        db.close()
    assert len(rows) == s.next_id - 1
    for job_id, (state, attempts, failures, lost, agent) in rows.items():
        job = s.jobs.get(job_id)
        if job is None:
            assert s.recent_final.get(job_id, state) == state and state not in ("queued", "running"), (job_id, state)
        else:
            assert (state, attempts, failures, lost, agent) == (job.state, job.attempts, job.failures, job.lost,
                                                                job.agent), job_id


def refused(s: Scheduler, call: Any, *args: Any) -> None:
    """`call(*args)` is refused in one line naming the journal, and changes nothing in memory."""
    before = memory(s)
    with refusing(s), pytest.raises(JournalFailed) as caught:
        call(*args)
    message = str(caught.value.message)
    assert message == f"journal write failed: attempt to write a readonly database ({s.journal.path})", message
    assert "\n" not in str(caught.value)
    assert memory(s) == before
    assert not s.journal.health.ok and s.journal.health.error == message


def test_submit_refused_then_sent_again(master: Master) -> None:
    s = master.scheduler
    refused(s, s.submit, [cmd("echo a"), cmd("echo b")])
    assert s.status()["journal"]["ok"] is False and s.status()["journal"]["refused"] == 1
    assert s.submit([cmd("echo a"), cmd("echo b")]) == [1, 2]  # the ids the refused call would have had
    assert s.journal.health.ok and s.status()["journal"] == {"ok": True, "error": None, "since": None, "refused": 0}
    journal_agrees(s)


def test_dispatch_refused_keeps_the_jobs_queued_and_the_cancels(master: Master) -> None:
    s = master.scheduler
    ids = s.submit([cmd(priority=p) for p in (1, 2, 3)])
    session = register(s, slots=4)
    refused(s, take, s, session, 2)
    [first] = take(s, session, 1)
    assert first.job_id == ids[2]  # priority order as if nothing had happened
    s.cancel([first.job_id])
    before = memory(s)
    with refusing(s):  # a take that cannot dispatch still hands out the kill, which needs no write
        tasks, cancel = s.take(session, 2, 0)
    assert (tasks, cancel) == ([], [(first.job_id, first.attempt)])  # a kill names the attempt
    assert memory(s)["jobs"] == before["jobs"] and memory(s)["queued"] == before["queued"]
    assert [t.job_id for t in take(s, session, 2)] == [ids[1], ids[0]]
    journal_agrees(s)


def test_results_refused_then_handed_in_again(master: Master) -> None:
    s = master.scheduler
    ids = s.submit([cmd("a"), cmd("b", retries=1), cmd("c")])
    session = register(s, slots=4)
    a, b, c = take(s, session, 3)
    results = [result(a, stdout="out a\n"), result(b, "failed", 1), result(c, RELEASED, None)]
    refused(s, s.report, session, results, [], 0)
    assert s.wait(ids, 0) == {}
    s.report(session, results, [], 0)
    assert s.wait(ids, 0) == {ids[0]: "done"}
    assert (s.jobs[ids[1]].state, s.jobs[ids[1]].failures) == (QUEUED, 1)  # its retry
    assert (s.jobs[ids[2]].state, s.jobs[ids[2]].attempts) == (QUEUED, 0)  # handed back, not an attempt
    assert s.agents["alpha"].done == 1 and s.agents["alpha"].failed == 1
    s.report(session, results, [], 0)  # and once more (the reply was lost): nothing is counted twice
    assert s.agents["alpha"].done == 1 and s.agents["alpha"].failed == 1
    assert [x.attempt for x in s.journal.attempts(ids[0])] == [1]
    journal_agrees(s)


def test_two_attempts_of_one_job_in_one_refused_report(master: Master) -> None:
    """A late success and the newer attempt in the same report: judged in turn, refused whole, then applied."""
    s = master.scheduler
    [job] = s.submit([cmd()])
    [old] = take(s, register(s, slots=2))
    s.agents["alpha"].heard -= s.lease_seconds + 1  # silent past its lease: re-queued ...
    s.expire_leases()
    session = register(s, slots=2, running=[(job, 1)])  # ... back, attempt 1 still its own ...
    [new] = take(s, session)  # ... and dispatched again as attempt 2
    assert (old.attempt, new.attempt) == (1, 2)
    results = [result(old, ended=102.0), result(new, ended=103.0)]
    refused(s, s.report, session, results, [], 0)
    s.report(session, results, [], 0)
    assert s.wait([job], 0) == {job: "done"}
    assert [(a.attempt, a.counted) for a in s.journal.attempts(job) if a.attempt == 2] == [(2, 0)]
    journal_agrees(s)


def test_cancel_refused(master: Master) -> None:
    s = master.scheduler
    running, queued = s.submit([cmd(), cmd()])
    session = register(s, slots=1)
    take(s, session, 1)
    s.submit([cmd()])
    refused(s, s.cancel, [queued, running, queued])
    assert s.cancel([queued, running, queued]) == {queued: "cancelled", running: "cancelling"}
    assert s.take(session, 0, 0) == ([], [(running, 1)])  # a kill names the attempt
    journal_agrees(s)


def test_lease_expiry_refused_is_tried_again(master: Master) -> None:
    s = Scheduler(master.scheduler.journal, lease_seconds=0.2)
    master.scheduler = s
    ids = s.submit([cmd(), cmd()])
    session = register(s, slots=2)
    take(s, session)
    time.sleep(0.3)
    refused(s, s.expire_leases)
    assert s.agents["alpha"].state is AgentState.UP  # not lost until its jobs are re-queued
    s.expire_leases()
    assert s.agents["alpha"].state is AgentState.LOST
    assert [(s.jobs[j].state, s.jobs[j].lost) for j in ids] == [(QUEUED, 1), (QUEUED, 1)]
    journal_agrees(s)


def test_register_refused_keeps_the_old_session(master: Master) -> None:
    s = master.scheduler
    [job] = s.submit([cmd()])
    old = register(s, slots=1)
    take(s, old)
    # Another process under that name (the first died with the job; its lease ran out) comes back
    # without the job: re-queueing it is a write.
    s.agents["alpha"].heard -= s.lease_seconds + 1
    refused(s, register, s, "alpha", 1, (), [], "alpha-2")
    assert s.sessions[old].name == "alpha"
    new = register(s, slots=1, instance="alpha-2")
    assert old not in s.sessions and new in s.sessions
    assert (s.jobs[job].state, s.jobs[job].lost) == (QUEUED, 1)
    journal_agrees(s)


def test_retire_refused(master: Master) -> None:
    s = master.scheduler
    [job] = s.submit([cmd()])
    session = register(s, slots=1)
    take(s, session)
    refused(s, s.retire_agent, "alpha", "stopped over SSH")
    s.retire_agent("alpha", "stopped over SSH")
    assert s.agents["alpha"].state is AgentState.STOPPED and s.jobs[job].state == QUEUED
    journal_agrees(s)


def test_probe_heals_only_once_writes_go_through(master: Master) -> None:
    s = master.scheduler
    refused(s, s.submit, [cmd()])
    with refusing(s):
        assert s.journal.probe() is False
        assert s.journal.health.refused == 2
    assert s.journal.probe() is True and s.journal.health.ok


def test_housekeeping_logs_a_failing_chore_once_and_runs_it_again(master: Master,
                                                                  caplog: pytest.LogCaptureFixture) -> None:
    from corral.console.master.server import Housekeeping

    s = Scheduler(master.scheduler.journal, lease_seconds=0.2)
    master.scheduler = s
    [job] = s.submit([cmd()])
    take(s, register(s, slots=1))
    time.sleep(0.3)
    chores = Housekeeping(s, s.journal)
    with refusing(s), caplog.at_level("WARNING", logger="corral"):
        chores.run()
        chores.run()
    failed = [r.getMessage() for r in caplog.records if r.getMessage().startswith("lease expiry failed")]
    assert failed == [f"lease expiry failed: journal write failed: attempt to write a readonly database"
                      f" ({s.journal.path}); trying again every second"], failed
    assert s.agents["alpha"].state is AgentState.UP and s.jobs[job].agent == "alpha"
    with caplog.at_level("WARNING", logger="corral"):
        chores.run()
    assert "lease expiry works again" in caplog.messages
    assert s.agents["alpha"].state is AgentState.LOST and s.jobs[job].state == QUEUED
    journal_agrees(s)
