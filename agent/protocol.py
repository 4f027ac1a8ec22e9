"""What crosses the wire between master, agents and clients: plain-data records and the manager's names."""

from __future__ import annotations

import enum
import struct
from dataclasses import dataclass, field, fields
from typing import Any, Dict, Iterable, List, NamedTuple, Optional, Tuple

# Bump when a wire record changes shape or meaning; master and agent compare it at register().
# 2: shipped code (JobSpec.code, Task.code, CODE_TYPEID), chunked calls (CHUNK_CALL), a failed callable's value.
# 3: report(..., began): which held jobs have started (a job dispatched is `assigned` until then).
# 3: JobResult.note (what the agent noted of the attempt: processes killed at its end).
# 3 (issue 9): a job's output crosses as bytes (JobResult.stdout/stderr, live tails) with how many bytes each
#   stream produced in all (JobResult.stdout_total/stderr_total).
# 3 (issue 9): attempts are the unit: register() and report() say which (job id, attempt) pairs the agent
#   holds, a report says how many tasks the agent has received this session, cancels name the attempt.
# 4 (issue 10): a report's results, starts and held attempts travel packed (pack_results, pack_starts,
#   pack_attempts), and a Client's submit() its specs (pack_specs): the master's bounded decoder walks
#   a few opcodes per record, not ~18. Plain lists are still read (a protocol-3 agent is still served).
PROTOCOL_VERSION = 4
PROTOCOLS_SERVED = frozenset({3, 4})

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

# ---- a submission's specs, packed (what Client.submit sends; the master reads plain dicts too) --------
# Each spec: SPEC_HEAD (its numbers, which optional fields follow, how many env pairs and tags), then in
# one flat list: its command or func, the optional fields flagged, each env key and value, each tag.
SPEC_HEAD = struct.Struct("<qdqBII")  # priority, timeout, retries, flags, env pairs, tags
SPEC_FUNC, SPEC_PAYLOAD, SPEC_NAME, SPEC_CWD, SPEC_TIMEOUT, SPEC_CODE = 1, 2, 4, 8, 16, 32
_SPEC_OPTIONAL = ((SPEC_PAYLOAD, "payload"), (SPEC_NAME, "name"), (SPEC_CWD, "cwd"), (SPEC_CODE, "code"))
_SPEC_ABSENT = {"payload": None, "name": "", "cwd": None, "code": None}  # what a field left out means


def pack_specs(specs: Iterable[Any]) -> Tuple[bytes, List[Any]]:
    """Checked specs (JobSpec's fields, checked by the master's rules first: the numbers must fit) as the
    plain pair submit() takes: SPEC_HEAD per spec, concatenated, and their fields in one list."""
    heads = bytearray()
    out: List[Any] = []
    for spec in specs:
        flags = (SPEC_FUNC if spec.command is None else 0) | (SPEC_TIMEOUT if spec.timeout is not None else 0)
        out.append(spec.command if spec.command is not None else spec.func)
        for flag, name in _SPEC_OPTIONAL:
            value = getattr(spec, name)
            if value != _SPEC_ABSENT[name]:
                flags |= flag
                out.append(value)
        for key, value in spec.env.items():
            out += (key, value)
        out += spec.tags
        heads += SPEC_HEAD.pack(spec.priority, spec.timeout or 0.0, spec.retries, flags, len(spec.env), len(spec.tags))
    return bytes(heads), out


