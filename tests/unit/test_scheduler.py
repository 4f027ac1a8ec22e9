"""The scheduler in-process, on a real SQLite journal: submit, take, report, retries, cancel, requeue, leases,
agents coming and going, and recovery when the journal is opened again by a new master."""

from __future__ import annotations

import logging
import time

import pytest

from corral.agent.errors import BadJobSpec, CorralError, NameTaken, ProtocolMismatch, UnknownAgent, UnknownJob
from corral.agent.protocol import PROTOCOL_VERSION, RELEASED, JobSpec
from corral.console.master.records import AgentState
from corral.console.master.scheduler import Scheduler
from corral.console.master.store import Journal, Outcome
from corral.console.master.validate import MAX_JOBS

from .agentcalls import register, result, start, take
from .conftest import Master


def cmd(command: str = "true", **options: object) -> dict[str, object]:
    return JobSpec(command=command, **options).to_wire()  # type: ignore[arg-type]


def state_of(s: Scheduler, job_id: int) -> str:
    return s.wait([job_id], 0).get(job_id) or s.jobs[job_id].state


# ---- submit ------------------------------------------------------------------------------------

def test_submit_journals_before_it_returns(master: Master) -> None:
    s = master.scheduler
    ids = s.submit([cmd("echo a", name="first", tags=["gpu"], env={"A": "1"}), cmd("echo b", priority=5)])
    assert ids == [1, 2]
    row = s.journal.job(1)
    assert row is not None and (row.name, row.command, row.state, row.tags, row.env) == (
        "first", "echo a", "queued", '["gpu"]', '{"A":"1"}')
    again = master.restart()  # a new master on the same file has them
    assert sorted(again.jobs) == [1, 2] and again.jobs[2].priority == 5 and again.next_id == 3


def test_submit_is_all_or_nothing(scheduler: Scheduler) -> None:
    with pytest.raises(BadJobSpec, match=r"^job 2 of 3: priority must be a whole number"):
        scheduler.submit([cmd(), cmd(priority=2**40), cmd()])
    with pytest.raises(BadJobSpec, match="^job: func must be a 'module:function' string"):
        scheduler.submit([{"func": ["not", "a", "name"]}])
    assert scheduler.jobs == {} and scheduler.next_id == 1 and scheduler.journal.counts() == {}


def test_submit_limits(scheduler: Scheduler) -> None:
    with pytest.raises(BadJobSpec, match="submit\\(\\) takes a non-empty list of job specs"):
        scheduler.submit([])
    with pytest.raises(BadJobSpec, match="submit\\(\\) takes a non-empty list"):
        scheduler.submit({"command": "true"})
    with pytest.raises(BadJobSpec, match=f"{MAX_JOBS + 1} jobs in one call; the limit is {MAX_JOBS}"):
        scheduler.submit([cmd()] * (MAX_JOBS + 1))


def test_submit_map_queues_the_template_with_each_payload(scheduler: Scheduler) -> None:
    ids, finished = scheduler.submit_map({"func": "m:f", "priority": 3, "tags": ["b", "a"]}, [b"1", b"2", b"3"])
    assert ids == [1, 2, 3] and finished == []
    assert [scheduler.jobs[j].payload for j in ids] == [b"1", b"2", b"3"]
    assert {(j.func, j.priority, j.tags) for j in scheduler.jobs.values()} == {("m:f", 3, frozenset({"a", "b"}))}
    assert [scheduler.journal.job(j).payload for j in ids] == [b"1", b"2", b"3"]  # type: ignore[union-attr]
    with pytest.raises(BadJobSpec, match="^job 2 of 2: payload must hold the arguments pickled, as bytes"):
        scheduler.submit_map({"func": "m:f"}, [b"ok", "not bytes"])
    with pytest.raises(BadJobSpec, match="^job 1 of 1: the job is 1048577 bytes"):
        scheduler.submit_map({"func": "m:f"}, [b"x" * (1024 * 1024 + 1)])
    with pytest.raises(BadJobSpec, match="needs a template with a module:function"):
        scheduler.submit_map({"command": "true"}, [b"x"])
    with pytest.raises(BadJobSpec, match="^template: retries must be"):
        scheduler.submit_map({"func": "m:f", "retries": -1}, [b"x"])
    assert len(scheduler.jobs) == 3


# ---- take and report ---------------------------------------------------------------------------

