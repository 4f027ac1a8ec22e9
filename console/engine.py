"""The engine under Pool and Executor: one thread per pool doing all its master I/O, and what both share (naming a callable, chunks, payloads, outcomes into values)."""

from __future__ import annotations

import itertools
import pickle
import sys
import threading
import time
import traceback
import uuid
from collections import deque
from multiprocessing.pool import RemoteTraceback  # type: ignore[attr-defined]  # public since 3.4, not in typeshed
from pathlib import Path
from typing import Any, Callable, Sequence

from corral.agent.errors import BadJobSpec, CorralError, JournalFailed
from corral.agent.protocol import CHUNK_CALL, MAX_PAYLOAD_BYTES, JobSpec, JobState

from . import ship as shipping
from . import values as values_
from .batches import batch_name
from .callables import Call, describe
from .client import SUBMIT_BATCH, SUBMIT_BYTES, Client
from .errors import JobFailed, MasterUnreachable

POLL_SECONDS = 0.05  # the engine's long polls: how late it may notice a result or pick up new work
WINDOW = 2000  # jobs one wait call asks about (the oldest in flight)
RECONNECT_SECONDS = 30.0  # how long the engine tries to reach a master that went away before failing its work
JOURNAL_RETRY_SECONDS = 1.0  # how often a step the master could not journal is sent again
SLOTS_SECONDS = 2.0  # how long the cluster's slot count is reused for chunk sizes
DONE, FAILED, CANCELLED = JobState.DONE.value, JobState.FAILED.value, JobState.CANCELLED.value

# (key, ok, value or exception): called once per job, in the engine's thread; the key is the work's own (a
# chunk's index in its map), so one bound method serves every chunk of a map (no closure per item).
Settle = Callable[[int, bool, Any], None]


# ---- outcomes into values and exceptions --------------------------------------------------------------

def job_exception(job_id: int, state: str, value: bytes | None, error: str,
                  reader: values_.Reader = values_.TRUSTING) -> BaseException:
    """The exception a failed job stands for: the task's own (type, args) with the remote traceback as its
    cause, as multiprocessing raises it; JobFailed when it cannot be rebuilt here (or `reader` refuses its
    class) or the job did not fail by raising (timeout, cancelled, lost)."""
    hint = f"see `corral show {job_id}`"
    if state != FAILED or value is None:
        return JobFailed(f"job {job_id} ended {state}: {error or state}", hint)
    try:
        tb, pickled = values_.plain_loads(value)  # (traceback text, pickled exception): plain, as the agent makes it
        tb = tb if isinstance(tb, str) else ""
    except Exception:  # noqa: BLE001 - a value of another shape: keep the message
        return JobFailed(f"job {job_id} failed: {error}", hint)
    exc: BaseException | None = None
    if pickled is not None:
        try:
            loaded = reader.load(pickled, job_id) if isinstance(pickled, bytes) else None
            exc = loaded if isinstance(loaded, BaseException) else None
        except Exception:  # noqa: BLE001 - its class is not importable here, does not unpickle, or is refused
            exc = None
    if exc is None:
        exc = JobFailed(f"job {job_id} failed: {error}", hint)
    if tb:
        exc.__cause__ = RemoteTraceback(tb)
    return exc


def decode(outcome: tuple[Any, ...], reader: values_.Reader = values_.TRUSTING) -> tuple[bool, Any, str]:
    """(ok, value or exception, state) of one outcome row (id, state, exit_code, value, error); a value is
    read by `reader` (the pool's values= policy): one it refuses or cannot import is a one-line CorralError."""
    job_id, state, _exit_code, value, error = outcome
    if state == DONE:
        try:
            return True, (reader.load(value, job_id) if value is not None else None), state
        except Exception as exc:  # noqa: BLE001 - ValueRefused/ValueUnreadable (one line), or what a trusted
            return False, exc, state  # value's own unpickling raised: the task's error, never the engine's
    return False, job_exception(job_id, state, value, error, reader), state


