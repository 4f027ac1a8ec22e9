"""Run jobs inside a pool worker: shell commands in their own process group, callables by name; never raises."""

from __future__ import annotations

import codecs
import contextlib
import importlib
import io
import os
import pickle
import selectors
import signal
import subprocess
import time
import traceback
from typing import IO, Any, Callable, Dict, FrozenSet, List, Optional, Tuple

from . import codecache, contain
from .protocol import CHUNK_CALL, OUTPUT_TAIL_BYTES, JobResult, JobState, Task

# Set by init_worker() in each pool worker process.
# The pipe to the agent carries tagged tuples (agent/pool.py reads them, in order):
#   ("worker", pid)                  a worker is up (the pool replaces dead ones by itself)
# Every job is named by its attempt, a (job id, attempt) pair: two attempts of one job may run here at once.
#   ("chunk", pid, attempts, t)      this worker starts a chunk of these attempts
#   ("pgid", attempt, pgid, t)       a shell job's process group, for cancel; its process started at t
#   ("start", attempt, t)            a callable job starts running at t (a shell job's start is its "pgid")
#   ("output", attempt, stdout, stderr)  a running shell job's latest output tails (bytes)
_events: Any = None
_events_lock: Any = None  # workers share the pipe; a message may exceed the size written atomically
_cancelled: Any = None  # shared int64 array: [0] is a version counter, [1:] a ring of (job id, attempt) pairs
_cancel_seen = -1
_cancel_ids: FrozenSet[Tuple[int, int]] = frozenset()
_current_job: Optional[Tuple[int, int]] = None  # the callable attempt running now, the only one a signal may interrupt
_functions: Dict[str, Callable[..., Any]] = {}
_containment = contain.Containment(contain.GROUP)  # the agent's, given to init_worker
MAX_FAILURE_BYTES = 2 * 1024 * 1024  # a failed call's pickled exception, at most (else the caller gets its text)
LIVE_SECONDS = 0.5  # how often a running shell job's output tails go to the agent (when they changed)


class JobInterrupted(BaseException):
    """Raised inside a running callable by a signal (BaseException so user code's `except Exception` can't eat it)."""

    def __init__(self, state: str) -> None:
        super().__init__(state)
        self.state = state


def init_worker(events: Any, events_lock: Any, cancelled: Any, agent_pid: int,
                containment: Optional[contain.Containment] = None) -> None:
    """Pool initializer: keep the agent's channels, contain what jobs will start, arm the interrupting signals."""
    global _events, _events_lock, _cancelled, _containment
    _events, _events_lock = events, events_lock
    if containment is not None:
        _containment = containment
        contain.enter_worker(containment)
    os.environ["CORRAL_AGENT_PID"] = str(agent_pid)  # jobs see which agent runs them
    _cancelled = cancelled
    # The agent handles ctrl-c and SIGTERM for the whole group; workers stop when it tells them.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGUSR1, _on_cancel_signal)
    signal.signal(signal.SIGALRM, _on_timeout_signal)
    _tell_agent(("worker", os.getpid()))  # how the agent learns which workers exist, to see them die


def _on_cancel_signal(signum: int, frame: Any) -> None:
    if _current_job is not None and _is_cancelled(_current_job):
        raise JobInterrupted(JobState.CANCELLED.value)


def _on_timeout_signal(signum: int, frame: Any) -> None:
    if _current_job is not None:
        raise JobInterrupted(JobState.TIMEOUT.value)


def _is_cancelled(key: Tuple[int, int]) -> bool:
    """Whether the agent asked to cancel this attempt; re-reads the shared ring only when it changed."""
    global _cancel_seen, _cancel_ids
    if _cancelled is None:
        return False
    version = _cancelled[0]
    if version != _cancel_seen:
        _cancel_seen = version
        ring = _cancelled[1:]
        _cancel_ids = frozenset(zip(ring[0::2], ring[1::2]))
    return key in _cancel_ids


