"""The agent: register with the master, take jobs in batches, run them in a pool, report, heartbeat, stop gracefully."""

from __future__ import annotations

import dataclasses
import functools
import logging
import multiprocessing
import os
import pickle
import signal
import sys
import threading
import time
from collections import OrderedDict, deque
from multiprocessing.managers import BaseManager
from pathlib import Path
from typing import Any, Callable, Deque, Dict, List, Optional, Set, Tuple

from . import execute
from .connection import SERIALIZER
from .errors import CorralError, NameTaken
from .protocol import SCHEDULER_TYPEID, AgentInfo, JobResult, JobState, Task

log = logging.getLogger(__name__)

HEARTBEAT_SECONDS = 1.0
TAKE_WAIT_SECONDS = 1.0  # the master holds a take() this long when it has no work (long poll)
BATCH_HORIZON_SECONDS = 0.1  # take enough work to keep the slots busy this long
CHUNK_SECONDS = 0.01  # tiny jobs travel to a pool worker in chunks of about this much work
MAX_TAKE = 4000
BACKOFF_CAP_SECONDS = 10.0
HARD_KILL_GRACE_SECONDS = 5.0  # a callable ignoring its timeout signal this long gets its worker killed
CANCEL_RING = 256
MAX_KINDS = 1000  # job kinds whose duration the agent remembers


class SchedulerManager(BaseManager):
    """Client side of the master's manager: only the scheduler is registered."""


SchedulerManager.register(SCHEDULER_TYPEID)


class Disconnected(Exception):
    """The connection to the master broke; the supervisor reconnects."""


def connect(address: Tuple[str, int], authkey: bytes) -> Any:
    """A fresh scheduler proxy on its own connection (proxies are per thread)."""
    manager = SchedulerManager(address=address, authkey=authkey, serializer=SERIALIZER)
    manager.connect()
    return getattr(manager, SCHEDULER_TYPEID)()


class _Running:
    """What the agent knows of one job it holds."""

    __slots__ = ("task", "worker", "pgid", "started", "output")

    def __init__(self, task: Task) -> None:
        self.task = task
        self.worker = 0  # pool worker pid once its chunk started
        self.pgid = 0  # the shell's process group, for shell jobs
        self.started = 0.0
        self.output: Optional[Tuple[str, str]] = None  # the latest (stdout, stderr) tails while it runs


