"""What the master keeps per job and per agent (Job, AgentRecord) and the states they move through."""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Any, Callable, Optional, Tuple

from corral.agent.protocol import FINAL_STATES, RELEASED, JobState

# Job states as the plain strings the journal and the wire carry (JobState's values): a job's
# state is compared and written many times per job, and an Enum member would pickle with its class.
QUEUED, RUNNING, HELD = JobState.QUEUED.value, JobState.RUNNING.value, JobState.HELD.value
ASSIGNED = JobState.ASSIGNED.value
ON_AGENT = frozenset({ASSIGNED, RUNNING})  # an agent holds the job: taken (assigned), or started (running)
DONE, FAILED, TIMEOUT = JobState.DONE.value, JobState.FAILED.value, JobState.TIMEOUT.value
CANCELLED, LOST = JobState.CANCELLED.value, JobState.LOST.value
FINAL = frozenset(s.value for s in FINAL_STATES)
RESULT_STATES = frozenset({DONE, FAILED, TIMEOUT, CANCELLED, RELEASED})  # what an agent may report
# Attempt states the master writes itself (never a job's state, never reported by an agent): an attempt
# that ended without a result, because its agent was lost (LOST) or stopped it on purpose (INTERRUPTED).
INTERRUPTED = "interrupted"
UNFINISHED = frozenset({LOST, INTERRUPTED})

# The wire form of one attempt, in agent.protocol.Task's field order:
# (job_id, attempt, command, func, payload, env, cwd, timeout, code).
TaskTuple = Tuple[int, int, Optional[str], Optional[str], Optional[bytes], "dict[str, str]", Optional[str],
                  Optional[float], Optional[str]]


@dataclass(frozen=True)
class Retention:
    """Which finished jobs the journal keeps (`corral master --keep-finished DAYS --keep-finished-count N`):
    those that ended within `days`, and of them at most the newest `count`; None keeps everything."""

    days: Optional[float] = None
    count: Optional[int] = None

    @property
    def active(self) -> bool:
        return self.days is not None or self.count is not None


class AgentState(str, enum.Enum):
    """Where an agent stands with the master (its `.value` is what `corral agents` shows)."""

    UP = "up"
    DRAINING = "draining"  # connected, but given no more work (it is being stopped over SSH)
    LOST = "lost"  # silent past its lease; it may come back
    STOPPED = "stopped"  # stopped on purpose

    @property
    def gone(self) -> bool:
        """Lost or stopped: its name may be taken by another agent, its jobs are not its any more."""
        return self is AgentState.LOST or self is AgentState.STOPPED


class Job:
    """A job the master is still responsible for (queued, running or held)."""

    __slots__ = (
        "id", "name", "command", "func", "payload", "env", "cwd", "priority", "timeout", "retries",
        "tags", "state", "attempts", "failures", "lost", "agent", "submitted", "started", "code",
    )

    def __init__(self, id: int, name: str, command: str | None, func: str | None, payload: bytes | None,
                 env: dict[str, str], cwd: str | None, priority: int, timeout: float | None, retries: int,
                 tags: frozenset[str], state: str = QUEUED, attempts: int = 0, failures: int = 0, lost: int = 0,
                 agent: str | None = None, submitted: float = 0.0, started: float | None = None,
                 code: str | None = None) -> None:
        self.id, self.name, self.command, self.func, self.payload = id, name, command, func, payload
        self.env, self.cwd, self.priority, self.timeout, self.retries = env, cwd, priority, timeout, retries
        self.tags, self.state, self.attempts, self.failures, self.lost = tags, state, attempts, failures, lost
        self.agent, self.submitted, self.started = agent, submitted, started
        self.code = code  # the shipped code bundle's digest (agent/codecache.py), or None

    def task(self) -> TaskTuple:
        """The wire form of this job's current attempt (agent.protocol.Task, as a plain tuple)."""
        return (self.id, self.attempts, self.command, self.func, self.payload, self.env, self.cwd, self.timeout,
                self.code)

    @property
    def what(self) -> str:
        """What the operator recognises it by: its name, else its command, else its function."""
        return self.name or self.command or f"{self.func}()"


class AgentRecord:
    """An agent as the master sees it."""

    __slots__ = ("name", "session", "info", "tags", "slots", "running", "began", "stale", "dispatched", "cancel",
                 "done", "failed", "times_lost", "last_seen", "_heard", "on_heard", "registered", "state", "credit")

    @property
    def heard(self) -> float:
        return self._heard

    @heard.setter
    def heard(self, value: float) -> None:
        self._heard = value
        if self.on_heard is not None:
            self.on_heard(self)

    def __init__(self, name: str, session: str, info: dict[str, Any], now: float, heard: float = 0.0) -> None:
        self.name = name
        self.session = session
        self.info = info  # agent.protocol.AgentInfo's wire dict, as the agent sent it
        self.tags = frozenset(info.get("tags") or ())
        self.slots = int(info.get("slots") or 1)
        # The attempts this session holds, as job id -> attempt: the current attempt of each job running here
        # (assigned or running).
        self.running: dict[int, int] = {}
        self.began: set[int] = set()  # the job ids of those it has started (running); pruned when read
        # Attempts this session was given that were taken from it since (its lease ran out): it may still
        # hand one in (a late success wins); any other result it sends is refused.
        self.stale: set[tuple[int, int]] = set()
        self.dispatched = 0  # tasks handed to this session, to compare with the count its reports carry
        self.cancel: set[tuple[int, int]] = set()  # (job id, attempt) pairs to kill
        self.done = 0
        self.failed = 0
        self.times_lost = 0  # how often its lease ran out (kept across its registrations, as done and failed)
        self.last_seen = now  # wall clock, for people (`corral agents`)
        # Called with this record each time `heard` is set (the scheduler's lease index), once admitted.
        self.on_heard: Callable[[AgentRecord], None] | None = None
        self._heard = heard  # monotonic: when the master last heard from it; leases are judged on this
        self.registered = now
        self.state = AgentState.UP
        self.credit = 0  # how many more jobs the agent said it would take (its last take/report)

    def busy(self) -> int:
        """How many of its jobs run (started), not counting those only assigned to it."""
        if len(self.began) > len(self.running) or not self.began <= self.running.keys():
            self.began &= self.running.keys()  # jobs that left it (finished, re-queued) by any path
        return len(self.began)

    def wire(self, now: float, monotonic: float) -> dict[str, Any]:
        """What clients see of it (`corral agents --json`): plain data only."""
        return {
            "name": self.name,
            "host": self.info.get("host", ""),
            "pid": self.info.get("pid", 0),
            "state": self.state.value,
            "slots": self.slots,
            "busy": self.busy(),  # slots running a job; `assigned`: jobs it holds and has not started
            "assigned": len(self.running) - self.busy(),
            "done": self.done,
            "failed": self.failed,
            "times_lost": self.times_lost,
            "tags": sorted(self.tags),
            "python": self.info.get("python", ""),
            "started_by": self.info.get("started_by", "manual"),
            # How it contains its jobs' processes (agent/contain.py), as the agent said: text, at most 300 characters.
            "containment": str(self.info.get("containment") or "unknown")[:300],
            "last_seen": self.last_seen,
            "heartbeat_age": max(0.0, monotonic - self.heard),
            "registered": self.registered,
        }
