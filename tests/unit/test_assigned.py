"""A job an agent has taken but not started is `assigned`: it runs, with its `started`, from when the agent
says its process started; counts and busy slots count running jobs only; a job cancelled while queued has
no run time."""

from __future__ import annotations

import pickle
import sqlite3
import threading
import time
from pathlib import Path
from typing import Iterator, List

import pytest

from corral.agent.errors import CorralError
from corral.agent.pool import JobPool
from corral.agent.protocol import JobResult, JobSpec, Task
from corral.console.master.scheduler import Scheduler

from .agentcalls import register, result, start, take
from .conftest import Master


def cmd(command: str = "true", **options: object) -> dict[str, object]:
    return JobSpec(command=command, **options).to_wire()  # type: ignore[arg-type]


def journal_row(s: Scheduler, job_id: int) -> tuple[object, ...]:
    db = sqlite3.connect(str(s.journal.path))
    try:
        return db.execute("SELECT state, started FROM jobs WHERE id=?", (job_id,)).fetchone()
    finally:
        db.close()


def test_taken_is_assigned_and_started_is_when_its_process_started(scheduler: Scheduler) -> None:
    first, second = scheduler.submit([cmd(), cmd()])
    session = register(scheduler, "alpha", slots=1)
    one, two = take(scheduler, session, 2)  # a slot and a prefetched job
    assert [scheduler.jobs[j].state for j in (first, second)] == ["assigned", "assigned"]
    assert scheduler.jobs[first].started is None and journal_row(scheduler, first) == ("assigned", None)
    (agent,) = scheduler.agent_list()
    assert (agent["busy"], agent["assigned"]) == (0, 2)
    status = scheduler.status()
    assert (status["counts"]["running"], status["counts"]["assigned"], status["busy"], status["assigned"]) == (0, 2, 0, 2)
    start(scheduler, session, [one], when=1234.5)
    assert (scheduler.jobs[first].state, scheduler.jobs[first].started) == ("running", 1234.5)
    assert journal_row(scheduler, first) == ("running", 1234.5)
    snapshot = scheduler.snapshot(0, {"dispatched": {"offset": 0, "limit": 10}})
    assert (snapshot["counts"]["running"], snapshot["counts"]["assigned"], snapshot["counts"]["queued"]) == (1, 1, 0)
    assert (snapshot["busy"], snapshot["assigned"]) == (1, 1)
    states = {row[0]: row[2] for row in snapshot["dispatched"]["rows"]}
    assert states == {first: "running", second: "assigned"}
    # Told again (every report names every start): nothing changes, nothing is written twice.
    start(scheduler, session, [one], when=9999.0)
    assert scheduler.jobs[first].started == 1234.5


def test_a_start_counts_only_for_its_attempt_on_its_agent(scheduler: Scheduler) -> None:
    (job_id,) = scheduler.submit([cmd()])
    alpha = register(scheduler, "alpha")
    (task,) = take(scheduler, alpha)
    beta = register(scheduler, "beta")
    start(scheduler, beta, [task])  # another agent's word for it
    start(scheduler, alpha, [task._replace(attempt=7)])  # an attempt that was never dispatched
    assert scheduler.jobs[job_id].state == "assigned"
    for bad in ("not a list", [(task.job_id, task.attempt)], [(task.job_id, task.attempt, "now")],
                [(task.job_id, task.attempt, float("nan"))], [(True, 1, 5.0)]):
        with pytest.raises(CorralError, match="malformed report"):
            scheduler.report(alpha, [], [], 0, began=bad)
    assert scheduler.jobs[job_id].state == "assigned"


def test_a_job_that_ends_before_its_start_is_told_has_its_run_time(scheduler: Scheduler) -> None:
    (job_id,) = scheduler.submit([cmd()])
    session = register(scheduler)
    (task,) = take(scheduler, session)
    scheduler.report(session, [result(task, started=50.0, ended=52.5)], [], 0)
    assert scheduler.wait([job_id], 0) == {job_id: "done"}
    row = scheduler.journal.job(job_id)
    assert row is not None and (row.started, row.ended) == (50.0, 52.5)