def run_chunk(rows: List[Tuple[Any, ...]]) -> List[Tuple[Any, ...]]:
    """Pool task: run a chunk of tasks (packed Task tuples) one after another, return their results
    packed too. Tuples in, tuples out: a NamedTuple pickles with its class, a plain tuple is cheaper."""
    tasks = [Task._make(row) for row in rows]
    _tell_agent(("chunk", os.getpid(), [(task.job_id, task.attempt) for task in tasks], time.time()))
    return [tuple(_storable(execute(task))) for task in tasks]


def _storable(result: JobResult) -> JobResult:
    """A result whose texts the master can journal: a callable's error may hold lone surrogates (what
    surrogateescape makes of undecodable bytes), which UTF-8 cannot hold; they become "?". (Output is
    bytes: stored as it is.)"""
    if result.error.isascii() and result.traceback.isascii():
        return result
    return result._replace(error=_utf8(result.error), traceback=_utf8(result.traceback))


def _utf8(text: str) -> str:
    return text.encode("utf-8", "replace").decode("utf-8")


def _tell_agent(event: Tuple[Any, ...]) -> None:
    """Written synchronously (no feeder thread, unlike a multiprocessing.Queue): a job that kills
    its worker right after must not take the news of which worker ran it down with it."""
    if _events is not None:
        with _events_lock:
            _events.send(event)


def execute(task: Task) -> JobResult:
    """Run one task to its end; every failure becomes a JobResult, never an exception."""
    started = time.time()
    if _is_cancelled((task.job_id, task.attempt)):
        return JobResult(task.job_id, task.attempt, JobState.CANCELLED.value, started=started, ended=started)
    fault = env_fault(task.env) if task.env else ""
    if fault:  # refused whole, before any of it (or the job's code, or its cwd) is applied
        return JobResult(task.job_id, task.attempt, JobState.FAILED.value, error=f"refused: {fault}",
                         started=started, ended=time.time())
    try:
        if task.command is not None:
            return _run_shell(task, started)
        return _run_callable(task, started)
    except BaseException as exc:  # noqa: BLE001 - the contract is "never raises"
        return JobResult(
            task.job_id,
            task.attempt,
            JobState.FAILED.value,
            error=f"agent could not run the job: {type(exc).__name__}: {exc}",
            traceback=traceback.format_exc(),
            started=started,
            ended=time.time(),
        )


class _Tail:
    """Keeps the last OUTPUT_TAIL_BYTES of a stream, whatever its length, and how long it was in all."""

    def __init__(self) -> None:
        self.data = bytearray()
        self.total = 0

    def add(self, chunk: bytes) -> None:
        self.total += len(chunk)
        self.data += chunk
        if len(self.data) > 2 * OUTPUT_TAIL_BYTES:
            del self.data[:-OUTPUT_TAIL_BYTES]

    def tail(self) -> bytes:
        return bytes(self.data[-OUTPUT_TAIL_BYTES:])


class _TailBuffer(io.RawIOBase):
    """The binary end of a callable's sys.stdout/sys.stderr: what it writes (text or, through
    `.buffer`, bytes) lands in a _Tail."""

    def __init__(self) -> None:
        super().__init__()
        self.kept = _Tail()

    def writable(self) -> bool:
        return True

    def write(self, data: Any) -> int:
        chunk = bytes(data)
        self.kept.add(chunk)
        return len(chunk)


def _output_errors(exc: UnicodeError) -> Tuple[bytes, int]:
    """Encoding a callable's text output: what surrogateescape made of undecodable bytes becomes
    those bytes again; any other lone surrogate becomes "?" (a print never fails over it)."""
    if not isinstance(exc, UnicodeEncodeError):
        raise exc
    bad = exc.object[exc.start:exc.end]
    return bytes(ord(c) - 0xDC00 if 0xDC80 <= ord(c) <= 0xDCFF else 0x3F for c in bad), exc.end


codecs.register_error("corral.output", _output_errors)


def _capture() -> io.TextIOWrapper:
    """A text stream for a callable's prints, kept as bytes (UTF-8), its tail only."""
    return io.TextIOWrapper(_TailBuffer(), encoding="utf-8", errors="corral.output",  # type: ignore[arg-type]
                            write_through=True, line_buffering=False)