def test_take_serves_priority_then_age_and_only_matching_tags(scheduler: Scheduler) -> None:
    low, high, tagged, high2 = scheduler.submit([cmd(), cmd(priority=9), cmd(tags=["gpu"]), cmd(priority=9)])
    plain = register(scheduler, "plain")
    tasks = take(scheduler, plain, 10)
    assert [t.job_id for t in tasks] == [high, high2, low]  # never the gpu job
    assert all(t.attempt == 1 and t.command == "true" for t in tasks)
    gpu = register(scheduler, "gpu", tags=("gpu", "linux"))
    (taken,) = take(scheduler, gpu)
    assert taken.job_id == tagged
    assert scheduler.jobs[tagged].agent == "gpu" and scheduler.jobs[tagged].state == "assigned"  # not started yet
    start(scheduler, gpu, [taken])
    assert scheduler.jobs[tagged].agent == "gpu" and scheduler.jobs[tagged].state == "running"


def test_take_gives_no_more_than_asked(scheduler: Scheduler) -> None:
    scheduler.submit([cmd()] * 10)
    session = register(scheduler)
    assert len(take(scheduler, session, 3)) == 3
    assert len(take(scheduler, session, 0)) == 0
    assert sum(1 for j in scheduler.jobs.values() if j.state == "queued") == 7


def test_report_finishes_jobs_and_outcomes_follow(scheduler: Scheduler) -> None:
    ok, bad = scheduler.submit([cmd("echo ok"), cmd("exit 3")])
    session = register(scheduler)
    first, second = take(scheduler, session)
    tasks, cancel = scheduler.report(session, [result(first, stdout="ok\n"), result(second, "failed", 3, error="exit 3")],
                                     [], 0)
    assert tasks == [] and cancel == []
    assert scheduler.wait([ok, bad], 0) == {ok: "done", bad: "failed"}
    outcomes = [Outcome._make(row) for row in scheduler.outcomes([bad, ok])]
    assert [(o.id, o.state, o.exit_code, o.error) for o in outcomes] == [(bad, "failed", 3, "exit 3"), (ok, "done", 0, "")]
    assert all(type(row) is tuple for row in scheduler.outcomes([ok]))  # plain on the wire, not a NamedTuple
    job = scheduler.job(ok)
    assert job["attempt_list"][0]["stdout"] == b"ok\n" and job["state"] == "done"
    assert scheduler.agents["alpha"].done == 1 and scheduler.agents["alpha"].failed == 1


def test_a_report_brings_new_work_for_its_credit(scheduler: Scheduler) -> None:
    scheduler.submit([cmd()] * 3)
    session = register(scheduler)
    (task,) = take(scheduler, session, 1)
    tasks, _ = scheduler.report(session, [result(task)], [], 2)
    assert len(tasks) == 2


def test_failures_are_retried_then_final(scheduler: Scheduler) -> None:
    (job_id,) = scheduler.submit([cmd("flaky", retries=1)])
    session = register(scheduler)
    (first,) = take(scheduler, session)
    scheduler.report(session, [result(first, "failed", 1)], [], 0)
    assert scheduler.jobs[job_id].state == "queued" and scheduler.jobs[job_id].failures == 1
    (second,) = take(scheduler, session)
    assert second.attempt == 2
    scheduler.report(session, [result(second, "timeout", None, error="timed out")], [], 0)
    assert scheduler.wait([job_id], 0) == {job_id: "timeout"}
    attempts = scheduler.job(job_id)["attempt_list"]
    assert [(a["attempt"], a["state"], a["counted"]) for a in attempts] == [(1, "failed", 1), (2, "timeout", 1)]


def test_a_released_attempt_goes_back_to_the_queue_unspent(scheduler: Scheduler) -> None:
    (job_id,) = scheduler.submit([cmd()])
    session = register(scheduler)
    (task,) = take(scheduler, session)
    scheduler.report(session, [result(task, RELEASED, None)], [], 0)
    job = scheduler.jobs[job_id]
    assert (job.state, job.attempts, job.agent) == ("queued", 0, None)
    assert scheduler.journal.attempts(job_id) == []  # a release is no attempt
    (again,) = take(scheduler, session)
    assert again.attempt == 1


def test_a_report_is_checked_whole_before_anything_changes(scheduler: Scheduler) -> None:
    (job_id,) = scheduler.submit([cmd()])
    session = register(scheduler)
    (task,) = take(scheduler, session)
    start(scheduler, session, [task])
    for bad in (["not a row"], [result(task), result(task)[:5]], [(*result(task)[:2], "exploded", *result(task)[3:])],
                [result(task, error="\udcff")], [(*result(task)[:5], "text, not bytes", *result(task)[6:])],
                [(task.job_id, 2**70, *result(task)[2:])], "not a list"):
        with pytest.raises(CorralError, match="malformed report") as caught:
            scheduler.report(session, bad, [], 0)
        assert len(str(caught.value)) < 400
    with pytest.raises(CorralError) as caught:
        scheduler.report(session, [("x" * 10**6,) * 11], [], 0)
    assert len(str(caught.value)) < 1000  # a huge row is pictured, never printed whole
    assert scheduler.jobs[job_id].state == "running"
    scheduler.report(session, [result(task), result(task, "failed", 1)], [], 0)  # the same attempt twice: first stands
    assert scheduler.wait([job_id], 0) == {job_id: "done"}