def test_cancelled_while_queued_has_no_run_time_even_after_a_failed_attempt(scheduler: Scheduler) -> None:
    (job_id,) = scheduler.submit([cmd(retries=1, tags=["t"])])
    session = register(scheduler, tags=("t",))
    (task,) = take(scheduler, session)
    start(scheduler, session, [task])
    scheduler.report(session, [result(task, "failed", 1)], [], 0)  # failed: queued again for its retry
    assert scheduler.jobs[job_id].state == "queued" and scheduler.jobs[job_id].started is None
    scheduler.cancel([job_id])
    row = scheduler.journal.job(job_id)
    assert row is not None and row.state == "cancelled" and row.started is None and row.ended is not None


def test_an_assigned_job_stays_assigned_across_a_restart(master: Master) -> None:
    s = master.scheduler
    (job_id,) = s.submit([cmd()])
    take(s, register(s, "alpha"))
    s = master.restart()
    assert s.jobs[job_id].state == "assigned"
    session = register(s, "alpha", running=[(job_id, 1)])
    (agent,) = s.agent_list()
    assert (agent["busy"], agent["assigned"]) == (0, 1)
    start(s, session, [Task(job_id, 1, "true", None, None, {}, None, None)])
    assert s.jobs[job_id].state == "running" and s.agent_list()[0]["busy"] == 1


# ---- the agent's side: what it tells of the jobs it holds ----------------------------------------


class Reported:
    def __init__(self) -> None:
        self.results: List[JobResult] = []
        self.cond = threading.Condition()

    def __call__(self, results: List[JobResult]) -> None:
        with self.cond:
            self.results.extend(results)
            self.cond.notify_all()


@pytest.fixture
def pool() -> Iterator[JobPool]:
    jobs = JobPool(1, Reported(), threading.Event())
    try:
        yield jobs
    finally:
        jobs.stop()


def test_the_agent_tells_which_held_jobs_have_started(pool: JobPool, tmp_path: Path) -> None:
    mark = tmp_path / "started"

    def began_once(job_id: int) -> tuple[int, int, float]:
        deadline = time.monotonic() + 30
        while True:
            began = {b[0]: b for b in pool.holding(False).began}
            if job_id in began:
                return began[job_id]
            assert time.monotonic() < deadline, f"job {job_id} to start"
            time.sleep(0.02)

    before = time.time()
    pool.accept([Task(1, 1, f"touch {mark}; sleep 3", None, None, {}, None, None)])  # a shell job: its process
    job, attempt, when = began_once(1)
    assert (job, attempt) == (1, 1) and before <= when <= time.time() and pool.holding(False).running == [(1, 1)]
    pool.cancel([(1, 1)])  # by attempt
    deadline = time.monotonic() + 30
    while not pool.idle():  # its slot free again (a job sent to a full agent of an unknown kind goes back)
        assert time.monotonic() < deadline, "job 1 to end"
        time.sleep(0.02)
    pool.accept([Task(2, 3, None, "tests.unit.agent_jobs:nap_and_mark", pickle.dumps(((str(mark), 3.0), {})),
                      {}, None, None)])  # a callable: its call
    job, attempt, when = began_once(2)
    assert (job, attempt) == (2, 3) and before <= when <= time.time()
    assert [b[0] for b in pool.holding(False).began] == [2]


def test_the_console_detail_of_an_assigned_job_says_where_it_waits(scheduler: Scheduler) -> None:
    from corral.console.tui.screens.detail import render_record

    (job_id,) = scheduler.submit([cmd("sleep 1")])
    take(scheduler, register(scheduler, "solo", slots=1))
    text = render_record(scheduler.job(job_id), time.time()).plain
    assert "attempt 1 assigned to solo: not started yet" in text and "took -" in text and "running for" not in text