def kill_group(pgid: int) -> None:
    """SIGKILL a whole process group (a shell job and all it started); gone already is fine."""
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


# One piece (~60 lines): environment, containment box, spawn, wait with the timeout, and the kill and
# clean-up that must run on every path out, in one try/finally; split, the finally would lose sight of what
# the try started.
def _run_shell(task: Task, started: float) -> JobResult:
    env = dict(os.environ)
    env.update(task.env)
    env["CORRAL_JOB_ID"] = str(task.job_id)
    env["CORRAL_ATTEMPT"] = str(task.attempt)
    env = codecache.shell_env(env, task.code)
    box = contain.JobBox(_containment, task.job_id, task.attempt, shell=True)
    try:
        proc = box.spawn(lambda: subprocess.Popen(
            ["/bin/sh", "-c", task.command or ""],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=env,
            cwd=task.cwd or None,
            # Its own session and process group: the agent's cancel kills the group; what leaves
            # it (setsid, set -m, timeout, daemons) is the box's to find and kill (agent/contain.py).
            start_new_session=True,
        ))
    except OSError as exc:
        box.end()
        return JobResult(
            task.job_id,
            task.attempt,
            JobState.FAILED.value,
            error=f"cannot start /bin/sh: {exc}",
            started=started,
            ended=time.time(),
        )
    _tell_agent(("pgid", (task.job_id, task.attempt), proc.pid, time.time()))
    deadline = started + task.timeout if task.timeout else None
    try:
        timed_out, stdout, stderr = _pump(proc, deadline, (task.job_id, task.attempt), box)
        returncode = proc.wait()
    finally:
        killed = box.end()  # whatever ended it: nothing the job started outlives it
    ended = time.time()
    what = "process group killed" if _containment.kind == contain.GROUP else "all its processes killed"
    if timed_out:
        state, error = JobState.TIMEOUT.value, f"timed out after {task.timeout:g}s; {what}"
    elif _is_cancelled((task.job_id, task.attempt)):
        state, error = JobState.CANCELLED.value, f"cancelled; {what}"
    elif returncode == 0:
        state, error = JobState.DONE.value, ""
    elif returncode < 0:
        state, error = JobState.FAILED.value, f"killed by signal {-returncode}"
    else:
        state, error = JobState.FAILED.value, f"exit code {returncode}"
    return JobResult(
        task.job_id,
        task.attempt,
        state,
        exit_code=returncode,
        stdout=stdout.tail(),
        stderr=stderr.tail(),
        stdout_total=stdout.total,
        stderr_total=stderr.total,
        error=error,
        started=started,
        ended=ended,
        note=_leftovers_note(state, killed),
    )


def _leftovers_note(state: str, killed: List[contain.Killed]) -> str:
    """At a normal end (done or failed), the processes it left running that were killed; a timeout
    or cancel kills all of the job by design, so it says so in its error instead."""
    if state in (JobState.DONE.value, JobState.FAILED.value):
        return contain.describe_killed(killed)
    return ""


