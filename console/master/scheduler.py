"""Queues, priorities, tags, leases and retries: the master's state, journaled before any call returns."""

from __future__ import annotations

import heapq
import logging
import math
import threading
import time
import uuid
from collections import OrderedDict, deque
from typing import Any, Callable, Iterable, Sequence

from corral.agent.errors import BadJobSpec, CorralError, NameTaken, ProtocolMismatch, UnknownAgent, UnknownJob
from corral.agent.protocol import FINAL_STATES, MAX_PAYLOAD_BYTES, OUTPUT_TAIL_BYTES, PROTOCOL_VERSION, JobState

from .store import Journal, encode_env, encode_tags

log = logging.getLogger(__name__)

QUEUED, RUNNING, HELD = JobState.QUEUED.value, JobState.RUNNING.value, JobState.HELD.value
DONE, FAILED, TIMEOUT = JobState.DONE.value, JobState.FAILED.value, JobState.TIMEOUT.value
CANCELLED, LOST = JobState.CANCELLED.value, JobState.LOST.value
RELEASED = "released"  # an agent handing back a job it never started (draining)
FINAL = {s.value for s in FINAL_STATES}
MAX_SUBMIT = 100_000  # jobs in one submit() call
MAX_RETRIES = 100
RECENT_FINAL = 200_000  # final states kept in memory for wait(); older ones are read from the journal


class Job:
    """A job the master is still responsible for (queued, running or held)."""

    __slots__ = (
        "id", "name", "command", "func", "payload", "env", "cwd", "priority", "timeout", "retries",
        "tags", "state", "attempts", "failures", "lost", "agent", "submitted", "started",
    )

    def __init__(self, id: int, name: str, command: str | None, func: str | None, payload: bytes | None,
                 env: dict, cwd: str | None, priority: int, timeout: float | None, retries: int,
                 tags: frozenset, state: str = QUEUED, attempts: int = 0, failures: int = 0, lost: int = 0,
                 agent: str | None = None, submitted: float = 0.0, started: float | None = None) -> None:
        self.id, self.name, self.command, self.func, self.payload = id, name, command, func, payload
        self.env, self.cwd, self.priority, self.timeout, self.retries = env, cwd, priority, timeout, retries
        self.tags, self.state, self.attempts, self.failures, self.lost = tags, state, attempts, failures, lost
        self.agent, self.submitted, self.started = agent, submitted, started

    def task(self) -> tuple:
        """The wire form of this job's current attempt (agent.protocol.Task)."""
        return (self.id, self.attempts, self.command, self.func, self.payload, self.env, self.cwd, self.timeout)


class AgentRecord:
    """An agent as the master sees it."""

    __slots__ = ("name", "session", "info", "tags", "slots", "running", "cancel", "done", "failed",
                 "last_seen", "registered", "state", "credit")

    def __init__(self, name: str, session: str, info: dict, now: float) -> None:
        self.name = name
        self.session = session
        self.info = info
        self.tags = frozenset(info.get("tags") or ())
        self.slots = int(info.get("slots") or 1)
        self.running: set[int] = set()
        self.cancel: set[int] = set()
        self.done = 0
        self.failed = 0
        self.last_seen = now
        self.registered = now
        self.state = "up"
        self.credit = 0  # how many more jobs the agent said it would take (its last take/report)

    def wire(self, now: float) -> dict:
        return {
            "name": self.name,
            "host": self.info.get("host", ""),
            "pid": self.info.get("pid", 0),
            "state": self.state,
            "slots": self.slots,
            "busy": len(self.running),
            "done": self.done,
            "failed": self.failed,
            "tags": sorted(self.tags),
            "python": self.info.get("python", ""),
            "started_by": self.info.get("started_by", "manual"),
            "last_seen": self.last_seen,
            "heartbeat_age": max(0.0, now - self.last_seen),
            "registered": self.registered,
        }


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


_valid_funcs: set[str] = set()  # module:function names already checked (submissions repeat them)


def _check_func(func: Any, where: str) -> None:
    if func in _valid_funcs:
        return
    module, _, attr = func.partition(":") if isinstance(func, str) else ("", "", "")
    if not module or not attr or not all(p.isidentifier() for p in module.split(".") + attr.split(".")):
        raise BadJobSpec(f"{where}: {func!r} is not a module:function name", "e.g. mypkg.tasks:resize")
    if len(_valid_funcs) < 10_000:
        _valid_funcs.add(func)


