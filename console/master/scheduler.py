"""The Scheduler, as its clients see it: submitting, cancelling, waiting, looking.

One class over four modules and one lock (Core ← Results ← Sessions ← Scheduler): the master's state,
recovery and dispatch in core.py, the results agents hand in in results.py, the agents' side (register,
take, report, leases) in sessions.py. Every change is written to the journal first and made in memory only
once that write went through: a write the journal refuses (JournalFailed: disk full, read-only, I/O error)
leaves memory as it was, so the two never disagree and the same call, sent again, does the same thing."""

from __future__ import annotations

import json
import logging
import time
from typing import Any

from corral.agent.errors import BadJobSpec, UnknownJob
from corral.agent.protocol import MAX_PAYLOAD_BYTES, PROTOCOL_VERSION, unpack_specs

from .core import batch_names, log
from .records import CANCELLED, HELD, QUEUED, AgentRecord, Job
from .rows import pack
from .sessions import Sessions
from .store import Journal, Outcome, Submission, encode_env, encode_tags
from .validate import (
    MAX_JOBS,
    Checked,
    batch_rule,
    carried_bytes,
    check,
    payload_rule,
    poll_rule,
    shown,
    size_rule,
    token_rule,
)


class Scheduler(Sessions):
    """The master's scheduler. Every public method is called from a manager thread, under one lock.

    Events (a job queued, dispatched, finished; an agent up or lost) are logged at INFO: `corral master -v`
    prints them one per line."""

    def hello(self) -> dict[str, Any]:
        return {"protocol": PROTOCOL_VERSION, "started": self.started, "journal": str(self.journal.path)}

    def submit(self, specs: Any) -> list[int]:
        """Queue jobs; they are in the journal before this returns. All or nothing. `specs` is a list of
        plain spec dicts, or packed (agent.protocol.pack_specs: what the Client sends)."""
        if type(specs) is tuple:
            try:
                specs = unpack_specs(specs, MAX_JOBS)
            except ValueError as exc:
                raise BadJobSpec(f"submit(): {exc}") from None
        if not isinstance(specs, list) or not specs:
            raise BadJobSpec("submit() takes a non-empty list of job specs")
        if len(specs) > MAX_JOBS:
            raise BadJobSpec(f"{len(specs)} jobs in one call; the limit is {MAX_JOBS}", "submit in batches")
        total = len(specs)
        if total == 1:
            return self._queue([check(specs[0], "job")])
        return self._queue([check(spec, f"job {i + 1} of {total}") for i, spec in enumerate(specs)])

    def submit_map(self, template: Any, payloads: Any, wait: float = 0.0,
                   token: Any = None) -> tuple[list[int], list[tuple[Any, ...]]]:
        """Queue one callable over many argument payloads (what Client.map sends): the template is
        checked once, each payload only for type and size. Then wait up to `wait` seconds and return
        (ids, outcomes of those already final), so one round trip can carry a whole small map.
        `token` (the client's name for this submission) makes it idempotent: sent again, it is answered
        with the jobs it queued the first time (a Pool resubmits after a reply lost with its connection)."""
        wait = poll_rule(wait, "submit_map()'s wait") or 0.0
        if token is not None:
            try:
                token_rule(token)
            except BadJobSpec as exc:
                raise BadJobSpec(f"submit_map(): {exc.message}") from None
        if not isinstance(payloads, list) or not payloads or len(payloads) > MAX_JOBS:
            raise BadJobSpec(f"submit_map() takes a list of 1 to {MAX_JOBS} payloads")
        if not isinstance(template, dict) or template.get("func") is None:
            raise BadJobSpec("submit_map() needs a template with a module:function")
        base = check(dict(template, payload=None), "template")
        carried = carried_bytes(base.name, base.env, base.cwd, base.tags)  # what each job carries beside its payload
        room = MAX_PAYLOAD_BYTES - carried
        for i, payload in enumerate(payloads):
            if type(payload) is not bytes or len(payload) > room:
                where = f"job {i + 1} of {len(payloads)}"
                try:
                    payload_rule(payload)
                    size_rule(None, payload, carried)
                except BadJobSpec as exc:
                    raise BadJobSpec(f"{where}: {exc.message}", exc.hint) from None
        checked = [base] * len(payloads)
        batch = template.get("batch")
        if batch is not None:  # a Pool's or an Executor's: each job is named "NAME [i/total]"
            checked = [base._replace(name=name)
                       for name in batch_names(base.name, batch_rule(batch, len(payloads)), len(payloads))]
        ids = self._queue(checked, payloads, token)
        return ids, (self.wait_outcomes(ids, wait) if wait > 0 else [])

    def _queue(self, checked: list[Checked], payloads: list[bytes] | None = None, token: str | None = None) -> list[int]:
        """Journal, then queue, checked jobs; returns their ids. `payloads`, when given, replace each
        job's own (submit_map: one template, many payloads, no spec built per payload). A `token` is
        journaled with the jobs, in the same transaction; one seen before gets its jobs' ids back, and
        nothing is queued."""
        total = len(checked)
        now = time.time()
        no_tags: frozenset[str] = frozenset()
        # The records are made before the lock (dispatch need not wait on them); only ids are given under it.
        new = [Job(0, c.name, c.command, c.func, c.payload if payloads is None else payloads[i], c.env, c.cwd,
                   c.priority, c.timeout, c.retries, frozenset(c.tags) if c.tags else no_tags, submitted=now,
                   code=c.code)
               for i, c in enumerate(checked)]
        with self.lock:
            if token is not None:
                earlier = self.journal.submission(token)
                if earlier is not None:
                    return self._submitted_before(earlier, total)
            first = self.next_id
            for i, job in enumerate(new):
                job.id = first + i
            writes: list[tuple[str, list[tuple[Any, ...]]]] = [(Journal.INSERT_JOB, [
                (job.id, job.name, job.command, job.func, job.payload, encode_env(job.env), job.cwd, job.priority,
                 job.timeout, job.retries, encode_tags(c.tags), now, job.code) for job, c in zip(new, checked)])]
            if token is not None:
                writes.append((Journal.INSERT_SUBMISSION, [(token, first, total, now)]))
            self.journal.write(writes)
            self.next_id = first + total
            jobs, changes, seq = self.jobs, self.changes, self.seq
            for job in new:
                jobs[job.id] = job
                self._enqueue(job)
                seq += 1
                changes.append((seq, job.id))
            self.seq = seq
            self.work.notify_all()
        if log.isEnabledFor(logging.INFO):
            log.info("queued %s", first if total == 1 else f"{first}..{first + total - 1}")
        return list(range(first, first + total))

    @staticmethod
    def _submitted_before(earlier: Submission, total: int) -> list[int]:
        """The answer to a submission sent again under its token: the ids it was given the first time."""
        if earlier.total != total:
            raise BadJobSpec(f"submission token {shown(earlier.token)} named a submission of {earlier.total}"
                             f" jobs, not {total}", "use a new token for each submission")
        last = earlier.first_id + earlier.total - 1
        log.info("submission %s again: jobs %d..%d, queued once", earlier.token, earlier.first_id, last)
        return list(range(earlier.first_id, last + 1))

    def cancel(self, ids: Any, queued_only: Any = False) -> dict[int, str]:
        """Cancel jobs: queued ones at once, running ones by their agent (within a second). queued_only:
        leave running jobs be (their outcome says "running"), as a future's cancel() does."""
        if type(queued_only) is not bool:
            raise BadJobSpec(f"cancel()'s queued_only must be True or False, not {shown(queued_only)}")
        with self.lock:
            job_ids = self.check_ids(ids)
            outcome: dict[int, str] = {}
            rows: list[tuple[Any, ...]] = []
            ended: list[Job] = []
            kills: list[tuple[AgentRecord, tuple[int, int]]] = []
            now = time.time()
            for job_id in job_ids:
                job = self.jobs.get(job_id)
                if job_id in outcome:
                    continue  # named twice
                if job is None:
                    outcome[job_id] = "already final"
                elif job.state in (QUEUED, HELD):
                    ended.append(job)
                    rows.append((CANCELLED, job.failures, None, now, None, None, "cancelled before it ran", job_id))
                    outcome[job_id] = CANCELLED
                elif queued_only:
                    outcome[job_id] = job.state
                else:
                    agent = self.agents.get(job.agent or "")
                    if agent is not None:
                        kills.append((agent, (job_id, job.attempts)))
                    outcome[job_id] = "cancelling"
            if rows:
                self.journal.write([(Journal.FINISH, rows)])  # JournalFailed: nothing cancelled, nothing killed
            for job in ended:
                job.state = CANCELLED
                del self.jobs[job.id]
                self._final(job.id, CANCELLED)
                self._changed(job.id)
            for agent, pair in kills:
                agent.cancel.add(pair)
            if rows:
                self.finished.notify_all()
            self.work.notify_all()
        for job_id, what in outcome.items():
            if what in (CANCELLED, "cancelling"):
                log.info("cancel %d: %s", job_id, what)
        return outcome

    def requeue(self, ids: Any) -> list[int]:
        """Queue finished jobs again as new jobs with the same spec; returns the new ids."""
        with self.lock:
            job_ids = self.check_ids(ids)
        specs = []
        for job_id in job_ids:
            row = self.journal.job(job_id)
            if row is None:
                raise UnknownJob(f"no job {job_id}")
            specs.append({"name": row.name, "command": row.command, "func": row.func, "payload": row.payload,
                          "env": json.loads(row.env), "cwd": row.cwd, "priority": row.priority,
                          "timeout": row.timeout, "retries": row.retries, "tags": json.loads(row.tags),
                          "code": row.code})
        return self.submit(specs)

    def wait(self, ids: Any, timeout: float | None = 1.0) -> dict[int, str]:
        """Long poll: return {id: state} for those of `ids` that are final, waiting up to `timeout`
        for all of them to be."""
        timeout = poll_rule(timeout)
        deadline = None if timeout is None else time.monotonic() + timeout
        with self.lock:
            pending = set(self.check_ids(ids))
            while True:
                pending = {j for j in pending if j in self.jobs}
                if not pending:
                    break
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    break
                self.finished.wait(remaining if remaining is not None else 30.0)
            done_ids = [j for j in ids if j not in pending]
            states = {j: self.recent_final[j] for j in done_ids if j in self.recent_final}
        missing = [j for j in done_ids if j not in states]
        if missing:
            states.update({outcome.id: outcome.state for outcome in self.journal.outcomes(missing)})
        return states

    def wait_outcomes(self, ids: Any, timeout: float | None = 1.0) -> list[tuple[Any, ...]]:
        """Like wait(), but return the outcomes of the final ones (store.Outcome, as plain tuples)."""
        final = self.wait(ids, timeout)
        return pack(self.journal.outcomes([j for j in ids if j in final])) if final else []

    def outcomes(self, ids: Any) -> list[tuple[Any, ...]]:
        """Each job's outcome (store.Outcome, as a plain tuple), in the order asked."""
        with self.lock:
            job_ids = self.check_ids(ids)
        found: dict[int, Outcome] = {outcome.id: outcome for outcome in self.journal.outcomes(job_ids)}
        return pack(found[j] for j in job_ids)

    def job(self, job_id: Any) -> dict[str, Any]:
        return self.views.job(job_id)

    def list_jobs(self, states: Any = None, limit: Any = 1000, before: Any = None) -> list[dict[str, Any]]:
        return self.views.list_jobs(states, limit, before)

    def status(self) -> dict[str, Any]:
        return self.views.status()

    def snapshot(self, since: Any = 0, views: Any = None) -> dict[str, Any]:
        return self.views.snapshot(since, views)

    def agent_list(self) -> list[dict[str, Any]]:
        now = time.time()
        with self.lock:
            monotonic = self.clock()
            return [a.wire(now, monotonic) for a in self.agents.values()]

    def prune_finished(self, batches: int = 5) -> int:
        """Retention, called from housekeeping: delete the oldest final jobs beyond what self.retention keeps,
        a batch per hold of the lock (dispatch runs between batches), at most `batches` batches per call
        (a large backlog drains over a few ticks). Returns how many jobs went."""
        retention = self.retention
        if not retention.active:
            return 0
        gone_total = 0
        for _ in range(batches):
            cutoff = time.time() - retention.days * 86400.0 if retention.days is not None else None
            with self.lock:
                excess = sum(self.final_counts.values()) - retention.count if retention.count is not None else 0
                gone = self.journal.prune_finished(cutoff, excess)
                for job_id, state in gone:
                    self.final_counts[state] -= 1
                    self.recent_final.pop(job_id, None)
                batch = len(gone)
            if not batch:
                break
            gone_total += batch
        if gone_total:
            log.info("retention: pruned %d finished jobs", gone_total)
        return gone_total
