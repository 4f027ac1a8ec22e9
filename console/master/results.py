"""The results an agent hands in: judged attempt by attempt, journaled, then applied to memory."""

from __future__ import annotations

import logging
import time
from typing import Any

from corral.agent.protocol import RELEASED, JobResult

from .core import Core, log
from .records import DONE, FAILED, FINAL, INTERRUPTED, ON_AGENT, QUEUED, TIMEOUT, UNFINISHED, AgentRecord, Job
from .store import Journal


class Results(Core):
    """Judging a report's results and applying them, journal first."""

    def _apply_results(self, agent: AgentRecord, results: list[JobResult]) -> None:
        """Apply an agent's checked results: judged, journaled in one transaction, then applied in memory.
        Two results of one job (two of its attempts) go in successive rounds, so the second is judged on
        what the first did; a round the journal refuses raises JournalFailed with nothing of it applied."""
        seen: set[tuple[int, int]] = set()
        batch: list[JobResult] = []
        jobs_in_batch: set[int] = set()
        for result in results:
            key = (result.job_id, result.attempt)
            if key in seen:
                continue  # the same attempt twice in one report: the first one stands
            seen.add(key)
            if result.job_id in jobs_in_batch:
                self._apply_round(agent, batch)
                batch, jobs_in_batch = [], set()
            batch.append(result)
            jobs_in_batch.add(result.job_id)
        if batch:
            self._apply_round(agent, batch)

    def _apply_round(self, agent: AgentRecord, results: list[JobResult]) -> None:
        """Results of distinct jobs: each judged (nothing changes), all journaled, then all applied."""
        writes = _Writes(verbose=log.isEnabledFor(logging.INFO))
        for result in results:
            self._judge_result(agent, result, writes)
        self.journal.write([(Journal.ATTEMPT, writes.attempts), (Journal.FINISH, writes.finished),
                            (Journal.STARTED, writes.started), (Journal.REQUEUE, writes.requeued)])
        self._apply_writes(agent, writes)
        if writes.finished:
            self.finished.notify_all()
        if writes.requeued:
            self.work.notify_all()
        for event in writes.events:
            log.info(*event)

    # One piece (~70 lines): the cases of one result (refused, a repeat, history only, counted, retried)
    # are exclusive and ordered; one function reads as the decision table it is.
    def _judge_result(self, agent: AgentRecord, r: JobResult, writes: _Writes) -> None:
        """One result: counted (the job's current attempt, or a late success), history only, or a repeat;
        refused unless this session holds that attempt (the master gave it to this agent, and it is not
        settled yet). Changes nothing: `writes` gets its journal rows and what to do in memory once they
        are written."""
        job_id, attempt, state = r.job_id, r.attempt, r.state
        job = self.jobs.get(job_id)
        # taken from it since (stale): its history has the master's own record (lost), replaced here
        stale = (job_id, attempt) in agent.stale
        if not stale and agent.running.get(job_id) != attempt:
            if job is None:  # most often a report sent again after its reply was lost: recorded already
                writes.event("ignored a result of job %d attempt %d from %s: the job is final", job_id, attempt,
                             agent.name)
            else:
                log.warning("refused a result of job %d attempt %d from %s: not an attempt this agent holds",
                            job_id, attempt, agent.name)
            return
        writes.ended_here.append((job_id, attempt))
        counted = job is not None and job.state in ON_AGENT and job.attempts == attempt and job.agent == agent.name
        if not counted and job is not None and state == DONE and (
                attempt < job.attempts or (attempt == job.attempts and job.state == QUEUED)):
            # A late success of an attempt re-queued meanwhile (its agent was lost, then came
            # back), whether dispatched again or still queued: the first attempt to finish
            # wins, and the one still running is cancelled.
            counted = True
            other = self.agents.get(job.agent or "") if job.state in ON_AGENT else None
            if other is not None:
                writes.cancels.append((other, (job_id, job.attempts)))
            writes.event("late result of %d attempt %d from %s wins", job_id, attempt, agent.name)
        if not counted and state != RELEASED and self._reported_before(r, agent.name):
            return  # a report sent again (its reply was lost): this result is in the journal already
        # A release of an attempt that had started (the agent was stopped and killed it) is an
        # attempt that ran: it stays in the history as interrupted, with the agent's reason.
        interrupted = state == RELEASED and r.started > 0
        if interrupted:
            writes.attempts.append(unfinished_row(job_id, attempt, agent.name, INTERRUPTED, r.started,
                                                   r.ended or writes.now, r.error or "the agent stopped it", 0, r))
        # A clean, counted run needs no row of its own: the jobs row holds its whole story.
        elif state != RELEASED and (r.stdout or r.stderr or r.error or r.note or not counted or state != DONE
                                     or attempt > 1 or stale):
            writes.attempts.append((job_id, attempt, agent.name, state, r.started, r.ended, r.exit_code,
                                    r.stdout, r.stderr, r.error, r.traceback, int(counted), r.note,
                                    r.stdout_total, r.stderr_total))
        if not counted or job is None:
            return  # a stale attempt (re-queued meanwhile, or already final): history only
        writes.changed.append(job_id)
        if state == RELEASED:
            # handed back unstarted: no attempt was made; started (interrupted), the attempt counts as made
            writes.requeue(job, job.attempts if interrupted else job.attempts - 1, job.failures, job.lost)
            return
        failures = job.failures
        if state in (FAILED, TIMEOUT):
            failures += 1
            writes.failed += 1
            if failures <= job.retries:
                writes.requeue(job, job.attempts, failures, job.lost)
                writes.event("%s %d on %s: %s; retry %d/%d", state, job_id, agent.name,
                             r.error or f"exit {r.exit_code}", failures, job.retries)
                return
        else:
            writes.done += 1
        if state not in FINAL:
            state = FAILED
        writes.ends.append((job, state, failures))
        writes.finished.append((state, failures, agent.name, r.ended, r.exit_code, r.value, r.error, job_id))
        if job.started is None and r.started:  # it ended before its start was told: its run time still shows
            writes.started.append((r.started, job_id))
        if writes.verbose:
            what = f"exit {r.exit_code}" if r.exit_code is not None else state
            if state == DONE:
                writes.event("finished %d on %s: %s in %.2fs", job_id, agent.name, what, r.ended - r.started)
            else:
                writes.event("%s %d on %s: %s", state, job_id, agent.name, r.error or what)

    def _apply_writes(self, agent: AgentRecord, writes: _Writes) -> None:
        """What a round of results does in memory, once its journal rows are written."""
        for job_id, attempt in writes.ended_here:
            if agent.running.get(job_id) == attempt:
                del agent.running[job_id]
            agent.stale.discard((job_id, attempt))
        for other, pair in writes.cancels:
            other.cancel.add(pair)
        for job_id in writes.changed:
            self._changed(job_id)
        for job, attempts, failures, lost in writes.requeues:
            job.attempts, job.failures, job.lost = attempts, failures, lost
            self._requeued(job)
        for job, state, failures in writes.ends:
            job.failures = failures
            del self.jobs[job.id]
            self._final(job.id, state)
            self.finished_times.append(writes.now)
        agent.done += writes.done
        agent.failed += writes.failed

    def _requeued(self, job: Job) -> None:
        """Back to the queue (its journal row written), ahead of newer work of its priority."""
        job.state, job.agent, job.started = QUEUED, None, None  # as the journal's REQUEUE
        self._enqueue(job)

    def _reported_before(self, r: JobResult, agent: str) -> bool:
        """Whether this result of a job is already in the journal: as its outcome (same agent, state
        and end), or in its history (same attempt from the same agent). Only results that do not
        count get here, which is rare: a read of the journal is fine."""
        row = self.journal.job(r.job_id)
        if row is not None and (row.state, row.agent, row.ended) == (r.state, agent, r.ended):
            return True
        # The master's own record of an attempt it gave up on (lost, interrupted) is no result: the
        # agent's real one, arriving late, replaces it.
        return any(a.attempt == r.attempt and a.agent == agent and a.state not in UNFINISHED
                   for a in self.journal.attempts(r.job_id))