def run_hook(hook: Callable[[Any], Any] | None, arg: Any) -> None:
    """A user callback, in the engine's thread: its exception is printed, never the end of the pool."""
    if hook is None:
        return
    try:
        hook(arg)
    except Exception:  # noqa: BLE001 - the caller's code; the engine must go on
        print(f"corral: exception in callback {hook!r}:", file=sys.stderr)
        traceback.print_exc()


# ---- the engine: one thread per Pool/Executor doing all of its master I/O -------------------------------

class Template:
    """One callable as this pool submits it: the wire template (name, tags, timeout, shipped code)."""

    def __init__(self, call: Call, wire: dict[str, Any]) -> None:
        self.call = call
        self.wire = wire


class Work:
    """One job to be: its template, its position in its batch, its payload, and who hears how it ended.
    `listed`: its settle takes the list of its calls' values (a chunk), even when it holds one call."""

    __slots__ = ("template", "index", "total", "payload", "settle", "key", "calls", "listed", "job_id", "done",
                 "token")

    def __init__(self, template: Template, index: int, total: int | None, payload: bytes, settle: Settle,
                 key: int = 0, calls: int = 1, listed: bool = False) -> None:
        self.template, self.index, self.total, self.payload, self.settle = template, index, total, payload, settle
        self.key, self.calls, self.listed = key, calls, listed
        self.job_id: int | None = None  # set (under the engine's lock) once submitted
        self.done = False
        self.token: str | None = None  # the submission it heads, named once (see Engine._submit)

    def finish(self, ok: bool, value: Any) -> None:
        """Hand the outcome to whoever waits (a chunk of one call still gives a list)."""
        self.done = True
        self.settle(self.key, ok, [value] if ok and self.listed and self.calls == 1 else value)


RUN, CLOSE, TERMINATE = "run", "close", "terminate"