def _pump(proc: "subprocess.Popen[bytes]", deadline: Optional[float], attempt: Tuple[int, int],
          box: contain.JobBox) -> Tuple[bool, _Tail, _Tail]:
    """Read the process's output until it ends or the deadline passes: (timed out, stdout, stderr).
    While it runs, the tails go to the agent every LIVE_SECONDS when they changed (live output).

    When the shell itself exits, whatever it left running (a daemon, `cmd &`, in its group or out of
    it) is killed: those would otherwise hold the pipes open and outlive the job.
    """
    assert proc.stdout is not None and proc.stderr is not None  # both are pipes (_run_shell)
    streams: List[IO[bytes]] = [proc.stdout, proc.stderr]
    out, err = _Tail(), _Tail()
    selector = selectors.DefaultSelector()
    selector.register(proc.stdout, selectors.EVENT_READ, out)
    selector.register(proc.stderr, selectors.EVENT_READ, err)
    timed_out = False
    drain_until: Optional[float] = None
    next_live, changed = time.time() + LIVE_SECONDS, False
    try:
        while selector.get_map():
            now = time.time()
            if changed and now >= next_live:
                _tell_agent(("output", attempt, out.tail(), err.tail()))
                next_live, changed = now + LIVE_SECONDS, False
            if drain_until is not None and now >= drain_until:
                break
            if deadline is not None and now >= deadline and not timed_out:
                timed_out = True
                kill_group(proc.pid)
                box.kill()
                drain_until = now + 0.5
            wait = 0.1
            if deadline is not None and not timed_out:
                wait = min(wait, max(0.0, deadline - now))
            for key, _ in selector.select(wait):
                chunk = os.read(key.fd, 65536)
                if chunk:
                    key.data.add(chunk)
                    changed = True
                else:
                    selector.unregister(key.fileobj)
            if drain_until is None and proc.poll() is not None:
                # The shell is gone; all it left must go too (named first: the record says what), then
                # read what is left.
                box.kill()
                kill_group(proc.pid)
                drain_until = time.time() + 0.5
        if proc.poll() is None:
            # Pipes closed but the shell still runs (it closed its own stdout): wait for it.
            remaining = None if deadline is None else max(0.0, deadline - time.time())
            try:
                proc.wait(remaining)
            except subprocess.TimeoutExpired:
                timed_out = True
        kill_group(proc.pid)
    finally:
        selector.close()
        for stream in streams:
            stream.close()
    return timed_out, out, err


def _resolve(name: str) -> Callable[..., Any]:
    """A job's callable by its "module:qualified.name" (imported once per worker)."""
    found = _functions.get(name)
    if found is None:
        module_name, _, attr = name.partition(":")
        target: Any = importlib.import_module(module_name)
        for part in attr.split("."):
            target = getattr(target, part)
        if not callable(target):
            raise TypeError(f"{name} is not callable")
        found = _functions[name] = target
    return found


# One piece (~70 lines) for the same reason as _run_shell: code path and env applied, the call, and the
# restore of the worker's state (env, sys.path, containment) in the finally that covers every outcome.
def _run_callable(task: Task, started: float) -> JobResult:
    global _current_job
    name = task.func or ""
    try:
        if codecache.enter(task):  # its shipped code and cwd lead sys.path; names found before may differ now
            _functions.clear()
        func = _resolve(name)
    except Exception as exc:  # noqa: BLE001 - any import failure is the job's failure
        return JobResult(
            task.job_id,
            task.attempt,
            JobState.FAILED.value,
            error=f"cannot import {name} on this agent: {type(exc).__name__}: {exc}",
            traceback=traceback.format_exc(),
            started=started,
            ended=time.time(),
        )
    out, err = _capture(), _capture()
    state, value, error, tb = JobState.DONE.value, None, "", ""
    _tell_agent(("start", (task.job_id, task.attempt), time.time()))  # from here on it runs (until now it was only assigned)
    saved_env = _snapshot_env()  # the whole of it: a callable may change os.environ itself
    saved_cwd = os.getcwd() if task.cwd else None
    box = contain.JobBox(_containment, task.job_id, task.attempt, shell=False)
    try:
        if task.env:
            os.environ.update(task.env)  # checked whole in execute(); inside the try, so undone whatever happens
        args, kwargs = pickle.loads(task.payload) if task.payload else ((), {})
        calls = kwargs if args == CHUNK_CALL else None  # (CHUNK_CALL, [args, ...]): a chunk, one call per args
        if task.cwd:
            os.chdir(task.cwd)
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                _current_job = (task.job_id, task.attempt)
                if task.timeout:
                    signal.setitimer(signal.ITIMER_REAL, task.timeout)
                result = func(*args, **kwargs) if calls is None else [func(*each) for each in calls]
            finally:
                _current_job = None
                if task.timeout:
                    signal.setitimer(signal.ITIMER_REAL, 0)
        value = pickle.dumps(result)
    except JobInterrupted as stop:
        state = stop.state
        error = f"timed out after {task.timeout:g}s" if state == JobState.TIMEOUT.value else "cancelled"
    except Exception as exc:  # noqa: BLE001 - the job's own failure, reported as data
        state, error, tb = JobState.FAILED.value, f"{type(exc).__name__}: {exc}", traceback.format_exc()
        value = _failure_value(exc, tb)
    finally:
        killed = box.end()  # what the callable started ends with it, whatever ended the call
        if saved_cwd is not None:
            os.chdir(saved_cwd)
        _restore_env(saved_env)
    return JobResult(
        task.job_id,
        task.attempt,
        state,
        exit_code=0 if state == JobState.DONE.value else None,
        value=value,
        stdout=_captured(out).tail(),
        stderr=_captured(err).tail(),
        stdout_total=_captured(out).total,
        stderr_total=_captured(err).total,
        error=error,
        traceback=tb,
        started=started,
        ended=time.time(),
        note=_leftovers_note(state, killed),
    )