def unfinished_row(job_id: int, attempt: int, agent: str, state: str, started: float | None, ended: float,
                    reason: str, counted: int, result: JobResult | None = None) -> tuple[Any, ...]:
    """The attempts row of an attempt that ended without a result of its own (lost, interrupted), with
    what output came back from it (the `result` of a release), if any."""
    if result is None:
        return (job_id, attempt, agent, state, started, ended, None, b"", b"", reason, "", counted, "", 0, 0)
    return (job_id, attempt, agent, state, started, ended, None, result.stdout, result.stderr, reason, "", counted,
            result.note, result.stdout_total, result.stderr_total)


class _Writes:
    """What one round of a report changes: the journal's rows, what to do in memory once they are
    written (Scheduler._apply_writes), and the log's events (kept only when logged)."""

    __slots__ = ("attempts", "finished", "requeued", "events", "verbose", "now", "ended_here", "cancels", "changed",
                 "requeues", "ends", "done", "failed", "started")

    def __init__(self, verbose: bool) -> None:
        self.now = time.time()
        self.attempts: list[tuple[Any, ...]] = []
        self.finished: list[tuple[Any, ...]] = []
        self.started: list[tuple[float, int]] = []  # (when, job id) of final jobs whose start was not told
        self.requeued: list[tuple[Any, ...]] = []
        self.events: list[tuple[Any, ...]] = []
        self.verbose = verbose
        self.ended_here: list[tuple[int, int]] = []  # the attempts the agent no longer runs
        self.cancels: list[tuple[AgentRecord, tuple[int, int]]] = []  # (another agent, an attempt it is to kill)
        self.changed: list[int] = []
        self.requeues: list[tuple[Job, int, int, int]] = []  # (job, attempts, failures, lost) once queued again
        self.ends: list[tuple[Job, str, int]] = []  # (job, final state, failures)
        self.done = 0
        self.failed = 0

    def requeue(self, job: Job, attempts: int, failures: int, lost: int) -> None:
        self.requeues.append((job, attempts, failures, lost))
        self.requeued.append((attempts, failures, lost, job.id))

    def event(self, *message: Any) -> None:
        if self.verbose:
            self.events.append(message)