class Engine:
    """Submits queued work (at most `cap` jobs on the cluster at once), polls for outcomes, settles them.

    Callers only queue work here; this thread talks to the master, so submitting never waits for the
    network and one round trip carries many jobs. A small batch is submitted and answered in a single
    round trip (submit_map waits for it); results are polled every POLL_SECONDS."""

    def __init__(self, home: Path | None, cap: int | None, reader: values_.Reader = values_.TRUSTING) -> None:
        self.home = home
        self.cap = cap
        self.reader = reader
        self.cv = threading.Condition()
        self.outbox: deque[Work] = deque()
        self.watching: dict[int, Work] = {}
        self.state = RUN
        # Each submission is named (this engine's random prefix, a count): a retry after a lost reply
        # sends the same name, and the master answers with the jobs it queued the first time.
        self.tokens = uuid.uuid4().hex
        self.submissions = itertools.count(1)
        self.thread = threading.Thread(target=self._run, name="corral-pool", daemon=True)
        self.thread.start()

    def put(self, works: Sequence[Work]) -> None:
        with self.cv:
            if self.state == TERMINATE:
                raise ValueError("Pool not running")
            self.outbox.extend(works)
            self.cv.notify_all()

    def close(self) -> None:
        with self.cv:
            if self.state == RUN:
                self.state = CLOSE
            self.cv.notify_all()

    def idle(self) -> bool:
        with self.cv:
            return not self.outbox and not self.watching

    def terminate(self, client: Client | None) -> None:
        """Stop: unsent work is dropped, the cluster's queued and running jobs of this pool are cancelled,
        and whatever had not ended fails with "terminated" (no callbacks run for it)."""
        with self.cv:
            self.state = TERMINATE
            dropped = list(self.outbox) + list(self.watching.values())
            self.outbox.clear()
            ids = list(self.watching)
            self.watching.clear()
            self.cv.notify_all()
        if ids and client is not None:
            try:
                client.cancel(ids)
            except CorralError as exc:
                print(f"corral: could not cancel the pool's jobs: {exc}", file=sys.stderr)
        stop = Terminated("the pool was terminated before this task ended")
        for work in dropped:
            work.finish(False, stop)
        self._wake()

    def cancel(self, works: Sequence[Work], client: Client) -> set[Work]:
        """Cancel work not yet running: unsent, or queued on the cluster. Returns what was cancelled
        (its waiters are told by the caller: a future becomes cancelled)."""
        cancelled: set[Work] = set()
        with self.cv:
            for work in works:
                if work.job_id is None and work in self.outbox:
                    self.outbox.remove(work)
                    cancelled.add(work)
            # One being submitted this instant gets its id within a round trip.
            self.cv.wait_for(lambda: all(w in cancelled or w.job_id is not None or w.done for w in works), 10.0)
        queued = {work.job_id: work for work in works if work not in cancelled and work.job_id is not None}
        if queued:
            outcome = client.cancel(list(queued), queued_only=True)
            cancelled |= {work for job_id, work in queued.items() if outcome.get(job_id) == CANCELLED}
        return cancelled

    def cancel_all(self, client: Client) -> None:
        """Cancel every task not yet running (Executor.shutdown(cancel_futures=True))."""
        with self.cv:
            works = list(self.outbox) + list(self.watching.values())
        for work in self.cancel(works, client):
            work.finish(False, Cancelled(JobFailed("cancelled before it ran")))

    # ---- the thread ----

    def _run(self) -> None:
        client: Client | None = None
        try:
            client = self._connect(None)
            while True:
                with self.cv:
                    while self.state == RUN and not self.outbox and not self.watching:
                        self.cv.wait()
                    if self.state == TERMINATE or (self.state == CLOSE and not self.outbox and not self.watching):
                        return
                    batch = self._take_batch()
                    more = bool(self.outbox)
                if batch:
                    client = self._guarded(client, lambda c: self._submit(c, batch, more), batch)
                elif self.watching:
                    client = self._guarded(client, self._poll, None)
        except BaseException as exc:  # noqa: BLE001 - the engine's own failure: every waiter must hear of it
            self._fail_all(exc if isinstance(exc, Exception) else CorralError(f"the pool's engine stopped: {exc!r}"))
        finally:
            if client is not None:
                client.close()

    def _take_batch(self) -> list[Work]:
        """The next work to submit (lock held): no more than the cap leaves room for, one message's worth."""
        room = len(self.outbox) if self.cap is None else self.cap - len(self.watching)
        batch: list[Work] = []
        size = 0
        while self.outbox and len(batch) < min(room, SUBMIT_BATCH) and size < SUBMIT_BYTES:
            work = self.outbox.popleft()
            batch.append(work)
            size += len(work.payload) + 64
        return batch

    def _connect(self, old: Client | None) -> Client:
        if old is not None:
            old.close()
        deadline = time.monotonic() + RECONNECT_SECONDS
        while True:
            try:
                return Client(home=self.home)
            except MasterUnreachable:
                if old is None or time.monotonic() > deadline or self.state == TERMINATE:
                    raise
                time.sleep(0.5)

    def _guarded(self, client: Client, step: Callable[[Client], None], batch: list[Work] | None) -> Client:
        """Run one step; a master that went away, or whose journal refuses writes (a full disk), is waited
        for (RECONNECT_SECONDS) and the step retried: a submission carries its token, so it is queued once."""
        refused_until = None
        while True:
            try:
                step(client)
                return client
            except MasterUnreachable:
                client = self._connect(client)
            except JournalFailed as exc:
                refused_until = refused_until or time.monotonic() + RECONNECT_SECONDS
                if time.monotonic() > refused_until or self.state == TERMINATE:
                    if batch is None:
                        raise
                    for work in batch:
                        if work.job_id is None:  # what went in before the refusal runs on
                            work.finish(False, exc)
                    self._wake()
                    return client
                time.sleep(JOURNAL_RETRY_SECONDS)
            except CorralError as exc:
                if batch is None:
                    raise
                for work in batch:  # the master refused this submission (BadJobSpec): its tasks fail, not the pool
                    work.finish(False, exc)
                self._wake()
                return client

    def _submit(self, client: Client, batch: list[Work], more: bool) -> None:
        groups: list[list[Work]] = []
        for work in batch:
            last = groups[-1][-1] if groups else None
            if (last is not None and last.template is work.template and last.total == work.total
                    and last.index + 1 == work.index):
                groups[-1].append(work)
            else:
                groups.append([work])
        for n, group in enumerate(groups):
            head = group[0]
            if head.job_id is not None:
                continue  # submitted and answered before a lost connection made _guarded run this batch again
            if head.token is None:
                head.token = f"{self.tokens}-{next(self.submissions)}"
            template = dict(head.template.wire, batch=[head.index, head.total])
            # The last group of a burst waits briefly on the master: a small one is answered in this trip.
            wait = POLL_SECONDS if n == len(groups) - 1 and not more else 0.0
            ids, finished = client.submit_batch(template, [work.payload for work in group], wait, head.token)
            with self.cv:
                for job_id, work in zip(ids, group):
                    work.job_id = job_id
                    self.watching[job_id] = work
                terminated = self.state == TERMINATE
                self.cv.notify_all()  # a cancel() may be waiting for these ids
            if terminated:  # terminate() ran meanwhile, before these ids were known to it
                client.cancel(ids)
                return
            self._settle(finished)

    def _poll(self, client: Client) -> None:
        with self.cv:
            window = list(itertools.islice(self.watching, WINDOW))
        self._settle(client.wait_outcomes(window, POLL_SECONDS))

    def _settle(self, outcomes: list[tuple[Any, ...]]) -> None:
        if not outcomes:
            return
        with self.cv:
            pop = self.watching.pop
            works = [pop(outcome[0], None) for outcome in outcomes]
            if not self.watching:
                self.cv.notify_all()
        for outcome, work in zip(outcomes, works):
            if work is not None:
                ok, value, state = decode(outcome, self.reader)
                work.finish(ok, value if ok or state != CANCELLED else Cancelled(value))

    def _wake(self) -> None:
        with self.cv:
            self.cv.notify_all()

    def _fail_all(self, exc: Exception) -> None:
        with self.cv:
            self.state = TERMINATE
            works = list(self.outbox) + list(self.watching.values())
            self.outbox.clear()
            self.watching.clear()
            self.cv.notify_all()
        for work in works:
            work.finish(False, exc)
        self._wake()


