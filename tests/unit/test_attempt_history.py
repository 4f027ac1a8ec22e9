"""Every attempt stays in a job's history, however it ended: lost with its agent, interrupted by a stop,
given up after a master's restart; a late real result replaces the master's own record of it."""

from __future__ import annotations

from corral.agent.protocol import RELEASED, JobSpec
from corral.console.cli.render import job_detail
from corral.console.master.scheduler import Scheduler

from .agentcalls import register, result, take
from .conftest import Master


def cmd(command: str = "true", **options: object) -> dict[str, object]:
    return JobSpec(command=command, **options).to_wire()  # type: ignore[arg-type]


def history(s: Scheduler, job_id: int) -> list[tuple[object, ...]]:
    return [(a["attempt"], a["agent"], a["state"], a["counted"]) for a in s.job(job_id)["attempt_list"]]


def expire(s: Scheduler, name: str) -> None:
    s.agents[name].heard -= s.lease_seconds + 1  # its lease ran out (no sleeping in this tier)
    s.expire_leases()


def test_a_lost_attempt_stays_in_the_history_with_its_reason(scheduler: Scheduler) -> None:
    (job_id,) = scheduler.submit([cmd()])
    take(scheduler, register(scheduler, "alpha"))
    expire(scheduler, "alpha")
    (again,) = take(scheduler, beta := register(scheduler, "beta"))
    scheduler.report(beta, [result(again, stdout="second\n")], [], 0)
    assert history(scheduler, job_id) == [(1, "alpha", "lost", 0), (2, "beta", "done", 1)]
    lost = scheduler.job(job_id)["attempt_list"][0]
    assert lost["error"].startswith("agent alpha lost: silent for ") and lost["ended"] is not None
    shown = job_detail(scheduler.job(job_id))
    assert "attempt 1 on alpha: lost" in shown and "why: agent alpha lost: silent for" in shown
    assert "superseded" not in shown


def test_the_attempt_that_ends_a_job_lost_is_its_counted_one(scheduler: Scheduler) -> None:
    scheduler.max_lost = 1
    (job_id,) = scheduler.submit([cmd()])
    take(scheduler, register(scheduler, "alpha"))
    expire(scheduler, "alpha")
    take(scheduler, register(scheduler, "beta"))
    expire(scheduler, "beta")
    assert scheduler.wait([job_id], 0) == {job_id: "lost"}
    assert history(scheduler, job_id) == [(1, "alpha", "lost", 0), (2, "beta", "lost", 1)]


def test_a_stop_interrupts_what_ran_and_only_that(scheduler: Scheduler) -> None:
    ran, waited = scheduler.submit([cmd("sleep 9"), cmd("true")])
    session = register(scheduler, "alpha")
    first, second = take(scheduler, session)
    # The agent was stopped: one attempt it had started and killed, one it never started.
    scheduler.report(session, [result(first, RELEASED, None, error="the agent stopped", started=50.0, ended=60.0),
                               result(second, RELEASED, None, error="the agent stopped", started=0.0, ended=0.0)],
                     [], 0)
    assert history(scheduler, ran) == [(1, "alpha", "interrupted", 0)]
    record = scheduler.job(ran)["attempt_list"][0]
    assert (record["error"], record["started"], record["ended"]) == ("the agent stopped", 50.0, 60.0)
    assert scheduler.jobs[ran].attempts == 1 and scheduler.jobs[ran].state == "queued"
    assert history(scheduler, waited) == [] and scheduler.jobs[waited].attempts == 0  # no attempt was made
    tasks = {t.job_id: t.attempt for t in take(scheduler, session)}
    assert tasks == {ran: 2, waited: 1}


def test_retiring_an_agent_interrupts_its_attempts(scheduler: Scheduler) -> None:
    (job_id,) = scheduler.submit([cmd()])
    take(scheduler, register(scheduler, "alpha"))
    scheduler.retire_agent("alpha", "stopped by the operator")
    assert history(scheduler, job_id) == [(1, "alpha", "interrupted", 0)]
    assert scheduler.job(job_id)["attempt_list"][0]["error"] == "stopped by the operator"


def test_a_late_result_replaces_the_lost_record_of_its_attempt(scheduler: Scheduler) -> None:
    (job_id,) = scheduler.submit([cmd()])
    (first,) = take(scheduler, register(scheduler, "alpha"))
    expire(scheduler, "alpha")
    (second,) = take(scheduler, beta := register(scheduler, "beta"))
    scheduler.report(beta, [result(second, "failed", 1, error="exit 1")], [], 0)
    assert second.attempt == 2 and scheduler.wait([job_id], 0) == {job_id: "failed"}
    alpha = register(scheduler, "alpha", running=[(job_id, 1)])  # its outbox still holds attempt 1's result
    # alpha's attempt 1 did end after all (a failure, so it does not win): its real result is kept.
    scheduler.report(alpha, [result(first, "failed", 2, error="exit 2", stdout="late\n")], [], 0)
    assert history(scheduler, job_id) == [(1, "alpha", "failed", 0), (2, "beta", "failed", 1)]
    assert scheduler.job(job_id)["attempt_list"][0]["stdout"] == b"late\n"


def test_attempts_given_up_after_a_restart_are_in_the_history(master: Master) -> None:
    s = master.scheduler
    kept, dropped, orphan = s.submit([cmd(), cmd(), cmd()])
    take(s, register(s, "alpha", slots=2), 2)
    take(s, register(s, "beta"), 1)
    s = master.restart()
    register(s, "alpha", running=[(kept, 1)])  # alpha comes back without `dropped`; beta never does
    s.orphans_since -= s.lease_seconds + 1
    s.expire_leases()
    assert history(s, kept) == []
    assert history(s, dropped) == [(1, "alpha", "lost", 0)]
    assert s.job(dropped)["attempt_list"][0]["error"] == "agent alpha came back without it"
    assert history(s, orphan) == [(1, "beta", "lost", 0)]
    assert s.job(orphan)["attempt_list"][0]["error"] == "agent beta did not come back after the master restarted"
