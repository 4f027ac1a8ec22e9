"""The scheduler's state and what every part of it uses: the queues, the agents' records, recovery from the journal, dispatch."""

from __future__ import annotations

import heapq
import itertools
import json
import logging
import threading
import time
from collections import Counter, OrderedDict, deque
from typing import Any, Callable

from corral.agent.errors import JournalFailed, UnknownAgent, UnknownJob

from .records import ASSIGNED, QUEUED, AgentRecord, AgentState, Job, Retention, TaskTuple
from .store import Journal
from .validate import is_whole, shown
from .views import Views

# One logger for the scheduler's events, whichever of its modules logs them (`corral master -v`).
log = logging.getLogger("corral.console.master.scheduler")

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


def times_text(n: int) -> str:
    return f"{n} time" if n == 1 else f"{n} times"




class Core:
    """The master's state, shared by the parts of the Scheduler (sessions.py, results.py, scheduler.py); every
    method runs under one lock."""

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

    # Defined by the other parts (results.py, sessions.py); declared here for the ones that call across.
