"""What crosses the wire between master, agents and clients: plain-data records and the manager's names."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field, fields
from typing import Any, Dict, NamedTuple, Optional, Tuple

# Bump when a wire record changes shape or meaning; master and agent compare it at register().
# 2: shipped code (JobSpec.code, Task.code, CODE_TYPEID), chunked calls (CHUNK_CALL), a failed callable's value.
# 3: report(..., began): which held jobs have started (a job dispatched is `assigned` until then).
# 3: JobResult.note (what the agent noted of the attempt: processes killed at its end).
# 3 (issue 9): a job's output crosses as bytes (JobResult.stdout/stderr, live tails) with how many bytes each
#   stream produced in all (JobResult.stdout_total/stderr_total).
# 3 (issue 9): attempts are the unit: register() and report() say which (job id, attempt) pairs the agent
#   holds, a report says how many tasks the agent has received this session, cancels name the attempt.
PROTOCOL_VERSION = 3

# The one name registered on the master's BaseManager; its methods are the API.
SCHEDULER_TYPEID = "get_scheduler"

# Output kept per stream per attempt (the tail), and the cap on one job's pickled payload.
OUTPUT_TAIL_BYTES = 64 * 1024
MAX_PAYLOAD_BYTES = 1024 * 1024

# ---- shipped code (see agent/codecache.py, console/ship.py, console/master/codestore.py) --------------
# A job whose `code` names a bundle (the sha256 hex digest of its files) runs with that bundle at the
# front of its sys.path (and of PYTHONPATH for a shell job): the agent fetches it from the master once,
# checks its hash and caches it on its host. The master serves bundles under this name, beside the scheduler.
CODE_TYPEID = "get_code_store"
# What one bundle may hold: its zip as sent, its files, and their size unpacked.
MAX_BUNDLE_BYTES = 8 * 1024 * 1024
MAX_BUNDLE_FILES = 2000
MAX_BUNDLE_UNPACKED = 32 * 1024 * 1024

# A callable job's payload is the pickle of (args, kwargs), or of (CHUNK_CALL, [args, ...]): a chunk of
# calls (Pool.map and friends) whose value is the list of func(*args) for each. A failed callable's
# value is the pickle of (traceback text, pickle of the exception or None): the caller re-raises it.
CHUNK_CALL = "corral:chunk"


class JobState(str, enum.Enum):
    QUEUED = "queued"
    RUNNING = "running"  # its process (or call) has started
    DONE = "done"
    FAILED = "failed"
    TIMEOUT = "timeout"
    CANCELLED = "cancelled"
    HELD = "held"
    LOST = "lost"
    ASSIGNED = "assigned"  # an agent holds it and has not started it yet (last: the order `corral status` lists)

    @property
    def final(self) -> bool:
        return self in FINAL_STATES


# Not a job state but a result's: an attempt the agent hands back unstarted (draining); the job queues again.
RELEASED = "released"

FINAL_STATES = frozenset(
    {JobState.DONE, JobState.FAILED, JobState.TIMEOUT, JobState.CANCELLED, JobState.LOST}
)

# A result's state, never a job's: the agent hands back an attempt it never started (draining, or
# more work than it can start soon), and the master queues the job again.
RELEASED = "released"


@dataclass(frozen=True)
class JobSpec:
    """What a submitter asks for. Exactly one of `command` (shell) or `func` (module:function)."""

    command: Optional[str] = None
    func: Optional[str] = None
    # pickle of (args, kwargs) for `func`: opaque to the master, only agents unpickle it.
    payload: Optional[bytes] = None
    name: str = ""
    env: Dict[str, str] = field(default_factory=dict)
    cwd: Optional[str] = None
    priority: int = 0
    timeout: Optional[float] = None
    retries: int = 0
    tags: Tuple[str, ...] = ()
    # The code bundle shipped with the job (its sha256 hex digest; see agent/codecache.py), or None.
    code: Optional[str] = None

    def to_wire(self) -> Dict[str, Any]:
        """The plain dict that goes over the wire: only the fields not at their default (the master reads
        a missing one as its default), since every key is opcodes that the master's bounded decoder
        walks, per job of every submission (bench/pickle_boundary.py). A value of the wrong type is
        sent as it is, for the master to refuse."""
        wire: Dict[str, Any] = {}
        for name in _SPEC_FIELDS:
            value = getattr(self, name)
            if value.__class__ is not _SPEC_DEFAULTS[name].__class__ or value != _SPEC_DEFAULTS[name]:
                wire[name] = value
        if "env" in wire and isinstance(self.env, dict):
            wire["env"] = dict(self.env)
        if "tags" in wire and isinstance(self.tags, (tuple, list)):
            wire["tags"] = list(self.tags)
        return wire



_SPEC_FIELDS = tuple(f.name for f in fields(JobSpec))
_SPEC_DEFAULTS: Dict[str, Any] = {name: getattr(JobSpec(), name) for name in _SPEC_FIELDS}

class Attempt(NamedTuple):
    """One run of one job: what an agent holds, runs, reports and kills, and what the master hands out
    (a plain pair on the wire). A job sent again while an older attempt still runs is another Attempt."""

    job_id: int
    attempt: int


class Task(NamedTuple):
    """One attempt of one job, as the master hands it to an agent (a plain tuple on the wire)."""

    job_id: int
    attempt: int
    command: Optional[str]
    func: Optional[str]
    payload: Optional[bytes]
    env: Dict[str, str]
    cwd: Optional[str]
    timeout: Optional[float]
    code: Optional[str] = None  # the job's shipped code bundle (a sha256 hex digest), if any


class JobResult(NamedTuple):
    """How one attempt ended (a plain tuple on the wire). Errors travel as text, never as exceptions."""

    job_id: int
    attempt: int
    state: str
    exit_code: Optional[int] = None
    # pickle of a callable's return value: opaque to the master.
    value: Optional[bytes] = None
    # The last OUTPUT_TAIL_BYTES of each stream, as the job wrote them (any bytes, not only UTF-8).
    stdout: bytes = b""
    stderr: bytes = b""
    error: str = ""
    traceback: str = ""
    started: float = 0.0
    ended: float = 0.0
    # What the agent noted of the attempt beyond its outcome: processes it left running that were
    # killed at its end (agent/contain.py describe_killed); "" for nearly every attempt.
    note: str = ""
    # How many bytes each stream produced in all: more than len(stdout) means stdout is a tail.
    stdout_total: int = 0
    stderr_total: int = 0


@dataclass(frozen=True)
class AgentInfo:
    """Who an agent is, sent once at register()."""

    name: str
    host: str
    pid: int
    slots: int
    tags: Tuple[str, ...] = ()
    python: str = ""
    started_by: str = "manual"
    protocol: int = PROTOCOL_VERSION
    # Random per agent process: tells "the same agent reconnecting" from "another agent, same name".
    instance: str = ""
    # How it keeps a job's processes together to kill them at its end (agent/contain.py): "cgroup",
    # "subreaper" or "group", with why nothing stronger in brackets.
    containment: str = ""

    def to_wire(self) -> Dict[str, Any]:
        return {
            "name": self.name,
            "host": self.host,
            "pid": self.pid,
            "slots": self.slots,
            "tags": list(self.tags),
            "python": self.python,
            "started_by": self.started_by,
            "protocol": self.protocol,
            "instance": self.instance,
            "containment": self.containment,
        }


def output_text(data: bytes) -> str:
    """A job's output for display: decoded as UTF-8, anything else replaced (never an error)."""
    return data.decode("utf-8", errors="replace")
