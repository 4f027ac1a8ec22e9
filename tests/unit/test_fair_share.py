"""A burst of short jobs is spread over every agent's free slots: no agent hoards it, none is starved."""

from __future__ import annotations

from corral.agent.protocol import JobSpec
from corral.console.master.scheduler import Scheduler

from .agentcalls import register, result, take

ASKED = 4000  # what an agent asks for once it has learned the jobs are tiny: ~100 ms of work


def _burst(s: Scheduler, count: int) -> list[int]:
    return s.submit([JobSpec(command="true").to_wire() for _ in range(count)])


def test_a_burst_is_shared_by_the_slots_of_a_crowd(scheduler: Scheduler) -> None:
    sessions = [register(scheduler, f"a{i}", slots=1) for i in range(10)]
    _burst(scheduler, 1000)
    got = [take(scheduler, session, ASKED) for session in sessions]
    assert [len(tasks) for tasks in got] == [100] * 10  # its share each, asked for 4000
    assert len({t.job_id for tasks in got for t in tasks}) == 1000
    # Holding its share, an agent gets no more until it hands some in; then its share of what is left.
    assert take(scheduler, sessions[0], ASKED) == []
    scheduler.report(sessions[0], [result(t) for t in got[0]], [], ASKED)
    assert take(scheduler, sessions[0], ASKED) == []  # nothing left queued: the others hold the rest


def test_more_slots_a_bigger_share(scheduler: Scheduler) -> None:
    big, small = register(scheduler, "big", slots=3), register(scheduler, "small", slots=1)
    _burst(scheduler, 400)
    assert len(take(scheduler, big, ASKED)) == 300
    assert len(take(scheduler, small, ASKED)) == 100


def test_alone_an_agent_gets_what_it_asks(scheduler: Scheduler) -> None:
    session = register(scheduler, "solo", slots=1)
    _burst(scheduler, 5000)
    assert len(take(scheduler, session, ASKED)) == ASKED


def test_a_long_job_agent_asking_a_job_per_slot_is_not_capped(scheduler: Scheduler) -> None:
    sessions = [register(scheduler, f"a{i}", slots=2) for i in range(4)]
    _burst(scheduler, 3)
    assert len(take(scheduler, sessions[0], 2)) == 2  # one per slot, whatever the share
    assert len(take(scheduler, sessions[1], 2)) == 1