class Terminated(JobFailed):
    """What a task of a terminated pool raises (its callbacks do not run, as with multiprocessing)."""


class Cancelled(Exception):
    """A job that ended `cancelled` on the cluster (by its future, an operator, or the pool): futures
    become cancelled; Pool results raise the JobFailed inside."""

    def __init__(self, error: BaseException) -> None:
        super().__init__(str(error))
        self.error = error


# ---- what Pool and Executor share: naming a callable, chunking, payloads ---------------------------

class Submitter:
    """Turns calls into work for the engine: the callable's template (its code shipped once), payloads,
    chunks, batch names ("pool-3 [17/200]")."""

    kind = "pool"

    def __init__(self, processes: int | None, home: Path | None, tags: Sequence[str], ship: Sequence[Any] | None,
                 timeout: float | None, name: str | None, values: values_.Policy = values_.TRUST) -> None:
        if processes is not None and (type(processes) is not int or processes < 1):
            raise ValueError("Number of processes must be at least 1")
        self._values = values
        self._reader = values_.Reader(values)
        self._home = home
        self._local = threading.local()
        client = self._client()  # here and now: an unreachable master is the constructor's error
        self.name = name or batch_name(self.kind, client.state.home)
        self._processes = processes
        self._tags = tuple(tags)
        self._timeout = timeout
        self._ship = list(ship or ())
        self._templates: dict[Any, Template] = {}
        self._lock = threading.Lock()
        self._singles = itertools.count(1)
        self._slots: tuple[float, int] = (0.0, 0)
        self._engine = Engine(home, processes, self._reader)

    def _client(self) -> Client:
        """This thread's Client (a proxy is not shared between threads)."""
        client = getattr(self._local, "client", None)
        if client is None:
            client = self._local.client = Client(home=self._home, values=self._values)
        return client

    def _template(self, func: Any) -> Template:
        """The template for `func`, made once per pool: describing it, building and shipping its code."""
        try:
            cached = self._templates.get(func)
        except TypeError:  # unhashable (a partial of unhashable things): describe it each time
            cached = None
        if cached is not None:
            return cached
        call = describe(func)
        bundle = shipping.bundle_for(call, self._ship)
        if bundle is not None:
            self._client().ship(bundle)
        wire = JobSpec(func=call.name, name=self.name, tags=self._tags, timeout=self._timeout,
                       code=bundle.digest if bundle is not None else None).to_wire()
        template = Template(call, wire)
        try:
            self._templates[func] = template
        except TypeError:
            pass
        return template

    def _workers(self) -> int:
        """How many jobs run at once for chunk sizes: `processes`, else the cluster's free slots (its slots
        when none is free), read at most every SLOTS_SECONDS."""
        if self._processes is not None:
            return self._processes
        when, slots = self._slots
        if time.monotonic() - when > SLOTS_SECONDS:
            agents = [a for a in self._client().agents() if a.get("state") == "up"]
            total = sum(int(a.get("slots") or 0) for a in agents)
            free = total - sum(int(a.get("busy") or 0) for a in agents)
            slots = max(1, free if free > 0 else total)
            self._slots = (time.monotonic(), slots)
        return slots

    def _chunksize(self, count: int, chunksize: int | None) -> int:
        if chunksize is not None:
            if type(chunksize) is not int or chunksize < 1:
                raise ValueError(f"Chunksize must be 1+, not {chunksize!r}")
            return chunksize
        size, extra = divmod(count, self._workers() * 4)  # multiprocessing.Pool's own heuristic
        return size + 1 if extra else max(size, 1)

    def _payload(self, template: Template, chunk: Sequence[tuple[Any, ...]], kwargs: dict[str, Any] | None = None) -> bytes:
        call = template.call
        if len(chunk) == 1:
            data = pickle.dumps(call.args(chunk[0], kwargs))
        else:
            data = pickle.dumps((CHUNK_CALL, [call.bound + args for args in chunk]))
        if len(data) > MAX_PAYLOAD_BYTES:
            raise BadJobSpec(f"a task's arguments pickle to {len(data)} bytes; the limit is {MAX_PAYLOAD_BYTES}",
                             "pass large data by path, or use a smaller chunksize")
        return data

    def _chunk_limit(self, func: Any, chunksize: int) -> int:
        # A partial's keywords travel with one call's payload only: such calls are not chunked.
        return 1 if self._template(func).call.keywords else chunksize

    def _single(self, func: Any, args: tuple[Any, ...], kwargs: dict[str, Any] | None, settle: Settle) -> Work:
        """One call, one job, named "NAME [k]" (k counts this pool's open-ended jobs)."""
        template = self._template(func)
        work = Work(template, next(self._singles), None, self._payload(template, [tuple(args)], kwargs), settle)
        self._engine.put([work])
        return work

    def _chunk(self, func: Any, chunk: Sequence[tuple[Any, ...]], settle: Settle, key: int) -> Work:
        """One chunk of calls as one open-ended job (imap's); it settles with `key` and the list of their values."""
        template = self._template(func)
        work = Work(template, next(self._singles), None, self._payload(template, chunk), settle, key, len(chunk), True)
        self._engine.put([work])
        return work

    def _chunks(self, func: Any, items: Sequence[tuple[Any, ...]], size: int, settle: Settle) -> list[Work]:
        """Work for every chunk of `items` (argument tuples), queued at once, named "NAME [i/n]"; chunk i
        settles with key i and the list of its values."""
        template = self._template(func)
        payload = self._payload
        works = [Work(template, n + 1, -(-len(items) // size), payload(template, items[i : i + size]), settle, n,
                       len(items[i : i + size]), True)
                 for n, i in enumerate(range(0, len(items), size))]
        self._engine.put(works)
        return works