def validate(spec: Any, where: str) -> tuple:
    """Check one submitted spec (plain data, from anyone holding the authkey); returns
    (name, command, func, payload, env, cwd, priority, timeout, retries, tags) or raises BadJobSpec."""
    if type(spec) is not dict:
        raise BadJobSpec(f"{where}: a job spec must be a dict, not {type(spec).__name__}")
    get = spec.get
    command, func, payload = get("command"), get("func"), get("payload")
    if (command is None) == (func is None):
        raise BadJobSpec(f"{where}: give exactly one of a shell command or a module:function")
    if command is not None and (type(command) is not str or not command.strip()):
        raise BadJobSpec(f"{where}: the command is empty", "give the command after --, e.g. corral submit -- echo hi")
    if func is not None:
        _check_func(func, where)
    if payload is not None and type(payload) is not bytes:
        raise BadJobSpec(f"{where}: the arguments must arrive pickled, as bytes")
    if len(payload or b"") + len(command or "") > MAX_PAYLOAD_BYTES:
        raise BadJobSpec(f"{where}: the job is {len(payload or b'') + len(command or '')} bytes;"
                         f" the limit is {MAX_PAYLOAD_BYTES}", "pass large data by path, not by value")
    name, env, cwd = get("name") or "", get("env") or {}, get("cwd")
    priority, timeout, retries, tags = get("priority", 0), get("timeout"), get("retries", 0), get("tags") or ()
    if type(name) is not str or len(name) > 200:
        raise BadJobSpec(f"{where}: the name must be text of at most 200 characters")
    if type(env) is not dict or (env and not all(type(k) is str and type(v) is str for k, v in env.items())):
        raise BadJobSpec(f"{where}: env must map names to strings")
    if cwd is not None and type(cwd) is not str:
        raise BadJobSpec(f"{where}: cwd must be a path")
    if type(priority) is not int:
        raise BadJobSpec(f"{where}: priority must be a whole number, not {priority!r}")
    if timeout is not None:
        if type(timeout) not in (int, float) or not math.isfinite(timeout) or timeout <= 0:
            raise BadJobSpec(f"{where}: timeout must be a positive number of seconds, not {timeout!r}")
        timeout = float(timeout)
    if type(retries) is not int or not 0 <= retries <= MAX_RETRIES:
        raise BadJobSpec(f"{where}: retries must be a whole number from 0 to {MAX_RETRIES}, not {retries!r}")
    if tags:
        if type(tags) not in (list, tuple) or not all(type(t) is str and t for t in tags):
            raise BadJobSpec(f"{where}: tags must be a list of non-empty strings")
        tags = tuple(sorted(set(tags)))
    return name, command, func, payload, env, cwd, priority, timeout, retries, tuple(tags)


_RESULT_STATES = frozenset({DONE, FAILED, TIMEOUT, CANCELLED, RELEASED})
_OPT_INT, _OPT_BYTES, _NUMBER = (int, type(None)), (bytes, type(None)), (int, float)
_INT64 = range(-(2**63), 2**63)  # what an SQLite INTEGER holds


def _storable(text: str) -> bool:
    """Whether SQLite can store this text (UTF-8): lone surrogates cannot be encoded."""
    if text.isascii():
        return True
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _times(n: int) -> str:
    return f"{n} time" if n == 1 else f"{n} times"


def _check_results(results: Any) -> None:
    """Refuse a malformed report whole (an agent holding the authkey may still be buggy), and one the
    journal could not store: nothing of it may change the master's state unless all of it is written.
    Written for the hot path (every result of every job passes here): plain type() tests, no generators."""
    if type(results) is not list:
        raise CorralError("malformed report: results must be a list")
    lowest, highest = _INT64.start, _INT64.stop
    for row in results:
        if type(row) not in (tuple, list) or len(row) != 11:
            raise CorralError(f"malformed report: bad result row {str(row)[:200]}")
        job_id, attempt, state, exit_code, value, out, err, error, tb, started, ended = row
        if (type(job_id) is not int or type(attempt) is not int or type(state) is not str
                or state not in _RESULT_STATES or type(exit_code) not in _OPT_INT or type(value) not in _OPT_BYTES
                or type(out) is not str or type(err) is not str or type(error) is not str or type(tb) is not str
                or type(started) not in _NUMBER or type(ended) not in _NUMBER
                or not lowest <= job_id < highest or not lowest <= attempt < highest
                or (exit_code is not None and not lowest <= exit_code < highest)
                or not ((out.isascii() and err.isascii() and error.isascii() and tb.isascii())
                        or (_storable(out) and _storable(err) and _storable(error) and _storable(tb)))):
            raise CorralError(f"malformed report: bad result row {str(row)[:200]}")