def unpack_specs(packed: Any, limit: int) -> List[Dict[str, Any]]:
    """The plain spec dicts a packed submission holds, for the master's rules to check as any others;
    ValueError (one line) if it is not one pack_specs() could have made, or holds more than `limit`
    specs (said before any is built)."""
    if type(packed) is not tuple or len(packed) != 2 or type(packed[0]) is not bytes or type(packed[1]) is not list:
        raise ValueError("packed specs must be (heads as bytes, fields as a list)")
    heads, fields_in = packed
    if len(heads) % SPEC_HEAD.size:
        raise ValueError(f"{len(heads)} bytes of heads is not a whole number of specs")
    if len(heads) // SPEC_HEAD.size > limit:
        raise ValueError(f"{len(heads) // SPEC_HEAD.size} jobs in one call; the limit is {limit}")
    specs: List[Dict[str, Any]] = []
    at, end = 0, len(fields_in)
    for priority, timeout, retries, flags, pairs, tags in SPEC_HEAD.iter_unpack(heads):
        if flags > 63 or at >= end:
            raise ValueError(f"spec {len(specs) + 1}: a bad head, or no fields for it")
        spec: Dict[str, Any] = {"func" if flags & SPEC_FUNC else "command": fields_in[at],
                                "priority": priority, "retries": retries}
        at += 1
        if flags & SPEC_TIMEOUT:
            spec["timeout"] = timeout
        for flag, name in _SPEC_OPTIONAL:
            if flags & flag:
                if at >= end:
                    raise ValueError(f"spec {len(specs) + 1}: its head counts fields the submission does not hold")
                spec[name] = fields_in[at]
                at += 1
        if pairs or tags:
            if at + 2 * pairs + tags > end:
                raise ValueError(f"spec {len(specs) + 1}: its head counts fields the submission does not hold")
            if pairs:
                items = fields_in[at:at + 2 * pairs]
                try:
                    env = dict(zip(items[::2], items[1::2]))
                except TypeError:  # a key that cannot be one (a list): the rules would refuse it anyway
                    raise ValueError(f"spec {len(specs) + 1}: an env key that is not text") from None
                if len(env) != pairs:
                    raise ValueError(f"spec {len(specs) + 1}: an env key given twice")
                spec["env"] = env
                at += 2 * pairs
            if tags:
                spec["tags"] = fields_in[at:at + tags]
                at += tags
        specs.append(spec)
    if at != end:
        raise ValueError(f"{end - at} fields no spec head counts")
    return specs


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


# ---- a report's records, packed (protocol 4) -------------------------------------------------------
# The master decodes every message with a bounded scan written in Python, at a cost per pickle opcode
# (console/master/decode.py): a result as a plain tuple is ~18 opcodes, so a report carries its results
# as one bytes of fixed-size heads (struct, read back in C) and one flat list of the fields that vary
# in size, each result's head saying how many of them are its own (its trailing empty ones left out).
RESULT_STATE_CODES = ("done", "failed", "timeout", "cancelled", RELEASED)  # a head's state: an index here
# job id, attempt, exit code, started, ended, stdout total, stderr total, state index, has an exit code,
# how many of the variable fields follow.
RESULT_HEAD = struct.Struct("<qqqddqqBBB")
# The fields that vary in size (value, stdout, stderr, error, traceback, note), in order: the value
# each takes when left out.
RESULT_VARIABLE_DEFAULTS = (None, b"", b"", "", "", "")
_STATE_INDEX = {state: i for i, state in enumerate(RESULT_STATE_CODES)}
ATTEMPT_PAIR = struct.Struct("<qq")  # job id, attempt
# What one report may carry, packed or not (the master refuses more; an agent with more pending sends
# them in turns): results, and attempts it says it holds (register() too). A packed record is a few
# bytes on the wire and a few hundred in memory once read: the caps bound what one message can cost.
REPORT_RESULTS = 10_000
MAX_REPORT_RESULTS = 100_000
MAX_HELD = 1_000_000
START_TRIPLE = struct.Struct("<qqd")  # job id, attempt, when it started


def pack_results(results: Iterable[JobResult]) -> Tuple[bytes, List[Any]]:
    """A report's results on the wire (protocol 4), a plain pair (a class would not cross): RESULT_HEAD
    per result, concatenated, and their variable fields, in one list."""
    heads = bytearray()
    fields_out: List[Any] = []
    state_index = _STATE_INDEX
    for r in results:
        variable = [r.value, r.stdout, r.stderr, r.error, r.traceback, r.note]
        while variable and variable[-1] == RESULT_VARIABLE_DEFAULTS[len(variable) - 1]:
            variable.pop()
        heads += RESULT_HEAD.pack(r.job_id, r.attempt, r.exit_code or 0, r.started, r.ended, r.stdout_total,
                                  r.stderr_total, state_index[r.state], r.exit_code is not None, len(variable))
        fields_out += variable
    return bytes(heads), fields_out


def pack_attempts(pairs: Iterable[Tuple[int, int]]) -> bytes:
    return b"".join(ATTEMPT_PAIR.pack(job_id, attempt) for job_id, attempt in pairs)


def pack_starts(starts: Iterable[Tuple[int, int, float]]) -> bytes:
    return b"".join(START_TRIPLE.pack(job_id, attempt, when) for job_id, attempt, when in starts)


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