class Agent:
    """One agent process: a supervisor around a multiprocessing pool."""

    def __init__(
        self,
        address: Tuple[str, int],
        authkey: bytes,
        info: AgentInfo,
        verbose: bool = False,
        locate: Optional[Callable[[], Tuple[str, int]]] = None,
        spool: Optional[Path] = None,
        name_is_default: bool = False,
    ) -> None:
        self.name_is_default = name_is_default
        self.spool_given = spool
        # Results the master has not acknowledged survive a restart of this agent here, in
        # <spool dir>/<name>.pickle (the name is final once registered).
        self.spool: Optional[Path] = None
        self.address = address
        # Where to look the master up again before each (re)connect: a restarted master may
        # listen on a new port (read from the state directory); None when --connect fixed it.
        self.locate = locate
        self.authkey = authkey
        self.info = info
        self.verbose = verbose
        self.session = ""
        self.held: Dict[int, _Running] = {}  # job id -> taken and not yet reported
        self.waiting: Deque[Task] = deque()  # held, not yet handed to the pool (cancel/release locally)
        self.chunks_in_pool = 0
        self.lock = threading.Lock()
        self.results: List[tuple] = []  # wire results waiting to be reported
        self.results_ready = threading.Condition(threading.Lock())
        # Moving average of how long jobs take, per command or callable name: how much work to
        # take and how to chunk it. An unknown kind is assumed long until one of it finishes.
        self.estimates: "OrderedDict[str, float]" = OrderedDict()
        self.recent_kind: Optional[str] = None
        self.draining = threading.Event()
        self.stopping = threading.Event()  # second signal: kill everything and leave
        self.disconnected = threading.Event()
        self.released: Set[int] = set()  # jobs handed back unstarted while draining
        self.cancel_requested: Set[int] = set()
        self.live_changed: Set[int] = set()  # jobs whose output tails changed since the last report
        self.stop_signals = 0
        # forkserver: the agent has threads, and fork() from a threaded process can deadlock;
        # forkserver workers start from a clean single-threaded server, and cheaply.
        method = "forkserver" if "forkserver" in multiprocessing.get_all_start_methods() else "spawn"
        self.ctx = multiprocessing.get_context(method)
        self.events: Any = None
        self.cancel_ring: Any = None
        self.cancel_next = 1
        self.pool: Any = None

    # ---- signals: handlers only set flags; the loops act -------------------------------

    def on_signal(self, signum: int, frame: Any) -> None:
        self.stop_signals += 1
        if self.stop_signals == 1:
            self.draining.set()
        else:
            self.stopping.set()

    # ---- lifecycle ----------------------------------------------------------------------

    def run(self) -> int:
        """Run until drained (exit 0) or killed by a second signal (exit 1)."""
        if self.spool_given is not None and not self.name_is_default:
            # The name is fixed: read the spool before the first register, so its jobs are among
            # those we say we hold (the master keeps them ours instead of re-queueing them).
            self.spool = self.spool_given / f"{self.info.name}.pickle"
            self._load_spool()
        backoff = 0.5
        try:
            while not self.stopping.is_set():
                try:
                    if self.locate is not None:
                        self.address = self.locate()
                    self._register()
                except NameTaken as exc:
                    print(f"corral agent: {exc}", file=sys.stderr, flush=True)
                    return 2
                except (OSError, EOFError, CorralError) as exc:
                    if self.draining.is_set() and not self.held:
                        break
                    log.warning("master %s:%s unreachable (%s); retrying in %.1fs", *self.address, exc, backoff)
                    self._sleep(backoff)
                    backoff = min(backoff * 2, BACKOFF_CAP_SECONDS)
                    continue
                backoff = 0.5
                if self.pool is None:
                    self._start_pool()
                if self.spool is None and self.spool_given is not None:
                    self.spool = self.spool_given / f"{self.info.name}.pickle"
                    self._load_spool()
                self._serve_session()
                if self.draining.is_set() and self._drained():
                    break
                self._save_spool()
        finally:
            self._shutdown_pool()
        return 1 if self.stopping.is_set() else 0

    def _start_pool(self) -> None:
        """The pool starts once registered: the master (and a deploy waiting for "ready") hears from
        us before we pay for a forkserver and N workers, and no work is taken before they exist."""
        self.events, events_writer = self.ctx.Pipe(duplex=False)
        self.cancel_ring = self.ctx.Array("q", 1 + CANCEL_RING, lock=False)
        self.pool = self.ctx.Pool(self.info.slots, execute.init_worker,
                                  (events_writer, self.ctx.Lock(), self.cancel_ring, os.getpid()))
        threading.Thread(target=self._watch_events, name="events", daemon=True).start()

    def _serve_session(self) -> None:
        """Take and report on this connection until it breaks, we are told to stop, or we drained."""
        self.disconnected.clear()
        threads = [threading.Thread(target=self._take_loop, name="take", daemon=True),
                   threading.Thread(target=self._report_loop, name="report", daemon=True)]
        for thread in threads:
            thread.start()
        while not (self.disconnected.is_set() or self.stopping.is_set()):
            if self.draining.is_set() and self._drained():
                break
            time.sleep(0.05)
        with self.results_ready:
            self.results_ready.notify_all()
        for thread in threads:
            thread.join(timeout=3)

    def _sleep(self, seconds: float) -> None:
        deadline = time.time() + seconds
        while time.time() < deadline and not self.stopping.is_set():
            if self.draining.is_set() and not self.held:
                return
            time.sleep(0.05)

    def _drained(self) -> bool:
        with self.lock:
            held = bool(self.held)
        with self.results_ready:
            pending = bool(self.results)
        return not held and not pending

    def _save_spool(self) -> None:
        """Keep unreported results on disk while the master is away (atomic replace). Under the
        results lock: one writer at a time, and the last one writes the newest rows."""
        with self.results_ready:
            rows = list(self.results)
            if self.spool is None or not rows:
                return
            try:
                self.spool.parent.mkdir(parents=True, exist_ok=True)
                tmp = self.spool.with_suffix(".tmp")
                tmp.write_bytes(pickle.dumps(rows))
                os.replace(tmp, self.spool)
            except OSError as exc:
                log.warning("cannot write the spool %s: %s", self.spool, exc)

    def _load_spool(self) -> None:
        """Queue the results a previous run of this agent could not hand in."""
        if self.spool is None or not self.spool.exists():
            return
        try:
            rows = pickle.loads(self.spool.read_bytes())
        except Exception as exc:  # noqa: BLE001 - a torn spool is reported and set aside, never fatal
            rows, why = None, str(exc)
        else:
            why = "not a list of results"
        if not isinstance(rows, list):
            log.warning("ignoring unreadable spool %s: %s", self.spool, why)
            return
        log.info("handing in %d results from the spool %s", len(rows), self.spool)
        self._queue_results([tuple(row) for row in rows])

    def _drop_spool(self) -> None:
        if self.spool is not None:
            try:
                self.spool.unlink()
            except FileNotFoundError:
                pass

    def _register(self) -> None:
        scheduler = connect(self.address, self.authkey)
        with self.lock:
            running = set(self.held)
        with self.results_ready:
            running.update(row[0] for row in self.results)  # finished here, not yet reported: still ours
        while True:
            try:
                reply = scheduler.register(self.info.to_wire(), sorted(running))
                break
            except NameTaken:
                if not self.name_is_default:
                    raise
                # Several agents on one host with the default name: host, host-2, host-3...
                base, _, number = self.info.name.rpartition("-")
                if not (base and number.isdigit()):
                    base, number = self.info.name, "1"
                self.info = dataclasses.replace(self.info, name=f"{base}-{int(number) + 1}")
        self.session = reply["session"]
        log.info("registered with master %s:%s as %s (%d slots)", *self.address, self.info.name, self.info.slots)
        if self.verbose:
            print(f"Connected to master {self.address[0]}:{self.address[1]} as {self.info.name}", flush=True)

    def _shutdown_pool(self) -> None:
        if self.pool is None:
            return
        if self.stopping.is_set():
            with self.lock:
                pgids = [r.pgid for r in self.held.values() if r.pgid]
                killed = set(self.held)
            for pgid in pgids:
                execute._kill_group(pgid)
            self.pool.terminate()
            self._hand_back_killed(killed)
        else:
            # Nothing of ours is left in the pool (drained), so close + terminate is safe even if a
            # worker was killed and left an orphaned task behind that join() would wait on forever.
            self.pool.close()
            self.pool.terminate()
        self.pool.join()
        self.pool = None

    def _hand_back_killed(self, killed: Optional[Set[int]] = None) -> None:
        """After a forced stop, tell the master (best effort) that our killed jobs should run again,
        rather than leave them to wait out this agent's lease."""
        with self.lock:
            rows = [(j, r.task.attempt, "released", None, None, "", "", "stopped by a second signal", "", 0.0, 0.0)
                    for j, r in self.held.items()]
        with self.results_ready:
            # A job we killed may have ended (killed by signal 9) before the pool went: that is our
            # doing, not the job's failure, so it too is handed back to run again.
            rows += [row[:2] + ("released",) + row[3:] if row[0] in (killed or ()) else row for row in self.results]
        if not rows or not self.session:
            return
        try:
            connect(self.address, self.authkey).report(self.session, rows, [], 0)
        except (OSError, EOFError, CorralError) as exc:
            log.warning("could not hand back %d jobs (%s); the master re-queues them after the lease", len(rows), exc)

    # ---- taking work --------------------------------------------------------------------

    def _estimate(self, kind: Optional[str]) -> Optional[float]:
        return self.estimates.get(kind) if kind is not None else None

    def _learn(self, kind: str, seconds: float) -> None:
        old = self.estimates.pop(kind, None)
        self.estimates[kind] = seconds if old is None else 0.7 * old + 0.3 * seconds
        if len(self.estimates) > MAX_KINDS:
            self.estimates.popitem(last=False)

    def _wanted(self) -> int:
        """Our credit on the master: enough jobs to keep every slot busy ~100 ms, judged by the
        kind of job we last received (many for tiny jobs, just the free slots for long or unknown)."""
        estimate = self._estimate(self.recent_kind)
        per_slot = 1 if estimate is None else max(1, int(BATCH_HORIZON_SECONDS / max(estimate, 1e-6)))
        return min(MAX_TAKE, self.info.slots * per_slot) - len(self.held)

    def _take_loop(self) -> None:
        try:
            scheduler = connect(self.address, self.authkey)
            while not (self.draining.is_set() or self.stopping.is_set() or self.disconnected.is_set()):
                with self.lock:
                    wanted = max(0, self._wanted())
                # Even when full, the long poll is how cancels reach us at once. `wanted` is our
                # credit on the master: each report() renews it as slots free up, and this parked
                # take() then receives new work the moment it is submitted.
                rows, cancel = scheduler.take(self.session, wanted, TAKE_WAIT_SECONDS)
                if cancel:
                    self._cancel(cancel)
                if rows:
                    self._dispatch(rows)
        except (OSError, EOFError) as exc:
            log.warning("lost the master while taking work: %s", exc)
            self.disconnected.set()
        except CorralError as exc:
            log.warning("master refused this agent: %s", exc)
            self.disconnected.set()
        except Exception:  # noqa: BLE001 - any other failure: say so, and let the supervisor reconnect
            log.exception("the take loop failed; reconnecting")
            self.disconnected.set()

    def _dispatch(self, rows: List[tuple]) -> None:
        """Take in tasks from the master and feed the pool. Keep a task if a slot is free for it, or
        if it is short and the queue here holds under ~100 ms of work per slot; hand the rest straight
        back, for an idle agent to take (long or unknown jobs never wait behind a busy slot here)."""
        released = []
        with self.lock:
            free = self.info.slots - len(self.held)
            budget = BATCH_HORIZON_SECONDS * self.info.slots
            for task in self.waiting:
                budget -= self._estimate(task.func or task.command) or 0.0
            for row in rows:
                task = Task._make(row)
                self.recent_kind = task.func or task.command
                estimate = self._estimate(self.recent_kind)
                short = estimate is not None and estimate < BATCH_HORIZON_SECONDS
                if self.draining.is_set() or not (free > 0 or (short and budget >= estimate)):
                    released.append(_released(task, "handed back: this agent has enough work"))
                    continue
                free -= 1
                budget -= estimate or 0.0
                self.held[task.job_id] = _Running(task)
                self.waiting.append(task)
            self._feed()
        if released:
            self._queue_results(released)

    def _feed(self) -> None:
        """Hand waiting tasks to the pool (lock held): tiny ones chunked so one pool round trip
        carries many; a chunk or two per slot in the pool, so a worker never waits for us."""
        while self.waiting:
            head = self.waiting[0]
            estimate = self._estimate(head.func or head.command)
            tiny = estimate is not None and estimate < CHUNK_SECONDS
            if self.chunks_in_pool >= self.info.slots * (2 if tiny else 1):
                return
            chunk = [tuple(self.waiting.popleft())]
            # A callable with a timeout runs alone, so a hard kill of its worker hits only it.
            if tiny and not (head.func and head.timeout):
                work = estimate or 0.0
                while self.waiting and work < CHUNK_SECONDS:
                    task = self.waiting[0]
                    next_estimate = self._estimate(task.func or task.command)
                    if next_estimate is None or (task.func and task.timeout):
                        break
                    work += next_estimate
                    chunk.append(tuple(self.waiting.popleft()))
            self.chunks_in_pool += 1
            self.pool.apply_async(execute.run_chunk, (chunk,), callback=self._on_results,
                                  error_callback=functools.partial(self._on_chunk_error, [r[0] for r in chunk]))

    # ---- results ------------------------------------------------------------------------

    def _on_results(self, rows: List[tuple], chunks: int = 1) -> None:
        """Pool callback (its result thread): learn durations, queue results, refill the pool.
        `chunks` is how many pool tasks these rows settle (the sweep settles those of dead workers)."""
        finished = []
        with self.lock:
            self.chunks_in_pool -= chunks
            kinds: Dict[str, List[float]] = {}
            for row in rows:
                job_id = row[0]
                running = self.held.pop(job_id, None)
                if running is None:
                    continue  # already settled (e.g. its worker was declared dead)
                if row[2] == JobState.CANCELLED.value and job_id in self.released:
                    self.released.discard(job_id)
                    row = row[:2] + ("released",) + row[3:]
                elif row[2] in (JobState.DONE.value, JobState.FAILED.value):
                    kinds.setdefault(running.task.func or running.task.command or "", []).append(row[10] - row[9])
                self.cancel_requested.discard(job_id)
                finished.append(row)
            for kind, seconds in kinds.items():
                self._learn(kind, sum(seconds) / len(seconds))
            self._feed()
        if self.verbose:
            for row in finished:
                print(f"Finished job: {row[0]} ({row[2]})", flush=True)
        self._queue_results(finished)

    def _on_chunk_error(self, ids: List[int], exc: BaseException) -> None:
        now = time.time()
        with self.lock:
            attempts = {job_id: self.held[job_id].task.attempt for job_id in ids if job_id in self.held}
        results = [tuple(JobResult(job_id, attempt, JobState.FAILED.value,
                                   error=f"the pool could not run it: {type(exc).__name__}: {exc}",
                                   started=now, ended=now))
                   for job_id, attempt in attempts.items()]
        self._on_results(results)

    def _queue_results(self, rows: List[tuple]) -> None:
        if not rows:
            return
        with self.results_ready:
            self.results.extend(rows)
            self.results_ready.notify()
        if self.disconnected.is_set():
            self._save_spool()  # the master is away: on disk now, in case this agent dies before it is back

    def _report_loop(self) -> None:
        """Send results as soon as there are any (what piles up meanwhile goes in the next call), and heartbeat."""
        try:
            scheduler = connect(self.address, self.authkey)
            next_beat = 0.0
            while not (self.stopping.is_set() or self.disconnected.is_set()):
                with self.results_ready:
                    if not self.results:
                        self.results_ready.wait(max(0.0, next_beat - time.time()))
                    batch = list(self.results)
                if not batch and time.time() < next_beat:
                    if self.draining.is_set() and self._drained():
                        return
                    continue
                with self.lock:
                    running = list(self.held)
                    wanted = 0 if self.draining.is_set() else max(0, self._wanted())
                    live = {j: self.held[j].output for j in self.live_changed if j in self.held}
                    self.live_changed.clear()
                if live:
                    rows, cancel = scheduler.report(self.session, batch, running, wanted, live)
                else:
                    rows, cancel = scheduler.report(self.session, batch, running, wanted)
                with self.results_ready:
                    del self.results[: len(batch)]
                    emptied = not self.results
                if batch and emptied:
                    self._drop_spool()
                next_beat = time.time() + HEARTBEAT_SECONDS
                if cancel:
                    self._cancel(cancel)
                if rows:
                    self._dispatch(rows)
        except (OSError, EOFError) as exc:
            log.warning("lost the master while reporting: %s", exc)
            self.disconnected.set()
        except CorralError as exc:
            log.warning("master refused this agent's report: %s", exc)
            self.disconnected.set()
        except Exception:  # noqa: BLE001 - never die silently with results unreported: reconnect
            log.exception("the report loop failed; reconnecting")
            self.disconnected.set()

    # ---- cancel, release, timeouts, dead workers -----------------------------------------

    def _mark_cancelled(self, job_ids: List[int]) -> None:
        """Publish ids in the shared ring the workers read before and during each job."""
        ring = self.cancel_ring
        for job_id in job_ids:
            ring[self.cancel_next] = job_id
            self.cancel_next = self.cancel_next % CANCEL_RING + 1
        ring[0] += 1

    def _cancel(self, job_ids: List[int]) -> None:
        now = time.time()
        with self.lock:
            wanted = set(job_ids)
            unstarted = [t for t in self.waiting if t.job_id in wanted]
            for task in unstarted:
                self.waiting.remove(task)
                del self.held[task.job_id]
            targets = [self.held[j] for j in job_ids if j in self.held]
            self.cancel_requested.update(r.task.job_id for r in targets)
            self._mark_cancelled([r.task.job_id for r in targets])
        for running in targets:
            if running.pgid:
                execute._kill_group(running.pgid)
            elif running.worker and running.task.func:
                try:
                    os.kill(running.worker, signal.SIGUSR1)
                except ProcessLookupError:
                    pass
            if self.verbose:
                print(f"Cancel job: {running.task.job_id}", flush=True)
        self._queue_results([tuple(JobResult(t.job_id, t.attempt, JobState.CANCELLED.value,
                                             error="cancelled before it started", started=now, ended=now))
                             for t in unstarted])

    def _release_unstarted(self) -> None:
        """While draining, hand back jobs that have not started: they run elsewhere sooner.
        Those still waiting here go back at once; those already in the pool's queue are stopped
        through the cancel ring and reported as released when their worker skips them."""
        with self.lock:
            waiting = list(self.waiting)
            self.waiting.clear()
            for task in waiting:
                del self.held[task.job_id]
            in_pool = [j for j, r in self.held.items() if not r.worker and j not in self.released]
            self.released.update(in_pool)
            if in_pool:
                self._mark_cancelled(in_pool)
        self._queue_results([_released(t, "handed back: the agent is draining") for t in waiting])

    def _watch_events(self) -> None:
        """Learn which worker runs which job (for cancel), enforce hard timeouts, notice dead workers."""
        last_sweep = 0.0
        while not self.stopping.is_set():
            try:
                event = self.events.recv() if self.events.poll(0.2) else None
            except (OSError, EOFError, ValueError):
                return
            now = time.time()
            if event is not None:
                self._apply_event(event)
            if now - last_sweep >= 0.5:
                last_sweep = now
                if self.draining.is_set():
                    self._release_unstarted()
                self._sweep(now)

    def _apply_event(self, event: tuple) -> None:
        kind = event[0]
        with self.lock:
            if kind == "chunk":
                _, pid, ids, started = event
                for job_id in ids:
                    running = self.held.get(job_id)
                    if running is not None:
                        running.worker, running.started = pid, started
                if self.verbose:
                    for job_id in ids:
                        print(f"Run job: {job_id}", flush=True)
            elif kind == "output":
                _, job_id, out, err = event
                running = self.held.get(job_id)
                if running is not None:
                    running.output = (out, err)
                    self.live_changed.add(job_id)
            elif kind == "pgid":
                _, job_id, pgid, _ = event
                running = self.held.get(job_id)
                if running is not None:
                    running.pgid = pgid
                    if job_id in self.cancel_requested:
                        execute._kill_group(pgid)

    def _sweep(self, now: float) -> None:
        """Jobs whose worker died, and callables past timeout + grace: settle them here."""
        alive = {p.pid for p in getattr(self.pool, "_pool", [])} if self.pool is not None else set()
        dead: List[tuple] = []
        dead_workers: Set[int] = set()
        with self.lock:
            for job_id, running in list(self.held.items()):
                task = running.task
                if not running.worker:
                    continue
                overdue = (
                    task.func is not None
                    and task.timeout
                    and now - running.started > task.timeout + HARD_KILL_GRACE_SECONDS
                )
                if overdue:
                    dead_workers.add(running.worker)
                    try:
                        os.kill(running.worker, signal.SIGKILL)
                    except ProcessLookupError:
                        pass
                    dead.append(tuple(JobResult(job_id, task.attempt, JobState.TIMEOUT.value,
                                          error=f"timed out after {task.timeout:g}s; its worker was killed",
                                          started=running.started, ended=now)))
                elif running.worker not in alive and _gone(running.worker):
                    dead_workers.add(running.worker)
                    dead.append(tuple(JobResult(job_id, task.attempt, JobState.FAILED.value,
                                          error="the pool worker running it died (killed, or the job exited the process)",
                                          started=running.started, ended=now)))
        if dead:
            self._on_results(dead, chunks=len(dead_workers))


def _released(task: Task, why: str) -> tuple:
    """A result that gives a never-started task back to the master, to be queued again."""
    return tuple(JobResult(task.job_id, task.attempt, "released", error=why))


def _gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False


def default_name() -> str:
    import socket

    return socket.gethostname().split(".")[0] or "agent"


def install_signal_handlers(agent: Agent) -> None:
    signal.signal(signal.SIGTERM, agent.on_signal)
    signal.signal(signal.SIGINT, agent.on_signal)


def python_version() -> str:
    return ".".join(str(part) for part in sys.version_info[:3])