def test_a_report_sent_again_is_not_counted_twice(scheduler: Scheduler) -> None:
    (job_id,) = scheduler.submit([cmd()])
    session = register(scheduler)
    (task,) = take(scheduler, session)
    scheduler.report(session, [result(task, stdout="once")], [], 0)
    scheduler.report(session, [result(task, stdout="once")], [], 0)  # its reply was lost: sent again
    assert scheduler.agents["alpha"].done == 1
    assert len(scheduler.journal.attempts(job_id)) == 1


def test_unknown_sessions_and_ids(scheduler: Scheduler) -> None:
    with pytest.raises(UnknownAgent, match="register again"):
        scheduler.take("no-such-session", 1, 0)
    with pytest.raises(UnknownJob, match="no job 99"):
        scheduler.cancel([99])
    with pytest.raises(UnknownJob, match="no job 'x'"):
        scheduler.wait(["x"], 0)
    with pytest.raises(UnknownJob):
        scheduler.job(0)


# ---- cancel and requeue --------------------------------------------------------------------------

def test_cancel_queued_at_once_running_through_its_agent(scheduler: Scheduler) -> None:
    queued, running = scheduler.submit([cmd(priority=-1), cmd(priority=1)])
    session = register(scheduler)
    (task,) = take(scheduler, session, 1)
    assert task.job_id == running
    assert scheduler.cancel([queued, running]) == {queued: "cancelled", running: "cancelling"}
    assert scheduler.wait([queued], 0) == {queued: "cancelled"}
    tasks, cancel = scheduler.take(session, 0, 0)
    assert (tasks, cancel) == ([], [(running, 1)])  # cancels name the attempt
    scheduler.report(session, [result(task, "cancelled", None, error="cancelled")], [], 0)
    assert scheduler.wait([running], 0) == {running: "cancelled"}
    assert scheduler.cancel([queued]) == {queued: "already final"}


def test_requeue_makes_a_new_job_with_the_same_spec(scheduler: Scheduler) -> None:
    (old,) = scheduler.submit([cmd("make", name="build", priority=4, tags=["x"], env={"K": "v"}, timeout=9)])
    scheduler.cancel([old])
    (new,) = scheduler.requeue([old])
    job = scheduler.jobs[new]
    assert new == old + 1 and (job.name, job.command, job.priority, job.tags, job.env, job.timeout) == (
        "build", "make", 4, frozenset({"x"}), {"K": "v"}, 9.0)


# ---- agents, leases, and a master's restart ----------------------------------------------------

def test_register_refuses_a_second_live_agent_of_one_name(scheduler: Scheduler) -> None:
    register(scheduler, "alpha", instance="one")
    with pytest.raises(NameTaken, match="an agent named 'alpha' is already connected"):
        register(scheduler, "alpha", instance="two")
    register(scheduler, "alpha", instance="one")  # the same agent reconnecting is welcome
    with pytest.raises(ProtocolMismatch):
        scheduler.register({"name": "old", "protocol": PROTOCOL_VERSION + 1}, [])


def test_a_silent_agent_is_lost_and_its_jobs_run_elsewhere(master: Master) -> None:
    s = master.scheduler
    s.max_lost = 1
    (job_id,) = s.submit([cmd()])
    first = register(s, "alpha")
    take(s, first)
    s.agents["alpha"].heard -= s.lease_seconds + 1  # its lease ran out (no sleeping in this tier)
    s.expire_leases()
    assert s.agents["alpha"].state is AgentState.LOST and s.jobs[job_id].state == "queued"
    assert s.agent_list()[0]["state"] == "lost"
    second = register(s, "beta")
    (again,) = take(s, second)
    assert again.attempt == 2
    s.agents["beta"].heard -= s.lease_seconds + 1
    s.expire_leases()  # lost more than max_lost times: it ends lost
    assert s.wait([job_id], 0) == {job_id: "lost"}
    assert "its agent was lost 2 times" in (s.journal.job(job_id).error or "")  # type: ignore[union-attr]


