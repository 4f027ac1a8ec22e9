"""Queues, priorities, tags, leases and retries: the master's state, journaled before any call returns.

Every change is written to the journal first and made in memory only once that write went through: a
write the journal refuses (JournalFailed: disk full, read-only, I/O error) leaves memory as it was, so the
two never disagree and the same call, sent again, does the same thing."""

from __future__ import annotations

import heapq
import itertools
import json
import logging
import threading
import time
import uuid
from collections import Counter, OrderedDict, deque
from typing import Any, Callable

from corral.agent.errors import (BadJobSpec, CorralError, JournalFailed, NameTaken, ProtocolMismatch, UnknownAgent,
                                 UnknownJob)
from corral.agent.protocol import MAX_PAYLOAD_BYTES, OUTPUT_TAIL_BYTES, PROTOCOL_VERSION, RELEASED, JobResult

from .records import (ASSIGNED, CANCELLED, DONE, FAILED, FINAL, HELD, INTERRUPTED, LOST, ON_AGENT, QUEUED, RUNNING,
                      TIMEOUT, UNFINISHED, AgentRecord, AgentState, Job, Retention, TaskTuple)
from .reports import Start, check_attempts, check_count, check_results, check_starts
from .store import Journal, Outcome, Submission, encode_env, encode_tags
from .rows import pack
from .validate import (MAX_JOBS, Checked, batch_rule, carried_bytes, check, is_whole, payload_rule, poll_rule, shown, size_rule,
                       token_rule)
from .views import Views

log = logging.getLogger(__name__)

SHARE_REFRESH_SECONDS = 0.5  # how stale _fair_share's count of slots may be
RECENT_FINAL = 200_000  # final states kept in memory for wait(); older ones are read from the journal
HOUSEKEEPING_SECONDS = 1.0  # how often the master's own loop calls housekeeping() (server.py)
# Housekeeping later than its period by more than this fraction of the lease means the master itself was
# stopped or starved (SIGSTOP, a VM migration, swap): it heard nobody meanwhile, so every lease is
# extended by the gap before anyone is judged.
LATE_FRACTION = 0.25


def batch_names(name: str, batch: tuple[int, int | None], count: int) -> list[str]:
    """Each job's name in a batch (a Pool's or an Executor's): "NAME [i/total]", or "NAME [i]" when the
    total is open (validate.batch_rule's (first index, total or None))."""
    first, total = batch
    head, tail = (f"{name} [" if name else "["), (f"/{total}]" if total is not None else "]")
    return [f"{head}{i}{tail}" for i in range(first, first + count)]


def _times(n: int) -> str:
    return f"{n} time" if n == 1 else f"{n} times"


