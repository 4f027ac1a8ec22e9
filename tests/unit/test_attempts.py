"""Attempts are the unit at the master: outcomes only from the session holding the attempt, reconciliation
against what the agent says it holds, takes of superseded sessions, and leases on a monotonic clock that a
master's own pause does not count against its agents."""

from __future__ import annotations

import logging
import threading
import time
from pathlib import Path
from typing import Any, Iterator

import pytest

from corral.agent.errors import CorralError
from corral.agent.protocol import JobSpec, Task
from corral.console.master import scheduler as scheduler_module
from corral.console.master.records import AgentState
from corral.console.master.core import HOUSEKEEPING_SECONDS
from corral.console.master.scheduler import Scheduler
from corral.console.master.store import Journal

from .agentcalls import register, result, start, take


class Clock:
    """A monotonic clock the test moves by hand: the master's housekeeping as it would see time pass."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def s(tmp_path: Path, clock: Clock) -> Iterator[Scheduler]:
    sched = Scheduler(Journal(tmp_path / "corral.db"), lease_seconds=10.0, clock=clock)
    try:
        yield sched
    finally:
        sched.journal.close()


def cmd(command: str = "true", **options: Any) -> dict[str, Any]:
    return JobSpec(command=command, **options).to_wire()


def attempts_rows(s: Scheduler, job_id: int) -> list[tuple[int, str, str, int]]:
    return [(a.attempt, a.agent, a.state, a.counted) for a in s.journal.attempts(job_id)]


def tick(s: Scheduler, clock: Clock, seconds: float = HOUSEKEEPING_SECONDS) -> None:
    """The master's housekeeping, `seconds` after the last one."""
    clock.now += seconds
    s.housekeeping()


# ---- outcomes only from the session holding the attempt ---------------------------------------

def test_an_outcome_from_another_agent_is_refused_and_logged(s: Scheduler, caplog: pytest.LogCaptureFixture) -> None:
    (job_id,) = s.submit([cmd()])
    alpha, beta = register(s, "alpha"), register(s, "beta")
    (task,) = take(s, alpha)
    start(s, alpha, [task])  # running (assigned until its agent says it started)
    with caplog.at_level(logging.WARNING, logger="corral"):
        s.report(beta, [result(task)], [], 0)
    assert s.jobs[job_id].state == "running" and s.wait([job_id], 0) == {}
    assert attempts_rows(s, job_id) == []
    assert f"refused a result of job {job_id} attempt 1 from beta: not an attempt this agent holds" in caplog.text
    s.report(alpha, [result(task)], [], 0)  # the holder's counts
    assert s.wait([job_id], 0) == {job_id: "done"}


def test_an_outcome_for_an_attempt_never_dispatched_is_refused(s: Scheduler) -> None:
    (job_id,) = s.submit([cmd()])
    alpha = register(s, "alpha")
    (task,) = take(s, alpha)
    start(s, alpha, [task])
    s.report(alpha, [result(task._replace(attempt=7))], [], 0)
    (queued,) = s.submit([cmd()])
    s.report(alpha, [result(Task(queued, 1, "true", None, None, {}, None, None))], [], 0)  # queued, never sent
    assert s.jobs[job_id].state == "running" and s.jobs[queued].state == "queued"
    assert attempts_rows(s, job_id) == [] and attempts_rows(s, queued) == []


def test_two_attempts_of_one_job_on_one_agent_stay_apart(s: Scheduler, clock: Clock) -> None:
    """alpha stalls past its lease: its job is queued again, alpha comes back (the same session) and takes
    the job's attempt 2 while attempt 1 still runs there. Attempt 1's success counts; attempt 2 is cancelled
    by its pair, and its own result is history."""
    (job_id,) = s.submit([cmd()])
    alpha = register(s, "alpha")
    (first,) = take(s, alpha)
    tick(s, clock, 11)  # 11 s of silence, and the master was not stopped: one tick a second meanwhile
    for _ in range(11):
        tick(s, clock)
    assert s.agents["alpha"].state is AgentState.LOST and s.jobs[job_id].state == "queued"
    (second,) = take(s, alpha)
    assert (second.job_id, second.attempt) == (job_id, 2) and s.agents["alpha"].state is AgentState.UP
    tasks, cancel = s.report(alpha, [result(first)], [(job_id, 2)], 0)
    assert s.wait([job_id], 0) == {job_id: "done"} and cancel == [(job_id, 2)]
    s.report(alpha, [result(second, "cancelled", None, error="cancelled")], [], 0)
    row = s.journal.job(job_id)
    assert row is not None and (row.state, row.agent, row.lost) == ("done", "alpha", 1)
    # Attempt 1's late success replaces the master's record of it as lost; attempt 2's end is history.
    assert attempts_rows(s, job_id) == [(1, "alpha", "done", 1), (2, "alpha", "cancelled", 0)]


def test_register_refuses_a_list_that_is_not_of_pairs(s: Scheduler) -> None:
    for bad in ([3], [(1, 2, 3)], [("1", 1)], "1,1", [(True, 1)]):
        with pytest.raises(CorralError, match=r"^malformed register\(\): "):
            register(s, "alpha", running=bad)  # type: ignore[arg-type]
    with pytest.raises(CorralError, match="^malformed report: "):
        s.report(register(s, "alpha"), [], [5], 0)
    with pytest.raises(CorralError, match="^malformed report: the count of tasks received"):
        s.report(register(s, "alpha"), [], [], 0, None, -1)