def _captured(stream: io.TextIOWrapper) -> _Tail:
    """What a callable's stream kept (write_through passed each write on; the callable may have closed it)."""
    raw: _TailBuffer = stream.buffer  # type: ignore[assignment]
    return raw.kept


def _failure_value(exc: BaseException, tb: str) -> Optional[bytes]:
    """What the caller needs to re-raise a failed call: (traceback, the pickled exception or None when it
    does not survive a round trip), kept under MAX_FAILURE_BYTES."""
    pickled: Optional[bytes] = None
    try:
        data = pickle.dumps(exc)
        pickle.loads(data)  # an exception whose __init__ does not take its args back fails here, not there
        pickled = data
    except Exception:  # noqa: BLE001 - any exception may refuse to pickle; the caller gets the text instead
        pass
    if pickled is not None and len(pickled) > MAX_FAILURE_BYTES:
        pickled = None
    return pickle.dumps((tb[-OUTPUT_TAIL_BYTES:], pickled))


def env_fault(env: Any) -> str:
    """Why this job's env cannot be applied whole ("" when it can): checked before any of it is.

    The master refuses such env at submit (console/master/validate.py, env_rule); this is the
    worker's own precondition, not a second copy of that rule: os.environ and exec take only str
    names without '=' or NUL and str values without NUL, and a job whose env fails half-way
    must not have applied the other half."""
    if not isinstance(env, dict):
        return f"env must map names to strings, not {type(env).__name__}"
    for key, value in env.items():
        if type(key) is not str or type(value) is not str:
            return f"env must map names to strings, not {type(key).__name__} to {type(value).__name__}"
        if not key or "=" in key or "\x00" in key:
            return f"env name {key!r} is empty or holds '=' or NUL"
        if "\x00" in value:
            return f"env value of {key!r} holds a NUL character"
        try:
            os.fsencode(key)
            os.fsencode(value)
        except UnicodeEncodeError:
            return f"env {key!r} cannot be encoded for this system"
    return ""


def _snapshot_env() -> Dict[Any, Any]:
    """The worker's whole environment, to put back after a callable (whatever the job set or removed).
    os.environ's own bytes mapping when it has one: a C-level copy and compare, not a decode of
    every variable (that was ~80 us a job, more than the rest of a small call)."""
    raw = getattr(os.environ, "_data", None)
    return dict(raw) if isinstance(raw, dict) else dict(os.environ)


def _restore_env(saved: Dict[Any, Any]) -> None:
    """Make os.environ exactly `saved` again: the job's env, and anything the callable itself set,
    removed or changed, leaves nothing behind for the next job on this worker."""
    raw = getattr(os.environ, "_data", None)
    if isinstance(raw, dict):
        if raw == saved:  # nearly always after a job without env: one comparison, no writes
            return
        saved = {os.fsdecode(key): os.fsdecode(value) for key, value in saved.items()}
    elif dict(os.environ) == saved:
        return
    for key in [key for key in os.environ if key not in saved]:
        del os.environ[key]
    for key, value in saved.items():
        if os.environ.get(key) != value:
            os.environ[key] = value