class Scheduler:
    """The master's state. Every public method is called from a manager thread, under one lock.

    Events (a job queued, dispatched, finished; an agent up or lost) are logged at INFO: `corral master -v`
    prints them one per line."""

    def __init__(self, journal: Journal, lease_seconds: float = 10.0, max_lost: int = 3,
                 retention: Retention = Retention(), clock: Callable[[], float] = time.monotonic) -> None:
        self.journal = journal
        self.retention = retention
        # Leases are measured on this clock (monotonic: a step of the wall clock changes nothing);
        # time.time() is only for what people read (submitted, started, ended, last seen).
        self.clock = clock
        self.last_tick = clock()
        self.lease_seconds = lease_seconds
        self.max_lost = max_lost
        self.lock = threading.Lock()
        self.work = threading.Condition(self.lock)  # takers wait here: new work or a cancel for them
        self.finished = threading.Condition(self.lock)  # wait() callers wait here
        self.jobs: dict[int, Job] = {}
        self.queues: dict[frozenset[str], list[tuple[int, int]]] = {}  # tag set -> heap of (-priority, id)
        self.agents: dict[str, AgentRecord] = {}
        # Leases by when each agent was last heard: (heard, seq, record), one entry per hearing, the oldest
        # on top. expire_leases() looks only at the top (O(expired + stale entries), not O(all agents) a
        # second); an entry whose record was heard again since is stale and dropped as it surfaces.
        self._leases: list[tuple[float, int, AgentRecord]] = []
        self._lease_seq = itertools.count()
        self._slots_up, self._slots_counted = 0, float("-inf")  # the slots of agents up, as _fair_share last counted
        self.sessions: dict[str, AgentRecord] = {}
        self.recent_final: OrderedDict[int, str] = OrderedDict()
        # Final jobs by state, kept as they become final (and are pruned), so no count scans the journal.
        self.final_counts: Counter[str] = Counter()
        self.live_output: dict[int, tuple[bytes, bytes]] = {}  # running job id -> its latest (stdout, stderr)
        self.finished_times: deque[float] = deque(maxlen=100_000)
        self.seq = 0  # bumped on every change, for incremental snapshots
        self.changes: deque[tuple[int, int]] = deque(maxlen=200_000)  # (seq, job id)
        self.started = time.time()
        self.views = Views(self)
        self._recover()

    # ---- recovery -----------------------------------------------------------------------

    def _recover(self) -> None:
        """Rebuild the queues from the journal: queued stay queued; running wait for their agent."""
        self.next_id = self.journal.max_id() + 1
        self.final_counts.update(self.journal.final_counts())
        # Jobs of one submission share their text in memory (one decoded message: the same objects); read
        # back row by row they would be a copy each, and a restart would multiply the master's memory by
        # what they share. One copy of each distinct value, as before the restart.
        texts: dict[Any, Any] = {}
        envs: dict[str, dict[str, str]] = {}
        tag_sets: dict[str, frozenset[str]] = {}
        one = texts.setdefault
        for row in self.journal.active_jobs():
            env = envs.get(row.env)
            if env is None:
                env = envs[row.env] = json.loads(row.env)
            tags = tag_sets.get(row.tags)
            if tags is None:
                tags = tag_sets[row.tags] = frozenset(json.loads(row.tags))
            job = Job(row.id, one(row.name, row.name), one(row.command, row.command), one(row.func, row.func),
                      one(row.payload, row.payload), env, one(row.cwd, row.cwd), row.priority, row.timeout,
                      row.retries, tags, row.state, row.attempts, row.failures, row.lost, row.agent,
                      row.submitted, row.started, row.code)
            self.jobs[job.id] = job
            if job.state == QUEUED:
                self._enqueue(job)
        self.orphans_since = self.clock()  # running jobs with no agent yet: reconciled or re-queued after a lease

    # ---- helpers (lock held) ------------------------------------------------------------

    def _changed(self, job_id: int) -> None:
        self.seq += 1
        self.changes.append((self.seq, job_id))

    def _enqueue(self, job: Job) -> None:
        heapq.heappush(self.queues.setdefault(job.tags, []), (-job.priority, job.id))

    def _pop(self, agent: AgentRecord, limit: int) -> list[Job]:
        """Up to `limit` queued jobs this agent may run, highest priority first, then oldest."""
        heaps = [h for tags, h in self.queues.items() if h and tags <= agent.tags]
        taken: list[Job] = []
        jobs = self.jobs
        while heaps and len(taken) < limit:
            heap = heaps[0] if len(heaps) == 1 else min(heaps, key=lambda h: h[0])
            _, job_id = heapq.heappop(heap)
            if not heap:
                heaps.remove(heap)
            job = jobs.get(job_id)
            if job is not None and job.state == QUEUED:
                taken.append(job)
        return taken

    def _dispatch(self, agent: AgentRecord, jobs: list[Job]) -> list[TaskTuple]:
        """Hand popped jobs to an agent: journaled first; on JournalFailed they go back to their queue."""
        name = agent.name
        try:
            self.journal.write([(Journal.DISPATCH, [(job.attempts + 1, name, job.id) for job in jobs])])
        except JournalFailed:
            for job in jobs:  # still queued: back in the heap, where _pop found them
                self._enqueue(job)
            raise
        for job in jobs:
            # Assigned, not running: it starts (and its `started` is set) when the agent says its process did.
            job.state = ASSIGNED
            job.attempts += 1
            job.agent = name
            job.started = None
            agent.running[job.id] = job.attempts
            agent.began.discard(job.id)
            self._changed(job.id)
        agent.dispatched += len(jobs)
        if self.live_output:  # a new attempt starts with no output of its own yet
            for job in jobs:
                self.live_output.pop(job.id, None)
        if log.isEnabledFor(logging.INFO):
            for job in jobs:
                log.info("dispatched %d → %s", job.id, agent.name)
        return [job.task() for job in jobs]

    def _final(self, job_id: int, state: str) -> None:
        self.final_counts[state] += 1
        self.recent_final[job_id] = state
        if len(self.recent_final) > RECENT_FINAL:
            self.recent_final.popitem(last=False)

    def _watch_lease(self, agent: AgentRecord) -> None:
        """AgentRecord.on_heard for the agents this master judges (lock held): index this hearing."""
        heapq.heappush(self._leases, (agent.heard, next(self._lease_seq), agent))

    def _agent(self, session: str) -> AgentRecord:
        agent = self.sessions.get(session)
        if agent is None:
            raise UnknownAgent(f"unknown agent session {shown(session)}", "register again")
        agent.last_seen = time.time()
        agent.heard = self.clock()
        if agent.state is AgentState.LOST:
            agent.state = AgentState.UP
        return agent

    def check_ids(self, ids: Any) -> list[int]:
        """The job ids a peer sent, checked (lock held): UnknownJob for one this master never issued."""
        if not isinstance(ids, (list, tuple)):
            raise UnknownJob(f"job ids must come as a list, not {shown(ids)}")
        out = []
        for job_id in ids:
            if not is_whole(job_id) or not 0 < job_id < self.next_id:
                raise UnknownJob(f"no job {shown(job_id)}", "list jobs with `corral jobs`")
            out.append(job_id)
        return out

    # ---- clients ------------------------------------------------------------------------

    def hello(self) -> dict[str, Any]:
        return {"protocol": PROTOCOL_VERSION, "started": self.started, "journal": str(self.journal.path)}

    def submit(self, specs: Any) -> list[int]:
        """Queue jobs; they are in the journal before this returns. All or nothing."""
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

    # ---- looking: what clients and the console read (views.py) -----------------------------

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

    # ---- agents -------------------------------------------------------------------------

    def register(self, info: Any, running: Any) -> dict[str, Any]:
        """An agent (re)joins; it says which (job id, attempt) pairs it still holds (running, or finished
        and not yet reported). The new session holds those of them this master gave that agent; every
        other attempt the master thought it ran goes back to the queue."""
        if not isinstance(info, dict) or not isinstance(info.get("name"), str) or not info["name"]:
            raise CorralError("register() needs the agent's info with a name")
        if info.get("protocol") != PROTOCOL_VERSION:
            raise ProtocolMismatch(f"agent speaks protocol {shown(info.get('protocol'))}, master {PROTOCOL_VERSION}",
                                   "deploy the agent that matches this master")
        claimed = check_attempts(running, "register()")
        now = time.time()
        name = info["name"]
        with self.lock:
            old = self.agents.get(name)
            heard = self.clock()
            if (old is not None and not old.state.gone and heard - old.heard < self.lease_seconds
                    and old.info.get("instance") != info.get("instance")):
                raise NameTaken(f"an agent named {shown(name)} is already connected (pid {shown(old.info.get('pid'))}"
                                f" on {str(old.info.get('host') or '?')[:100]})", "give this one another --name")
            agent = AgentRecord(name, uuid.uuid4().hex, info, now, heard)
            # Every attempt this master believes runs on `name`: its last session's, or, for a master that
            # has restarted and knows them only from the journal, each running job's current attempt.
            ours = AgentRecord(name, "", {}, now)
            if old is not None:
                ours.running = dict(old.running)
            else:
                ours.running = {j.id: j.attempts for j in self.jobs.values() if j.state in ON_AGENT and j.agent == name}
            kept = {job_id for job_id, attempt in ours.running.items() if (job_id, attempt) in claimed}
            same = old is not None and old.info.get("instance") == info.get("instance")
            # The same agent process never received them (a reply lost with its connection): they count
            # nothing against the job. Another process under that name means the agent died with them.
            # First, as it writes: on JournalFailed the old session stands and the agent registers again later.
            self._requeue_lost(ours, keep=kept, reason=f"agent {name} came back without it", counts=not same)
            agent.running = ours.running  # what _requeue_lost left: the attempts the agent still holds
            agent.began = {j for j in agent.running if (job := self.jobs.get(j)) is not None and job.state == RUNNING}
            if old is not None:
                self.sessions.pop(old.session, None)  # superseded: a take parked for it returns nothing
                self.work.notify_all()
                agent.done, agent.failed = old.done, old.failed
                agent.stale = old.stale & claimed  # still held there: may yet hand in a late success
            self.agents[name] = agent
            agent.on_heard = self._watch_lease
            self._watch_lease(agent)
            self.sessions[agent.session] = agent
        log.info("agent %s up: %d slots, tags %s", name, agent.slots, ",".join(sorted(agent.tags)) or "-")
        return {"session": agent.session, "lease": self.lease_seconds}

    def _fair_share(self, agent: AgentRecord) -> int:
        """How many jobs this agent may hold while a burst of short ones is queued: its slots' part of all
        the work on hand, queued or held by agents (ceil(active jobs × its slots / the slots of all agents
        up)), never less than one per slot.

        An agent asks for ~100 ms of work (agent/pacing.py): thousands of tiny jobs. Served as asked,
        the first few agents to take would hold a whole burst while the rest of a crowd stays idle;
        capped at a share, every free slot gets its part. The agents' slots are counted again at most
        every SHARE_REFRESH_SECONDS (O(agents), not per call)."""
        now = time.monotonic()
        if now - self._slots_counted > SHARE_REFRESH_SECONDS:
            self._slots_up = sum(a.slots for a in self.agents.values() if a.state is AgentState.UP)
            self._slots_counted = now
        on_hand = len(self.jobs)  # queued, running and held: O(1), and steady while a burst is handed out
        return max(agent.slots, -(-on_hand * agent.slots // max(1, self._slots_up)))

    def _serve_credit(self, agent: AgentRecord) -> tuple[list[TaskTuple], list[tuple[int, int]]]:
        """New work for the agent's credit (within its fair share of a burst), and its cancels.
        JournalFailed when the dispatch cannot be journaled: its jobs are queued still, its credit and
        cancels kept for the next call. Only an agent that is up, on its current session, gets work: not
        one draining, nor one lost (a take parked for it proves nothing), nor a superseded session."""
        limit = agent.credit
        if limit > agent.slots and self.queues:  # more than a job per slot: short jobs, maybe a burst
            limit = min(limit, self._fair_share(agent) - len(agent.running))
        serve = limit > 0 and agent.state is AgentState.UP and self.sessions.get(agent.session) is agent
        jobs = self._pop(agent, limit) if serve else []
        tasks = self._dispatch(agent, jobs) if jobs else []
        agent.credit -= len(jobs)
        return tasks, self._cancels(agent)

    @staticmethod
    def _cancels(agent: AgentRecord) -> list[tuple[int, int]]:
        """The attempts the agent is to kill, (job id, attempt) pairs, handed over once."""
        cancel = sorted(agent.cancel)
        agent.cancel.clear()
        return cancel

    def take(self, session: str, want: int, wait: float = 1.0) -> tuple[list[TaskTuple], list[tuple[int, int]]]:
        """Long poll for work: up to `want` tasks and any attempts to cancel, waiting up to `wait` seconds.

        `want` is the agent's credit; a report() meanwhile may raise it, and the parked take then
        serves the new credit as soon as work arrives (no waiting out the poll). A take parked for a
        session that a new registration has replaced returns nothing: that connection may be dead."""
        deadline = time.monotonic() + min(max(float(wait), 0.0), 5.0)
        with self.lock:
            agent = self._agent(session)
            agent.credit = max(0, int(want))
            while True:
                if self.sessions.get(session) is not agent:
                    return [], []  # replaced by a new registration: this connection may be dead
                try:
                    tasks, cancel = self._serve_credit(agent)
                except JournalFailed:
                    cancel = self._cancels(agent)  # kills need no write: they go out all the same
                    if not cancel:
                        raise
                    return [], cancel
                if tasks or cancel:
                    return tasks, cancel
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return [], []
                self.work.wait(remaining)

    def report(self, session: str, results: Any, running: Any, want: int = 0,
               live: Any = None, received: Any = None, began: Any = None
               ) -> tuple[list[TaskTuple], list[tuple[int, int]]]:
        """Results in, new work out, in one round trip; also the heartbeat. Returns (tasks, attempts to cancel).
        `running` is every (job id, attempt) the agent holds; `received`, how many tasks it has had this
        session: once it has had all the master sent, an attempt the master thinks it runs and it does not
        hold goes back to the queue, a new attempt that counts nothing against the job (reconciliation).
        `live` maps running job ids to their latest (stdout, stderr) tails, for the console to follow;
        `began` lists (job id, attempt, when) for each held attempt that has started: assigned until then."""
        # All of a report is checked, before any of it changes anything, and before the lock: a
        # malformed one costs dispatch nothing.
        checked = check_results(results) if results else []
        held = check_attempts(running)
        count = check_count(received)
        starts = check_starts(began) if began else []
        with self.lock:
            agent = self._agent(session)
            if starts:
                self._take_starts(agent, starts)
            if live:
                self._take_live_output(agent, live)
            if checked:
                if self.live_output:  # ended jobs' live tails go (rarely any)
                    for result in checked:
                        self.live_output.pop(result.job_id, None)
                self._apply_results(agent, checked)  # JournalFailed: none applied, the agent sends them again
                # Only a report that freed slots renews the credit: a bare heartbeat must not grant
                # a second credit for the slot a parked take() is already serving (priority order).
                agent.credit = max(0, int(want))
            if count is not None and count == agent.dispatched and self.sessions.get(session) is agent:
                try:
                    self._reconcile(agent, held)
                except JournalFailed:
                    pass  # nothing changed: the next heartbeat reconciles again
            try:
                return self._serve_credit(agent)
            except JournalFailed:
                # Its results are journaled, so this reply must go out: the new work waits for the journal.
                return [], self._cancels(agent)

    def _reconcile(self, agent: AgentRecord, held: set[tuple[int, int]]) -> None:
        """The agent has had every task sent to it and holds `held`: what the master thinks it runs beyond
        that goes back to the queue, counting nothing against the job (lock held)."""
        if agent.stale:
            agent.stale &= held  # superseded attempts it no longer holds will never report
        missing = [job_id for job_id, attempt in agent.running.items() if (job_id, attempt) not in held]
        if missing:
            gone = AgentRecord(agent.name, "", {}, 0.0)
            gone.running = {job_id: agent.running[job_id] for job_id in missing}
            # Journaled first: on JournalFailed nothing changed, and the next heartbeat tries again.
            self._requeue_lost(gone, keep=set(), reason=f"agent {agent.name} did not have it", counts=False)
            for job_id in missing:
                log.warning("agent %s does not hold job %d attempt %d: re-queued", agent.name, job_id,
                            agent.running.pop(job_id))

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
            writes.attempts.append(_unfinished_row(job_id, attempt, agent.name, INTERRUPTED, r.started,
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

    def _take_starts(self, agent: AgentRecord, starts: list[Start]) -> None:
        """Jobs this agent has started: running from when it says (journaled first). Each report names
        every start, so one not journaled now (JournalFailed) is taken from the next report."""
        jobs = self.jobs
        fresh = [s for s in starts if (job := jobs.get(s.job_id)) is not None and job.state == ASSIGNED
                 and job.attempts == s.attempt and job.agent == agent.name]
        if not fresh:
            return
        try:
            self.journal.write([(Journal.START, [(s.when, s.job_id) for s in fresh])])
        except JournalFailed:
            return
        for s in fresh:
            job = jobs[s.job_id]
            job.state, job.started = RUNNING, s.when
            agent.began.add(s.job_id)
            self._changed(s.job_id)

    def _take_live_output(self, agent: AgentRecord, live: Any) -> None:
        """Keep (in memory only) the output tails (bytes) of jobs running on this agent; drop the malformed."""
        if type(live) is not dict:
            raise CorralError("malformed report: live output must map job ids to (stdout, stderr)")
        limit = OUTPUT_TAIL_BYTES
        for job_id, tails in live.items():
            job = self.jobs.get(job_id) if type(job_id) is int else None
            if (job is None or job.state not in ON_AGENT or job.agent != agent.name or type(tails) not in (tuple, list)
                    or len(tails) != 2 or not all(type(t) is bytes and len(t) <= limit for t in tails)):
                continue
            self.live_output[job_id] = (tails[0], tails[1])
            self._changed(job_id)  # the console reloads a job detail it shows when its job changed
        if len(self.live_output) > 10_000:  # jobs that left RUNNING by a path that did not clear theirs
            for stale in [j for j in self.live_output if (self.jobs.get(j) is None or self.jobs[j].state not in ON_AGENT)]:
                del self.live_output[stale]

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

    def _requeue_lost(self, agent: AgentRecord, keep: set[int], reason: str, how: str = LOST,
                      counts: bool = True) -> None:
        """Attempts an agent held and no longer runs go back to the queue (or end `lost` past max_lost).
        Each such attempt stays in the job's history, `how` it ended (lost, or interrupted when the
        agent was stopped on purpose), with `reason`. Journaled first: on JournalFailed nothing changed,
        and the caller tries again later. `counts`: the agent was lost with them (the job's lost count
        rises); else the job is not to blame. Each attempt taken away stays in the agent's stale set: if it
        still runs there, its result may yet be handed in (a late success wins)."""
        requeue_rows: list[tuple[Any, ...]] = []
        finish_rows: list[tuple[Any, ...]] = []
        history: list[tuple[Any, ...]] = []
        moves: list[tuple[Job, bool]] = []  # (job, whether it ends lost)
        now = time.time()
        for job_id in sorted(set(agent.running) - keep):
            attempt = agent.running[job_id]
            job = self.jobs.get(job_id)
            if job is None or job.state not in ON_AGENT or job.agent != agent.name or job.attempts != attempt:
                continue
            lost = job.lost + 1 if counts else job.lost
            final = lost > self.max_lost
            # The attempt that makes the job final is the one its outcome comes from: counted.
            history.append(_unfinished_row(job_id, job.attempts, agent.name, how, job.started, now, reason,
                                           int(final)))
            if final:
                finish_rows.append((lost, now, f"its agent was lost {_times(lost)} ({reason})", job_id))
            else:
                requeue_rows.append((job.attempts, job.failures, lost, job_id))
            moves.append((job, final))
        if moves:
            self.journal.write([(Journal.ATTEMPT, history), (Journal.REQUEUE, requeue_rows),
                                (Journal.LOST, finish_rows)])
        for job, ends in moves:
            agent.stale.add((job.id, job.attempts))
            if counts:
                job.lost += 1
            self._changed(job.id)
            if ends:
                del self.jobs[job.id]
                self._final(job.id, LOST)
                log.info("lost %d: its agent was lost %s", job.id, _times(job.lost))
            else:
                self._requeued(job)
                log.info("requeued %d: %s", job.id, reason)
        agent.running = {job_id: attempt for job_id, attempt in agent.running.items() if job_id in keep}
        if moves:
            self.work.notify_all()
            self.finished.notify_all()

    # ---- the agent registry (deploy/service.py drains and retires agents it stops over SSH) ---------

    def drain_agent(self, name: str) -> bool:
        """Give this agent no more work (it is being drained over SSH); False if no such agent is up."""
        with self.lock:
            agent = self.agents.get(name)
            if agent is None or agent.state.gone:
                return False
            agent.state = AgentState.DRAINING
        log.info("agent %s draining", name)
        return True

    def retire_agent(self, name: str, reason: str) -> None:
        """The agent was stopped on purpose: what it still held goes back to the queue now, not after a lease."""
        with self.lock:
            agent = self.agents.get(name)
            if agent is None:
                return
            # JournalFailed: nothing changed, and its lease expiry tries again
            self._requeue_lost(agent, keep=set(), reason=reason, how=INTERRUPTED)
            self.sessions.pop(agent.session, None)
            agent.state = AgentState.STOPPED
        log.info("agent %s stopped: %s", name, reason)

    def housekeeping(self) -> None:
        """The master's own tick (server.py calls it every HOUSEKEEPING_SECONDS): leases, then expiry.

        If this tick comes late (the master was stopped or starved: the gap since the last one exceeds
        its period by more than LATE_FRACTION of a lease), the master heard nobody meanwhile through no
        fault of theirs: every lease is extended by the gap before anyone is judged. The gap is measured
        on the monotonic clock, so a step of the wall clock changes nothing."""
        with self.lock:
            now = self.clock()
            late = now - self.last_tick - HOUSEKEEPING_SECONDS
            self.last_tick = now
            if late > self.lease_seconds * LATE_FRACTION:
                for agent in self.agents.values():
                    agent.heard += late
                if self.orphans_since:
                    self.orphans_since += late
                log.warning("the master's housekeeping was %.1fs late (stopped or starved): every lease extended"
                            " by that much", late)
        self.expire_leases()

    def expire_leases(self) -> None:
        """Agents silent past their lease are lost and their jobs re-queued; jobs left running by a
        previous master whose agent never came back are re-queued too (monotonic clock throughout).
        JournalFailed (housekeeping logs it): what was not journaled stays as it was, for the next call."""
        with self.lock:
            now = self.clock()
            leases = self._leases
            while leases and now - leases[0][0] > self.lease_seconds:
                heard, _, agent = leases[0]
                if agent.heard != heard or agent.state.gone or self.agents.get(agent.name) is not agent:
                    heapq.heappop(leases)  # heard since (a later entry stands for it), lost already, or replaced
                    continue
                # Re-queued first: if the journal refuses, the agent is not marked lost and its entry
                # stays on top, so the next call sees it silent still and tries again.
                silent = now - heard
                self._requeue_lost(agent, keep=set(), reason=f"agent {agent.name} lost: silent for {silent:.1f}s")
                heapq.heappop(leases)
                agent.state = AgentState.LOST
                log.info("agent %s lost: silent for %.1fs", agent.name, silent)
            if self.orphans_since and now - self.orphans_since > self.lease_seconds:
                held: dict[str, dict[int, int]] = {}
                for job in self.jobs.values():
                    if job.state in ON_AGENT:
                        owner = self.agents.get(job.agent or "")
                        if owner is None or owner.running.get(job.id) != job.attempts:
                            held.setdefault(job.agent or "?", {})[job.id] = job.attempts
                for name, attempts in held.items():
                    ghost = AgentRecord(name, "", {}, 0.0)
                    ghost.running = attempts
                    self._requeue_lost(ghost, keep=set(),
                                       reason=f"agent {name} did not come back after the master restarted")
                self.orphans_since = 0.0  # all of them journaled: done (on JournalFailed, the next call tries again)


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


def _unfinished_row(job_id: int, attempt: int, agent: str, state: str, started: float | None, ended: float,
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