# ---- reconciliation --------------------------------------------------------------------------

def test_an_attempt_the_agent_does_not_hold_is_queued_again_counting_nothing(s: Scheduler) -> None:
    ids = s.submit([cmd(), cmd()])
    alpha = register(s, "alpha")
    tasks = take(s, alpha)
    start(s, alpha, tasks)  # both started: running
    assert s.agents["alpha"].dispatched == 2
    # It has had one of the two (the other reply is still on its way): nothing is judged yet.
    s.report(alpha, [], [(tasks[0].job_id, 1)], 0, None, 1)
    assert {s.jobs[j].state for j in ids} == {"running"}
    # It has had both, and holds one: the other goes back, a new attempt (here sent at once, on the
    # credit the agent still has), no lost count, no failure.
    sent, _ = s.report(alpha, [], [(tasks[0].job_id, 1)], 0, None, 2)
    gone = tasks[1].job_id
    (again,) = [Task._make(row) for row in sent]
    assert (again.job_id, again.attempt) == (gone, 2)
    assert (s.jobs[gone].lost, s.jobs[gone].failures) == (0, 0)
    assert s.jobs[tasks[0].job_id].state == "running"
    s.report(alpha, [result(again), result(tasks[0])], [], 0, None, 3)
    assert s.wait(ids, 0) == {j: "done" for j in ids}


def test_a_reconnecting_agent_that_never_got_its_task_costs_the_job_nothing(s: Scheduler) -> None:
    """The take's reply died with its connection: the same agent process registers again without it."""
    (job_id,) = s.submit([cmd()])
    alpha = register(s, "alpha", instance="one")
    take(s, alpha)
    register(s, "alpha", instance="one", running=[])
    assert s.jobs[job_id].state == "queued" and s.jobs[job_id].lost == 0
    # Another process under that name (the agent died with it): the job's lost count rises.
    (task,) = take(s, register(s, "alpha", instance="one"))
    s.agents["alpha"].heard -= 11
    register(s, "alpha", instance="two")
    assert s.jobs[job_id].state == "queued" and s.jobs[job_id].lost == 1 and task.attempt == 2


def test_a_parked_take_of_a_superseded_session_returns_nothing(s: Scheduler) -> None:
    old = register(s, "alpha", instance="one")
    got: list[Any] = []
    parked = threading.Thread(target=lambda: got.append(s.take(old, 4, 5.0)))
    parked.start()
    deadline = time.monotonic() + 10
    while not s.work._waiters and time.monotonic() < deadline:  # type: ignore[attr-defined]
        time.sleep(0.01)
    new = register(s, "alpha", instance="one")  # its connection was cut: it registers again
    ids = s.submit([cmd(), cmd()])
    parked.join(timeout=10)
    assert got == [([], [])], got
    assert sorted(t.job_id for t in take(s, new)) == ids


# ---- leases on the monotonic clock ----------------------------------------------------------------

def test_a_master_paused_past_the_lease_blames_no_agent(s: Scheduler, clock: Clock) -> None:
    (job_id,) = s.submit([cmd()])
    alpha = register(s, "alpha")
    start(s, alpha, take(s, alpha))  # taken and started: running
    tick(s, clock)
    tick(s, clock, 15)  # SIGSTOPped for 15 s: the first tick after it comes 15 s late
    assert s.agents["alpha"].state is AgentState.UP and s.jobs[job_id].state == "running"
    assert s.jobs[job_id].lost == 0
    # Repeated short stalls, each a little under the lease, with the agent heard between them.
    for _ in range(6):
        tick(s, clock, 8)
        s.report(alpha, [], [(job_id, 1)], 0, None, 1)
    assert s.agents["alpha"].state is AgentState.UP
    assert s.agent_list()[0]["times_lost"] == 0  # what a watcher polling `corral agents` could miss, counted
    # An agent that really is silent still loses its lease, the master ticking on time.
    for _ in range(12):
        tick(s, clock)
    assert s.agents["alpha"].state is AgentState.LOST and s.jobs[job_id].state == "queued"
    # Heard again, it is up (no sign left in its state), and the count says it was lost once; it keeps
    # that count when it registers again, as it keeps its done and failed.
    s.report(alpha, [], [], 0, None, 1)
    assert s.agents["alpha"].state is AgentState.UP and s.agent_list()[0]["times_lost"] == 1
    register(s, "alpha")
    assert s.agent_list()[0]["times_lost"] == 1


def test_a_step_of_the_wall_clock_changes_nothing(s: Scheduler, clock: Clock, monkeypatch: pytest.MonkeyPatch) -> None:
    (job_id,) = s.submit([cmd()])
    alpha = register(s, "alpha")
    start(s, alpha, take(s, alpha))  # taken and started: running
    real = time.time
    for step in (3600.0, -7200.0):
        monkeypatch.setattr(scheduler_module.time, "time", lambda step=step: real() + step)
        tick(s, clock)
        s.report(alpha, [], [(job_id, 1)], 0, None, 1)
        tick(s, clock)
        assert s.agents["alpha"].state is AgentState.UP and s.jobs[job_id].state == "running"
        assert 0 <= s.agent_list()[0]["heartbeat_age"] < 5