def test_a_late_success_of_a_requeued_attempt_wins(scheduler: Scheduler) -> None:
    (job_id,) = scheduler.submit([cmd()])
    alpha = register(scheduler, "alpha")
    (first,) = take(scheduler, alpha)
    scheduler.agents["alpha"].heard -= scheduler.lease_seconds + 1
    scheduler.expire_leases()
    beta = register(scheduler, "beta")
    take(scheduler, beta)  # attempt 2 runs on beta
    # alpha comes back, running nothing, its finished attempt 1 still to hand in (as an agent's outbox says)
    alpha = register(scheduler, "alpha", running=[(job_id, 1)])
    scheduler.report(alpha, [result(first)], [], 0)  # ... and hands in attempt 1's success
    assert scheduler.wait([job_id], 0) == {job_id: "done"}
    assert scheduler.take(beta, 0, 0)[1] == [(job_id, 2)]  # attempt 2 is cancelled


def test_drain_and_retire(scheduler: Scheduler) -> None:
    a, b = scheduler.submit([cmd(), cmd()])
    session = register(scheduler)
    take(scheduler, session, 1)
    assert scheduler.drain_agent("alpha") is True
    assert take(scheduler, session, 10) == []  # draining: no more work
    assert scheduler.agent_list()[0]["state"] == "draining"
    scheduler.retire_agent("alpha", "stopped by the operator")
    assert scheduler.agents["alpha"].state is AgentState.STOPPED and scheduler.jobs[a].state == "queued"
    assert scheduler.drain_agent("alpha") is False and scheduler.drain_agent("nobody") is False
    scheduler.retire_agent("nobody", "no such agent")  # nothing to do, no error
    with pytest.raises(UnknownAgent):
        scheduler.take(session, 1, 0)


def test_recovery_after_the_journal_is_opened_again(master: Master) -> None:
    s = master.scheduler
    done, running, kept, queued = s.submit([cmd(), cmd(priority=3), cmd(priority=2), cmd(priority=-5)])
    session = register(s, "alpha")
    tasks = {t.job_id: t for t in take(s, session, 3)}
    assert sorted(tasks) == [done, running, kept]
    start(s, session, list(tasks.values()))
    s.report(session, [result(tasks[done])], [], 0)
    s = master.restart()  # kill -9 and start again: only the journal is left
    assert s.wait([done], 0) == {done: "done"}
    assert {j: s.jobs[j].state for j in (running, kept, queued)} == {running: "running", kept: "running",
                                                                     queued: "queued"}
    # The agent comes back still running `kept` only: `running` goes back to the queue, first.
    session = register(s, "alpha", running=[(kept, 1)])
    assert s.jobs[running].state == "queued" and s.jobs[kept].state == "running"
    assert [(t.job_id, t.attempt) for t in take(s, session, 10)] == [(running, 2), (queued, 1)]
    # Running jobs of an agent that never comes back are queued again after a lease.
    s = master.restart()
    s.orphans_since -= s.lease_seconds + 1
    s.expire_leases()
    assert {s.jobs[j].state for j in (running, kept, queued)} == {"queued"}
    assert s.next_id == queued + 1


def test_journal_survives_reopening_with_named_rows(tmp_path: object) -> None:
    from pathlib import Path

    path = Path(str(tmp_path)) / "j.db"
    s = Scheduler(Journal(path))
    s.submit([cmd("echo one", name="n1")])
    s.journal.close()
    journal = Journal(path)
    (row,) = list(journal.active_jobs())
    assert (row.id, row.name, row.command, row.state, row.attempts) == (1, "n1", "echo one", "queued", 0)
    journal.close()


# ---- events: the -v lines ------------------------------------------------------------------------

def test_events_are_logged_as_the_readme_shows_them(scheduler: Scheduler, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="corral.console.master.scheduler")
    (job_id,) = scheduler.submit([cmd()])
    session = register(scheduler)
    (task,) = take(scheduler, session)
    scheduler.report(session, [result(task, started=10.0, ended=11.02)], [], 0)
    lines = [r.getMessage() for r in caplog.records]
    assert f"dispatched {job_id} → alpha" in lines
    assert f"finished {job_id} on alpha: exit 0 in 1.02s" in lines
    assert f"queued {job_id}" in lines and "agent alpha up: 4 slots, tags -" in lines


def test_the_hot_paths_keep_their_pace(scheduler: Scheduler) -> None:
    """Not a benchmark (bench/ is): a guard against per-job work creeping into submit, take and report."""
    start = time.perf_counter()
    scheduler.submit([cmd()] * 5_000)
    ids, _ = scheduler.submit_map({"func": "m:f"}, [b"x"] * 5_000)
    session = register(scheduler)
    while True:
        tasks = take(scheduler, session, 2000)
        if not tasks:
            break
        scheduler.report(session, [result(t) for t in tasks], [], 0)
    assert scheduler.wait(ids[-1:], 0) == {ids[-1]: "done"}
    assert time.perf_counter() - start < 4.0  # about 0.2 s alone on the shared 2-CPU machine