class Scheduler:
    """The master's state. Every public method is called from a manager thread, under one lock."""

    def __init__(self, journal: Journal, lease_seconds: float = 10.0, max_lost: int = 3,
                 on_event: Callable[[str], None] | None = None) -> None:
        self.journal = journal
        self.lease_seconds = lease_seconds
        self.max_lost = max_lost
        self.on_event = on_event
        self.lock = threading.Lock()
        self.work = threading.Condition(self.lock)  # takers wait here: new work or a cancel for them
        self.finished = threading.Condition(self.lock)  # wait() callers wait here
        self.jobs: dict[int, Job] = {}
        self.queues: dict[frozenset, list[tuple[int, int]]] = {}  # tag set -> heap of (-priority, id)
        self.agents: dict[str, AgentRecord] = {}
        self.sessions: dict[str, AgentRecord] = {}
        self.recent_final: OrderedDict[int, str] = OrderedDict()
        self.live_output: dict[int, tuple[str, str]] = {}  # running job id -> its latest (stdout, stderr)
        self.finished_times: deque[float] = deque(maxlen=100_000)
        self.seq = 0  # bumped on every change, for incremental snapshots
        self.changes: deque[tuple[int, int]] = deque(maxlen=200_000)  # (seq, job id)
        self.started = time.time()
        self._recover()

    # ---- recovery -----------------------------------------------------------------------

    def _recover(self) -> None:
        """Rebuild the queues from the journal: queued stay queued; running wait for their agent."""
        import json

        self.next_id = self.journal.max_id() + 1
        for row in self.journal.active_jobs():
            (job_id, name, command, func, payload, env, cwd, priority, timeout, retries, tags, state,
             attempts, failures, lost, agent, submitted, started, *_rest) = row
            job = Job(job_id, name, command, func, payload, json.loads(env), cwd, priority, timeout, retries,
                      frozenset(json.loads(tags)), state, attempts, failures, lost, agent, submitted, started)
            self.jobs[job_id] = job
            if state == QUEUED:
                self._enqueue(job)
        self.orphans_since = time.time()  # running jobs with no agent yet: reconciled or re-queued after a lease

    # ---- helpers (lock held) ------------------------------------------------------------

    def _emit(self, line: str) -> None:
        if self.on_event is not None:
            self.on_event(line)

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

    def _dispatch(self, agent: AgentRecord, jobs: list[Job]) -> list[tuple]:
        now = time.time()
        rows = []
        for job in jobs:
            job.state = RUNNING
            job.attempts += 1
            job.agent = agent.name
            job.started = now
            agent.running.add(job.id)
            self._changed(job.id)
            rows.append((job.attempts, agent.name, now, job.id))
        self.journal.write([(Journal.DISPATCH, rows)])
        if self.live_output:  # a new attempt starts with no output of its own yet
            for job in jobs:
                self.live_output.pop(job.id, None)
        if self.on_event is not None:
            for job in jobs:
                self._emit(f"dispatched {job.id} → {agent.name}")
        return [job.task() for job in jobs]

    def _final(self, job_id: int, state: str) -> None:
        self.recent_final[job_id] = state
        if len(self.recent_final) > RECENT_FINAL:
            self.recent_final.popitem(last=False)

    def _agent(self, session: str) -> AgentRecord:
        agent = self.sessions.get(session)
        if agent is None:
            raise UnknownAgent(f"unknown agent session {session!r}", "register again")
        agent.last_seen = time.time()
        if agent.state == "lost":
            agent.state = "up"
        return agent

    def _check_ids(self, ids: Iterable[Any]) -> list[int]:
        out = []
        for job_id in ids:
            if not _is_int(job_id) or not 0 < job_id < self.next_id:
                raise UnknownJob(f"no job {job_id!r}", "list jobs with `corral jobs`")
            out.append(job_id)
        return out

    # ---- clients ------------------------------------------------------------------------

    def hello(self) -> dict:
        return {"protocol": PROTOCOL_VERSION, "started": self.started, "journal": str(self.journal.path)}

    def submit(self, specs: list) -> list[int]:
        """Queue jobs; they are in the journal before this returns. All or nothing."""
        if not isinstance(specs, list) or not specs:
            raise BadJobSpec("submit() takes a non-empty list of job specs")
        if len(specs) > MAX_SUBMIT:
            raise BadJobSpec(f"{len(specs)} jobs in one call; the limit is {MAX_SUBMIT}", "submit in batches")
        total = len(specs)
        return self._queue([validate(spec, f"job {i + 1} of {total}" if total > 1 else "job")
                            for i, spec in enumerate(specs)])

    def submit_map(self, template: dict, payloads: list, wait: float = 0.0) -> tuple[list[int], list[tuple]]:
        """Queue one callable over many argument payloads (what Client.map sends): the template is
        checked once, each payload only for type and size. Then wait up to `wait` seconds and return
        (ids, outcomes of those already final), so one round trip can carry a whole small map."""
        if not isinstance(payloads, list) or not payloads or len(payloads) > MAX_SUBMIT:
            raise BadJobSpec(f"submit_map() takes a list of 1 to {MAX_SUBMIT} payloads")
        if not isinstance(template, dict) or template.get("func") is None:
            raise BadJobSpec("submit_map() needs a template with a module:function")
        name, command, func, _, env, cwd, priority, timeout, retries, tags = validate(dict(template, payload=None), "template")
        for i, payload in enumerate(payloads):
            if type(payload) is not bytes or len(payload) > MAX_PAYLOAD_BYTES:
                validate(dict(template, payload=payload), f"job {i + 1} of {len(payloads)}")
        ids = self._queue([(name, command, func, payload, env, cwd, priority, timeout, retries, tags)
                           for payload in payloads])
        return ids, (self.wait_outcomes(ids, wait) if wait and wait > 0 else [])

    def _queue(self, checked: list[tuple]) -> list[int]:
        """Journal, then queue, validated jobs (validate()'s tuples); returns their ids."""
        total = len(checked)
        now = time.time()
        no_tags: frozenset = frozenset()
        with self.lock:
            first = self.next_id
            rows = [(first + i, name, command, func, payload, encode_env(env), cwd, priority, timeout, retries,
                     encode_tags(tags), now)
                    for i, (name, command, func, payload, env, cwd, priority, timeout, retries, tags)
                    in enumerate(checked)]
            self.journal.write([(Journal.INSERT_JOB, rows)])
            self.next_id = first + total
            jobs, changes, seq = self.jobs, self.changes, self.seq
            for i, (name, command, func, payload, env, cwd, priority, timeout, retries, tags) in enumerate(checked):
                job = Job(first + i, name, command, func, payload, env, cwd, priority, timeout, retries,
                          frozenset(tags) if tags else no_tags, submitted=now)
                jobs[job.id] = job
                self._enqueue(job)
                seq += 1
                changes.append((seq, job.id))
            self.seq = seq
            self.work.notify_all()
        if self.on_event is not None:
            self._emit(f"queued {first}" if len(checked) == 1 else f"queued {first}..{first + len(checked) - 1}")
        return list(range(first, first + len(checked)))

    def cancel(self, ids: list) -> dict[int, str]:
        """Cancel jobs: queued ones at once, running ones by their agent (within a second)."""
        with self.lock:
            job_ids = self._check_ids(ids)
            outcome: dict[int, str] = {}
            rows = []
            now = time.time()
            for job_id in job_ids:
                job = self.jobs.get(job_id)
                if job is None:
                    outcome[job_id] = "already final"
                elif job.state in (QUEUED, HELD):
                    job.state = CANCELLED
                    del self.jobs[job_id]
                    self._final(job_id, CANCELLED)
                    self._changed(job_id)
                    rows.append((CANCELLED, job.failures, None, now, None, None, "cancelled before it ran", job_id))
                    outcome[job_id] = CANCELLED
                else:
                    agent = self.agents.get(job.agent or "")
                    if agent is not None:
                        agent.cancel.add(job_id)
                    outcome[job_id] = "cancelling"
            if rows:
                self.journal.write([(Journal.FINISH, rows)])
                self.finished.notify_all()
            self.work.notify_all()
        for job_id, what in outcome.items():
            if what in (CANCELLED, "cancelling"):
                self._emit(f"cancel {job_id}: {what}")
        return outcome

    def requeue(self, ids: list) -> list[int]:
        """Queue finished jobs again as new jobs with the same spec; returns the new ids."""
        with self.lock:
            job_ids = self._check_ids(ids)
        specs = []
        for job_id in job_ids:
            row = self.journal.job(job_id)
            import json

            specs.append({"name": row[1], "command": row[2], "func": row[3], "payload": row[4],
                          "env": json.loads(row[5]), "cwd": row[6], "priority": row[7], "timeout": row[8],
                          "retries": row[9], "tags": json.loads(row[10])})
        return self.submit(specs)

    def wait(self, ids: list, timeout: float | None = 1.0) -> dict[int, str]:
        """Long poll: return {id: state} for those of `ids` that are final, waiting up to `timeout`
        for all of them to be."""
        deadline = None if timeout is None else time.time() + min(float(timeout), 30.0)
        with self.lock:
            pending = set(self._check_ids(ids))
            while True:
                pending = {j for j in pending if j in self.jobs}
                if not pending:
                    break
                remaining = None if deadline is None else deadline - time.time()
                if remaining is not None and remaining <= 0:
                    break
                self.finished.wait(remaining if remaining is not None else 30.0)
            done_ids = [j for j in ids if j not in pending]
            states = {j: self.recent_final[j] for j in done_ids if j in self.recent_final}
        missing = [j for j in done_ids if j not in states]
        if missing:
            states.update({row[0]: row[1] for row in self.journal.outcomes(missing)})
        return states

    def wait_outcomes(self, ids: list, timeout: float | None = 1.0) -> list[tuple]:
        """Like wait(), but return the outcomes (id, state, exit_code, value, error) of the final ones."""
        final = self.wait(ids, timeout)
        return self.journal.outcomes([j for j in ids if j in final]) if final else []

    def outcomes(self, ids: list) -> list[tuple]:
        """(id, state, exit_code, value, error) of each job, in the order asked."""
        with self.lock:
            job_ids = self._check_ids(ids)
        rows = {row[0]: row for row in self.journal.outcomes(job_ids)}
        return [rows[j] for j in job_ids]

    def job(self, job_id: Any) -> dict:
        with self.lock:
            self._check_ids([job_id])
        row = self.journal.job(job_id)
        if row is None:
            raise UnknownJob(f"no job {job_id!r}")
        keys = ("id name command func payload env cwd priority timeout retries tags state attempts failures"
                " lost agent submitted started ended exit_code value error").split()
        record = dict(zip(keys, row))
        import json

        record["env"] = json.loads(record["env"])
        record["tags"] = json.loads(record["tags"])
        akeys = "attempt agent state started ended exit_code stdout stderr error traceback counted".split()
        record["attempt_list"] = [dict(zip(akeys, a)) for a in self.journal.attempts(job_id)]
        if record["state"] == DONE and not any(a["counted"] for a in record["attempt_list"]):
            # A clean first run has no attempts row of its own (see _apply_results): the jobs row is it.
            record["attempt_list"].append({
                "attempt": record["attempts"], "agent": record["agent"], "state": DONE,
                "started": record["started"], "ended": record["ended"], "exit_code": record["exit_code"],
                "stdout": "", "stderr": "", "error": "", "traceback": "", "counted": 1,
            })
        with self.lock:
            live = self.jobs.get(job_id)
            if live is not None:  # the journal may lag a running job's in-memory state by nothing; be exact
                record["state"], record["agent"], record["attempts"] = live.state, live.agent, live.attempts
                if live.state == RUNNING and job_id in self.live_output:
                    record["live_stdout"], record["live_stderr"] = self.live_output[job_id]
        return record

    def list_jobs(self, states: list | None = None, limit: int = 1000) -> list[dict]:
        keys = "id name command func priority tags state attempts agent submitted started ended exit_code error".split()
        rows = self.journal.summaries(states or None, int(limit), newest_first=True)
        import json

        out = []
        for row in rows:
            record = dict(zip(keys, row))
            record["tags"] = json.loads(record["tags"])
            out.append(record)
        return out

    def status(self) -> dict:
        now = time.time()
        with self.lock:
            agents = [a.wire(now) for a in self.agents.values()]
            recent = sum(1 for t in self.finished_times if t > now - 10)
            active = {QUEUED: 0, RUNNING: 0, HELD: 0}
            for job in self.jobs.values():
                active[job.state] = active.get(job.state, 0) + 1
        counts = {state.value: 0 for state in JobState}
        counts.update(self.journal.counts())
        counts.update(active)
        return {
            "counts": counts,
            "agents": agents,
            "slots": sum(a["slots"] for a in agents if a["state"] != "lost"),
            "busy": sum(a["busy"] for a in agents),
            "rate": recent / 10.0,
            "seq": self.seq,
            "uptime": now - self.started,
        }

    def agent_list(self) -> list[dict]:
        now = time.time()
        with self.lock:
            return [a.wire(now) for a in self.agents.values()]

    # ---- agents -------------------------------------------------------------------------

    def register(self, info: dict, running: list) -> dict:
        """An agent (re)joins; it says which job ids it is still running."""
        if not isinstance(info, dict) or not isinstance(info.get("name"), str) or not info["name"]:
            raise CorralError("register() needs the agent's info with a name")
        if info.get("protocol") != PROTOCOL_VERSION:
            raise ProtocolMismatch(f"agent speaks protocol {info.get('protocol')}, master {PROTOCOL_VERSION}",
                                   "deploy the agent that matches this master")
        now = time.time()
        name = info["name"]
        with self.lock:
            if not isinstance(running, list):
                raise CorralError("register() needs the list of job ids the agent still holds")
            old = self.agents.get(name)
            if (old is not None and old.state not in ("lost", "stopped") and now - old.last_seen < self.lease_seconds
                    and old.info.get("instance") != info.get("instance")):
                raise NameTaken(f"an agent named {name!r} is already connected (pid {old.info.get('pid')} on"
                                f" {old.info.get('host') or '?'})", "give this one another --name")
            agent = AgentRecord(name, uuid.uuid4().hex, info, now)
            still = {j for j in running if _is_int(j)}
            if old is not None:
                self.sessions.pop(old.session, None)
                agent.done, agent.failed = old.done, old.failed
            # Every job this master believes runs on `name` (it may have restarted and know them only
            # from the journal): kept if the agent still holds it, re-queued if the agent does not.
            ours = AgentRecord(name, "", {}, now)
            ours.running = {j.id for j in self.jobs.values() if j.state == RUNNING and j.agent == name}
            agent.running = ours.running & still
            self._requeue_lost(ours, keep=still, reason=f"agent {name} came back without it")
            self.agents[name] = agent
            self.sessions[agent.session] = agent
        self._emit(f"agent {name} up: {agent.slots} slots, tags {','.join(sorted(agent.tags)) or '-'}")
        return {"session": agent.session, "lease": self.lease_seconds}

    def _serve_credit(self, agent: AgentRecord) -> tuple[list[tuple], list[int]]:
        jobs = self._pop(agent, agent.credit) if agent.credit > 0 and agent.state != "draining" else []
        agent.credit -= len(jobs)
        cancel = sorted(agent.cancel)
        agent.cancel.clear()
        return (self._dispatch(agent, jobs) if jobs else []), cancel

    def take(self, session: str, want: int, wait: float = 1.0) -> tuple[list[tuple], list[int]]:
        """Long poll for work: up to `want` tasks and any ids to cancel, waiting up to `wait` seconds.

        `want` is the agent's credit; a report() meanwhile may raise it, and the parked take then
        serves the new credit as soon as work arrives (no waiting out the poll)."""
        deadline = time.time() + min(max(float(wait), 0.0), 5.0)
        with self.lock:
            agent = self._agent(session)
            agent.credit = max(0, int(want))
            while True:
                tasks, cancel = self._serve_credit(agent)
                if tasks or cancel:
                    return tasks, cancel
                remaining = deadline - time.time()
                if remaining <= 0 or self.sessions.get(session) is not agent:
                    return [], []
                self.work.wait(remaining)
                agent.last_seen = time.time()

    def report(self, session: str, results: list, running: list, want: int = 0,
               live: dict | None = None) -> tuple[list[tuple], list[int]]:
        """Results in, new work out, in one round trip; also the heartbeat. Returns (tasks, ids to cancel).
        `live` maps running job ids to their latest (stdout, stderr) tails, for the console to follow."""
        with self.lock:
            agent = self._agent(session)
            if live:
                self._take_live_output(agent, live)
            if results:
                if self.live_output and type(results) is list:  # ended jobs' live tails go (rarely any)
                    for row in results:
                        if type(row) in (tuple, list) and row:
                            self.live_output.pop(row[0], None)
                self._apply_results(agent, results)
                # Only a report that freed slots renews the credit: a bare heartbeat must not grant
                # a second credit for the slot a parked take() is already serving (priority order).
                agent.credit = max(0, int(want))
            return self._serve_credit(agent)

    def _apply_results(self, agent: AgentRecord, results: list) -> None:
        _check_results(results)  # all of it, before any of it changes anything
        now = time.time()
        finish_rows, requeue_rows, attempt_rows = [], [], []
        events = []
        seen: set[tuple[int, int]] = set()
        for row in results:
            (job_id, attempt, state, exit_code, value, stdout, stderr, error, tb, started, ended) = row
            if (job_id, attempt) in seen:
                continue  # the same attempt twice in one report: the first one stands
            seen.add((job_id, attempt))
            job = self.jobs.get(job_id)
            agent.running.discard(job_id)
            counted = job is not None and job.state == RUNNING and job.attempts == attempt and job.agent == agent.name
            if not counted and job is not None and state == DONE and (
                    attempt < job.attempts or (attempt == job.attempts and job.state == QUEUED)):
                # A late success of an attempt re-queued meanwhile (its agent was lost, then came
                # back), whether dispatched again or still queued: the first attempt to finish
                # wins, and the one still running is cancelled.
                counted = True
                other = self.agents.get(job.agent or "") if job.state == RUNNING else None
                if other is not None:
                    other.cancel.add(job_id)
                events.append(f"late result of {job_id} attempt {attempt} from {agent.name} wins")
            if not counted and state != RELEASED and self._reported_before(job_id, attempt, agent.name, state, ended):
                continue  # a report sent again (its reply was lost): this result is in the journal already
            # A clean, counted run needs no row of its own: the jobs row holds its whole story.
            if state != RELEASED and (stdout or stderr or error or not counted or state != DONE or attempt > 1):
                attempt_rows.append((job_id, attempt, agent.name, state, started, ended, exit_code,
                                     stdout, stderr, error, tb, int(counted)))
            if not counted:
                continue  # a stale attempt (re-queued meanwhile, or already final): history only
            self._changed(job_id)
            if state == RELEASED:
                job.state, job.agent = QUEUED, None
                job.attempts -= 1
                self._enqueue(job)
                requeue_rows.append((job.attempts, job.failures, job.lost, job_id))
                continue
            if state in (FAILED, TIMEOUT):
                job.failures += 1
                agent.failed += 1
                if job.failures <= job.retries:
                    job.state, job.agent = QUEUED, None
                    self._enqueue(job)
                    requeue_rows.append((job.attempts, job.failures, job.lost, job_id))
                    events.append(f"{state} {job_id} on {agent.name}: {error or 'exit ' + str(exit_code)}; retry {job.failures}/{job.retries}")
                    continue
            else:
                agent.done += 1
            if state not in FINAL:
                state = FAILED
            del self.jobs[job_id]
            self._final(job_id, state)
            self.finished_times.append(now)
            finish_rows.append((state, job.failures, agent.name, ended, exit_code, value, error, job_id))
            if self.on_event is not None:
                what = f"exit {exit_code}" if exit_code is not None else state
                events.append(f"finished {job_id} on {agent.name}: {what} in {ended - started:.2f}s"
                              if state == DONE else f"{state} {job_id} on {agent.name}: {error or what}")
        self.journal.write([(Journal.ATTEMPT, attempt_rows), (Journal.FINISH, finish_rows),
                            (Journal.REQUEUE, requeue_rows)])
        if finish_rows:
            self.finished.notify_all()
        if requeue_rows:
            self.work.notify_all()
        for line in events:
            self._emit(line)

    def _take_live_output(self, agent: AgentRecord, live: Any) -> None:
        """Keep (in memory only) the output tails of jobs running on this agent; drop the malformed."""
        if type(live) is not dict:
            raise CorralError("malformed report: live output must map job ids to (stdout, stderr)")
        limit = 2 * OUTPUT_TAIL_BYTES
        for job_id, tails in live.items():
            job = self.jobs.get(job_id) if type(job_id) is int else None
            if (job is None or job.state != RUNNING or job.agent != agent.name or type(tails) not in (tuple, list)
                    or len(tails) != 2 or not all(type(t) is str and len(t) <= limit for t in tails)):
                continue
            self.live_output[job_id] = (tails[0], tails[1])
            self._changed(job_id)  # the console reloads a job detail it shows when its job changed
        if len(self.live_output) > 10_000:  # jobs that left RUNNING by a path that did not clear theirs
            for stale in [j for j in self.live_output if (self.jobs.get(j) is None or self.jobs[j].state != RUNNING)]:
                del self.live_output[stale]

    def _reported_before(self, job_id: int, attempt: int, agent: str, state: str, ended: float) -> bool:
        """Whether this result of a job is already in the journal: as its outcome (same agent, state
        and end), or in its history (same attempt from the same agent). Only results that do not
        count get here, which is rare: a read of the journal is fine."""
        row = self.journal.job(job_id)
        if row is not None and (row[11], row[15], row[18]) == (state, agent, ended):
            return True
        return any(a[0] == attempt and a[1] == agent for a in self.journal.attempts(job_id))

    def _requeue_lost(self, agent: AgentRecord, keep: set[int], reason: str) -> None:
        """Jobs an agent held and no longer runs go back to the queue (or end `lost` past max_lost)."""
        requeue_rows, finish_rows = [], []
        now = time.time()
        for job_id in sorted(agent.running - keep):
            job = self.jobs.get(job_id)
            if job is None or job.state != RUNNING or job.agent != agent.name:
                continue
            job.lost += 1
            self._changed(job_id)
            if job.lost > self.max_lost:
                del self.jobs[job_id]
                self._final(job_id, LOST)
                finish_rows.append((job.lost, now, f"its agent was lost {_times(job.lost)} ({reason})", job_id))
                self._emit(f"lost {job_id}: its agent was lost {_times(job.lost)}")
            else:
                job.state, job.agent = QUEUED, None
                self._enqueue(job)
                requeue_rows.append((job.attempts, job.failures, job.lost, job_id))
                self._emit(f"requeued {job_id}: {reason}")
        agent.running &= keep
        if requeue_rows or finish_rows:
            self.journal.write([(Journal.REQUEUE, requeue_rows), (Journal.LOST, finish_rows)])
            self.work.notify_all()
            self.finished.notify_all()

    def drain_agent(self, name: str) -> bool:
        """Give this agent no more work (it is being drained over SSH); False if no such agent is up."""
        with self.lock:
            agent = self.agents.get(name)
            if agent is None or agent.state in ("lost", "stopped"):
                return False
            agent.state = "draining"
        self._emit(f"agent {name} draining")
        return True

    def retire_agent(self, name: str, reason: str) -> None:
        """The agent was stopped on purpose: what it still held goes back to the queue now, not after a lease."""
        with self.lock:
            agent = self.agents.get(name)
            if agent is None:
                return
            self.sessions.pop(agent.session, None)
            self._requeue_lost(agent, keep=set(), reason=reason)
            agent.state = "stopped"
        self._emit(f"agent {name} stopped: {reason}")

    def expire_leases(self) -> None:
        """Called every second: agents silent past their lease are lost and their jobs re-queued;
        jobs left running by a previous master whose agent never came back are re-queued too."""
        now = time.time()
        with self.lock:
            for agent in list(self.agents.values()):
                if agent.state not in ("lost", "stopped") and now - agent.last_seen > self.lease_seconds:
                    agent.state = "lost"
                    self._emit(f"agent {agent.name} lost: silent for {now - agent.last_seen:.1f}s")
                    self._requeue_lost(agent, keep=set(), reason=f"agent {agent.name} lost")
            if self.orphans_since and now - self.orphans_since > self.lease_seconds:
                self.orphans_since = 0.0
                held: dict[str, set[int]] = {}
                for job in self.jobs.values():
                    if job.state == RUNNING:
                        owner = self.agents.get(job.agent or "")
                        if owner is None or job.id not in owner.running:
                            held.setdefault(job.agent or "?", set()).add(job.id)
                for name, ids in held.items():
                    ghost = AgentRecord(name, "", {}, now)
                    ghost.running = ids
                    self._requeue_lost(ghost, keep=set(), reason=f"agent {name} did not come back")

    # ---- console ------------------------------------------------------------------------

    CONSOLE_WINDOW = 1000  # rows of one view in one snapshot
    CONSOLE_WALK = 5000  # deeper than this into the queue, a view is computed from a copy, outside the lock
    CONSOLE_CHANGED = 5000  # more changed ids than this since a console's last look: "many" (None)
    CONSOLE_RATE_SECONDS = 60
    # The console's running tally of final states and the change seq it is good to; set on first use
    # (class-level defaults, so __init__ stays as it is).
    _console_final: dict[str, int] | None = None
    _console_seq = 0

    def snapshot(self, since: int = 0, views: dict | None = None) -> dict:
        """What a console draws, cheaply enough to ask a few times a second with 100,000 jobs about.

        Always: `seq`, the master's `now`, counts by state, agents, and finished jobs per second over
        the last minute. When something changed since `since` (the `seq` of the caller's last look):
        the ids that changed (`changed`, None when too many or too old to know), and the rows of each
        view in `views` ({"dispatched"|"finished": {"offset", "limit", "match", "invert"}}), a window
        of at most CONSOLE_WINDOW rows with the view's `total`, so no caller ever holds every job.
        """
        if not isinstance(views, dict):
            views = {}
        asked = {name: self._console_view(name, views[name]) for name in ("dispatched", "finished") if name in views}
        now = time.time()
        with self.lock:
            seq = self.seq
            fresh = not _is_int(since) or since <= 0 or since != seq  # since 0: "I have nothing yet"
            changed = self._console_changed(since) if fresh else []
            counts = self._console_counts()
            agents = sorted((a.wire(now) for a in self.agents.values()), key=lambda a: a["name"])
            rate = self._console_rate(now)
            picked = {name: self._console_pick(name, *view) for name, view in asked.items()} if fresh else {}
        out: dict[str, Any] = {
            "seq": seq, "now": now, "counts": counts, "agents": agents, "rate": rate,
            "slots": sum(a["slots"] for a in agents if a["state"] != "lost"),
            "busy": sum(a["busy"] for a in agents), "changed": changed,
        }
        # The expensive halves run here, outside the lock, so dispatch never waits on a console.
        for name, pick in picked.items():
            out[name] = pick()
        return out

    def _console_changed(self, since: Any) -> list[int] | None:
        """Job ids changed after `since`, newest change last; None when the window lost them or they are many."""
        changes = self.changes
        if not _is_int(since) or since <= 0 or since > self.seq or not changes or changes[0][0] > since + 1:
            return None  # nothing to compare with, a seq of an earlier master, or the log moved on
        ids: dict[int, None] = {}
        for seq, job_id in reversed(changes):
            if seq <= since:
                break
            ids[job_id] = None
            if len(ids) > self.CONSOLE_CHANGED:
                return None
        return list(reversed(ids))

    def _console_counts(self) -> dict[str, int]:
        """Counts by state without a table scan: active ones from memory, final ones kept up to date
        from the change log (a job becomes final once, then never changes again)."""
        final, cursor = self._console_final, self._console_seq
        changes = self.changes
        if final is None or (changes and changes[0][0] > cursor + 1):
            # First look, or the change log moved on past us: one GROUP BY, under the lock so no
            # finish can slip between the count and the cursor.
            final = {s: n for s, n in self.journal.counts().items() if s in FINAL}
        else:
            seen: set[int] = set()
            for seq, job_id in reversed(changes):
                if seq <= cursor:
                    break
                if job_id in seen:
                    continue
                seen.add(job_id)
                state = self.recent_final.get(job_id) if job_id not in self.jobs else None
                if state is not None:
                    final[state] = final.get(state, 0) + 1
        self._console_final, self._console_seq = final, self.seq
        running = self._console_running()
        counts = {state.value: 0 for state in JobState}
        counts.update(final)
        counts[RUNNING] = len(running)
        counts[QUEUED] = len(self.jobs) - len(running)
        return counts

    def _console_running(self) -> list[int]:
        """Ids of running jobs: the agents hold them, except orphans a restarted master has not settled yet."""
        if self.orphans_since:
            return sorted(j.id for j in list(self.jobs.values()) if j.state == RUNNING)
        return sorted(j for a in self.agents.values() for j in a.running)

    def _console_rate(self, now: float) -> list[int]:
        """Jobs finished in each of the last CONSOLE_RATE_SECONDS whole seconds, oldest first."""
        import bisect

        times = self.finished_times
        end = math.floor(now)
        edges = [bisect.bisect_left(times, end - k) for k in range(self.CONSOLE_RATE_SECONDS, -1, -1)]
        return [b - a for a, b in zip(edges, edges[1:])]

    def _console_view(self, name: str, view: Any) -> tuple[int, int, str, bool]:
        """(offset, limit, lower-case needle, invert) of a view, or a CorralError saying what is wrong."""
        if not isinstance(view, dict):
            raise CorralError(f"bad {name} view {view!r}", "a dict of offset, limit, match, invert")
        offset, limit, match = view.get("offset", 0), view.get("limit", 100), view.get("match") or ""
        if not _is_int(offset) or offset < 0 or not _is_int(limit) or limit < 1 or not isinstance(match, str):
            raise CorralError(f"bad {name} view {view!r}", "offset >= 0, limit >= 1, match a string")
        return offset, min(limit, self.CONSOLE_WINDOW), match.lower(), bool(view.get("invert"))

    def _console_pick(self, name: str, offset: int, limit: int, needle: str, invert: bool) -> Callable[[], dict]:
        """Under the lock, take what a view needs from memory; return the rest of the work as a callable
        to run after the lock is released."""
        if name == "dispatched":
            return self._console_dispatched(offset, limit, needle, invert)
        ring = None
        from itertools import islice

        if not needle and offset + limit <= len(self.recent_final):
            # The newest finished are the tail of recent_final, in the order they finished.
            ring = [job_id for job_id, _ in islice(reversed(self.recent_final.items()), offset + limit)]
            ring = ring[offset:]
        total = sum((self._console_final or {}).values())
        return lambda: self._console_finished(offset, limit, needle, invert, ring, total)

    def _console_dispatched(self, offset: int, limit: int, needle: str, invert: bool) -> Callable[[], dict]:
        running = self._console_running()
        jobs = self.jobs
        if not needle and offset + limit <= self.CONSOLE_WALK:
            # Running first, then the queue in dispatch order (highest priority, then oldest): walk the
            # heaps lazily, so the cost is the window's, not the queue's.
            ids = running[offset : offset + limit]
            skip = max(0, offset - len(running))
            if len(ids) < limit:
                ids += self._console_queued(skip, limit - len(ids))
            rows = [self._console_row(jobs[j]) for j in ids if j in jobs]
            total = len(jobs)
            return lambda: {"offset": offset, "total": total, "rows": rows}
        everyone = list(jobs.values())
        running_set = set(running)

        def rest() -> dict:
            # A copy of the job list, read outside the lock: a row may be a moment stale, never torn
            # enough to matter for a screen redrawn four times a second.
            hits = [job for job in everyone if (needle in self._console_haystack(job)) != invert] if needle else everyone
            hits.sort(key=lambda job: (job.id not in running_set, -job.priority if job.id not in running_set else 0, job.id))
            return {"offset": offset, "total": len(hits),
                    "rows": [self._console_row(job) for job in hits[offset : offset + limit]]}

        return rest

    def _console_queued(self, skip: int, count: int) -> list[int]:
        """`count` queued ids after the first `skip`, in dispatch order, without popping the heaps."""
        def walk(heap: list[tuple[int, int]]) -> Iterable[tuple[int, int]]:
            frontier = [(heap[0], 0)]
            while frontier:
                item, i = heapq.heappop(frontier)
                yield item
                for child in (2 * i + 1, 2 * i + 2):
                    if child < len(heap):
                        heapq.heappush(frontier, (heap[child], child))

        out: list[int] = []
        seen: set[int] = set()
        jobs = self.jobs
        for _, job_id in heapq.merge(*(walk(h) for h in self.queues.values() if h)):
            job = jobs.get(job_id)
            if job is None or job.state != QUEUED or job_id in seen:
                continue  # a stale heap entry (cancelled, or dispatched and queued again)
            seen.add(job_id)
            if skip:
                skip -= 1
                continue
            out.append(job_id)
            if len(out) >= count:
                break
        return out

    @staticmethod
    def _console_row(job: Job) -> tuple:
        """(id, what, state, priority, agent, attempt, started, submitted, tags) of an active job."""
        what = job.name or job.command or f"{job.func}()"
        return (job.id, what, job.state, job.priority, job.agent, job.attempts, job.started, job.submitted,
                ",".join(sorted(job.tags)))

    def _console_finished(self, offset: int, limit: int, needle: str, invert: bool, ring: list[int] | None,
                          total: int) -> dict:
        """The finished window from the journal's reader connection (never under the scheduler lock)."""
        columns = "id, name, command, func, state, agent, exit_code, started, ended, error, attempts"
        final = tuple(sorted(FINAL))
        marks = ",".join("?" * len(final))
        journal = self.journal
        with journal.read_lock:
            if ring is not None:
                found = {row[0]: row for row in journal.reader.execute(
                    f"SELECT {columns} FROM jobs WHERE id IN ({','.join('?' * len(ring))})", ring)} if ring else {}
                rows = [found[j] for j in ring if j in found]
            else:
                where = f"state IN ({marks})"
                params: list[Any] = list(final)
                if needle:
                    hay = ("(CAST(id AS TEXT) || char(31) || name || char(31) || COALESCE(command, '') || char(31)"
                           " || COALESCE(func, '') || char(31) || state || char(31) || COALESCE(agent, '')"
                           " || char(31) || COALESCE(error, ''))")
                    escaped = needle.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
                    where += f" AND {'NOT ' if invert else ''}{hay} LIKE ? ESCAPE '\\'"
                    params.append(f"%{escaped}%")
                    total = journal.reader.execute(f"SELECT COUNT(*) FROM jobs WHERE {where}", params).fetchone()[0]
                rows = journal.reader.execute(
                    f"SELECT {columns} FROM jobs WHERE {where} ORDER BY ended DESC, id DESC LIMIT ? OFFSET ?",
                    (*params, limit, offset)).fetchall()
        out = []
        for (job_id, name, command, func, state, agent, exit_code, started, ended, error, attempts) in rows:
            what = name or command or f"{func}()"
            out.append((job_id, what, state, agent, exit_code, started, ended, error or "", attempts))
        return {"offset": offset, "total": total, "rows": out}

    @staticmethod
    def _console_haystack(job: Job) -> str:
        """What a console filter matches in an active job: id, name, command, state, agent, tags (lower case)."""
        return "\x1f".join((str(job.id), job.name or "", job.command or "", job.func or "", job.state,
                            job.agent or "", ",".join(sorted(job.tags)))).lower()
