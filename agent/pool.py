"""Feeding the multiprocessing pool: tasks in chunks, results back; cancels, releases, hard timeouts, dead workers."""

from __future__ import annotations

import functools
import logging
import multiprocessing
import os
import signal
import threading
import time
from collections import deque
from typing import Any, Callable, Deque, Dict, Iterable, List, NamedTuple, Optional, Set, Tuple

from . import contain, execute
from .pacing import Pacing, kind_of
from .protocol import RELEASED, JobResult, JobState, Task

log = logging.getLogger(__name__)

HARD_KILL_GRACE_SECONDS = 5.0  # a callable ignoring its timeout signal this long gets its worker killed
CANCEL_RING = 256  # job ids the workers can be told to cancel at once (a ring: the oldest are overwritten)
SWEEP_SECONDS = 0.5  # how often dead workers and overdue callables are looked for
EVENT_POLL_SECONDS = 0.2

# JobState values as plain strings: results are compared per job, on the hot path.
_DONE, _FAILED = JobState.DONE.value, JobState.FAILED.value
_CANCELLED, _TIMEOUT = JobState.CANCELLED.value, JobState.TIMEOUT.value

Report = Callable[[List[JobResult]], None]


def released(task: Task, why: str, started: float = 0.0) -> JobResult:
    """A result that gives a task back to the master, to be queued again: never started (started 0),
    or started and killed by this agent's stop (the master keeps that attempt as interrupted)."""
    return JobResult(task.job_id, task.attempt, RELEASED, error=why, started=started,
                     ended=time.time() if started else 0.0)


class _Held:
    """What the agent knows of one job it holds (taken, not yet settled)."""

    __slots__ = ("task", "chunk", "worker", "pgid", "started", "output")

    def __init__(self, task: Task) -> None:
        self.task = task
        self.chunk = 0  # the pool task (chunk number) carrying it, once fed to the pool
        self.worker = 0  # the pool worker's pid once its chunk started
        self.pgid = 0  # the shell's process group, for shell jobs
        self.started = 0.0
        self.output: Optional[Tuple[bytes, bytes]] = None  # the latest (stdout, stderr) tails while it runs


class Holding(NamedTuple):
    """What a report tells the master of the jobs held here."""

    running: List[int]
    wanted: int  # the credit: how many more jobs to send
    live: Dict[int, Tuple[bytes, bytes]]  # job id -> (stdout, stderr) tails that changed since the last report


class JobPool:
    """The pool's workers and the jobs this agent holds: taken from the master, not yet settled.

    The session's take and report loops call accept() and cancel(); the pool's result thread calls
    back with finished chunks; the events thread here follows the workers and sweeps. Settled
    results go to `report` (the outbox). One lock guards the held jobs.
    """

    def __init__(self, slots: int, report: Report, draining: threading.Event, verbose: bool = False,
                 hard_kill_grace: float = HARD_KILL_GRACE_SECONDS,
                 containment: Optional[contain.Containment] = None) -> None:
        self.slots = slots
        # The agent chooses (and owns its process, so it may reap and kill orphans there); a pool
        # made without one, embedded in another program, contains jobs in its workers only.
        self.containment = containment or contain.choose(owns_process=False)
        self.hard_kill_grace = hard_kill_grace
        self.report = report
        self.draining = draining
        self.verbose = verbose
        self.pacing = Pacing(slots)
        self.lock = threading.Lock()
        self.held: Dict[int, _Held] = {}
        self.waiting: Deque[Task] = deque()  # held, not yet fed to the pool (cancelled or released here)
        self.in_pool: Set[int] = set()  # chunk numbers fed to the pool and not yet settled
        self.next_chunk = 1
        self.releasing: Set[int] = set()  # in the pool's queue while draining: handed back once skipped
        self.cancel_requested: Set[int] = set()
        self.live_changed: Set[int] = set()
        self.workers: Set[int] = set()  # pids the workers announced, less those seen gone (events thread only)
        self.closed = threading.Event()
        # forkserver: the agent has threads, and fork() from a threaded process can deadlock;
        # forkserver workers start from a clean single-threaded server, and cheaply.
        method = "forkserver" if "forkserver" in multiprocessing.get_all_start_methods() else "spawn"
        ctx = multiprocessing.get_context(method)
        self.events, events_writer = ctx.Pipe(duplex=False)
        self.cancel_ring: Any = ctx.Array("q", 1 + CANCEL_RING, lock=False)
        self.cancel_next = 1
        self.pool = ctx.Pool(slots, execute.init_worker,
                             (events_writer, ctx.Lock(), self.cancel_ring, os.getpid(), self.containment))
        self.watcher = threading.Thread(target=self._watch_events, name="events", daemon=True)
        self.watcher.start()

    # ---- what the session asks ----------------------------------------------------------

    def wanted(self) -> int:
        with self.lock:
            return self.pacing.wanted(len(self.held))

    def held_ids(self) -> Set[int]:
        with self.lock:
            return set(self.held)

    def idle(self) -> bool:
        with self.lock:
            return not self.held

    def holding(self, draining: bool) -> Holding:
        with self.lock:
            live = {}
            for job_id in self.live_changed:
                held = self.held.get(job_id)
                if held is not None and held.output is not None:
                    live[job_id] = held.output
            self.live_changed.clear()
            wanted = 0 if draining else self.pacing.wanted(len(self.held))
            return Holding(list(self.held), wanted, live)

    # ---- work in ------------------------------------------------------------------------

    def accept(self, tasks: List[Task]) -> None:
        """Hold the tasks the master sent and feed the pool; hand back those pacing does not keep."""
        with self.lock:
            kept: List[Task] = []
            back = tasks
            if not self.draining.is_set():
                kept, back = self.pacing.admit(tasks, len(self.held), self.waiting)
            for task in kept:
                self.held[task.job_id] = _Held(task)
            self.waiting.extend(kept)
            self._feed()
        if back:
            self.report([released(task, "handed back: this agent has enough work") for task in back])

    def _feed(self) -> None:
        """Hand waiting tasks to the pool in the chunks pacing cuts (lock held)."""
        while True:
            chunk = self.pacing.next_chunk(self.waiting, len(self.in_pool))
            if chunk is None:
                return
            number = self.next_chunk
            self.next_chunk += 1
            self.in_pool.add(number)
            ids = []
            for task in chunk:
                self.held[task.job_id].chunk = number
                ids.append(task.job_id)
            self.pool.apply_async(execute.run_chunk, ([tuple(task) for task in chunk],),
                                  callback=functools.partial(self._on_chunk, number),
                                  error_callback=functools.partial(self._on_chunk_error, number, ids))

    # ---- results out --------------------------------------------------------------------

    def _on_chunk(self, number: int, rows: List[Tuple[Any, ...]]) -> None:
        """Pool callback (its result thread): a chunk's packed results."""
        self._settle([JobResult._make(row) for row in rows], (number,))

    def _on_chunk_error(self, number: int, ids: List[int], exc: BaseException) -> None:
        now = time.time()
        error = f"the pool could not run it: {type(exc).__name__}: {exc}"
        with self.lock:
            attempts = {job_id: self.held[job_id].task.attempt for job_id in ids if job_id in self.held}
        self._settle([JobResult(job_id, attempt, _FAILED, error=error, started=now, ended=now)
                      for job_id, attempt in attempts.items()], (number,))

    def _settle(self, results: List[JobResult], chunks: Iterable[int]) -> None:
        """Jobs ended: learn their durations, refill the pool, report them. `chunks` are the pool
        tasks these results close (the sweep closes those of dead workers; closing twice is a no-op)."""
        finished = []
        samples = []
        with self.lock:
            self.in_pool.difference_update(chunks)
            for result in results:
                job_id = result.job_id
                held = self.held.pop(job_id, None)
                if held is None:
                    continue  # already settled (e.g. its worker was declared dead)
                if result.state == _CANCELLED and job_id in self.releasing:
                    self.releasing.discard(job_id)
                    result = result._replace(state=RELEASED)
                elif result.state == _DONE or result.state == _FAILED:
                    samples.append((kind_of(held.task), result.ended - result.started))
                self.cancel_requested.discard(job_id)
                finished.append(result)
            self.pacing.learn(samples)
            self._feed()
        if self.verbose:
            for result in finished:
                print(f"Finished job: {result.job_id} ({result.state})", flush=True)
        if finished:
            self.report(finished)

    # ---- cancel and release -------------------------------------------------------------

    def cancel(self, job_ids: List[int]) -> None:
        """Cancel jobs the master says to: unstarted ones here at once, running ones by signal."""
        now = time.time()
        wanted = set(job_ids)
        with self.lock:
            unstarted = [task for task in self.waiting if task.job_id in wanted]
            if unstarted:
                self.waiting = deque(task for task in self.waiting if task.job_id not in wanted)
                for task in unstarted:
                    del self.held[task.job_id]
            targets = [self.held[job_id] for job_id in job_ids if job_id in self.held]
            self.cancel_requested.update(held.task.job_id for held in targets)
            self._mark_cancelled([held.task.job_id for held in targets])
        for held in targets:
            if held.pgid:
                execute.kill_group(held.pgid)
            elif held.worker and held.task.func:
                _signal(held.worker, signal.SIGUSR1)  # the worker raises in the callable if it is this job
            log.info("cancel job %s", held.task.job_id)
        if unstarted:
            self.report([JobResult(task.job_id, task.attempt, _CANCELLED, error="cancelled before it started",
                                   started=now, ended=now) for task in unstarted])

    def _mark_cancelled(self, job_ids: List[int]) -> None:
        """Publish ids in the shared ring the workers read before and during each job (lock held)."""
        if not job_ids:
            return
        ring = self.cancel_ring
        for job_id in job_ids:
            ring[self.cancel_next] = job_id
            self.cancel_next = self.cancel_next % CANCEL_RING + 1
        ring[0] += 1

    def _release_unstarted(self) -> None:
        """While draining, hand back jobs that have not started: they run elsewhere sooner.
        Those still waiting here go back at once; those already in the pool's queue are stopped
        through the cancel ring and reported as released when their worker skips them."""
        with self.lock:
            waiting = list(self.waiting)
            self.waiting.clear()
            for task in waiting:
                del self.held[task.job_id]
            in_pool = [job_id for job_id, held in self.held.items() if not held.worker and job_id not in self.releasing]
            self.releasing.update(in_pool)
            self._mark_cancelled(in_pool)
        if waiting:
            self.report([released(task, "handed back: the agent is draining") for task in waiting])

    # ---- the events thread: which worker runs what, timeouts, dead workers --------------

    def _watch_events(self) -> None:
        last_sweep = 0.0
        while not self.closed.is_set():
            try:
                event = self.events.recv() if self.events.poll(EVENT_POLL_SECONDS) else None
            except (OSError, EOFError, ValueError):
                return  # the pipe is closed: the pool is gone
            if event is not None:
                self._apply_event(event)
            now = time.time()
            if now - last_sweep >= SWEEP_SECONDS:
                last_sweep = now
                if self.draining.is_set():
                    self._release_unstarted()
                self._sweep(now)

    def _apply_event(self, event: Tuple[Any, ...]) -> None:
        """One message from a worker (their shapes are listed atop execute.py)."""
        kind = event[0]
        if kind == "worker":
            self.workers.add(event[1])
            return
        starting: List[int] = []
        with self.lock:
            if kind == "chunk":
                _, pid, starting, started = event
                for job_id in starting:
                    held = self.held.get(job_id)
                    if held is not None:
                        held.worker, held.started = pid, started
            elif kind == "output":
                _, job_id, out, err = event
                held = self.held.get(job_id)
                if held is not None:
                    held.output = (out, err)
                    self.live_changed.add(job_id)
            elif kind == "pgid":
                _, job_id, pgid, _ = event
                held = self.held.get(job_id)
                if held is not None:
                    held.pgid = pgid
                    if job_id in self.cancel_requested:
                        execute.kill_group(pgid)
        if self.verbose:
            for job_id in starting:
                print(f"Run job: {job_id}", flush=True)

    def _sweep(self, now: float) -> None:
        """Settle the jobs whose worker died, and callables past timeout + grace (their worker is
        killed). A worker is known from its announcement and dead once its pid is gone; the pool
        starts a replacement by itself, which announces itself in turn."""
        gone = {pid for pid in self.workers if _gone(pid)}
        self.workers -= gone
        for pid in gone:  # what its job started may live on without it: the rest of the job goes too
            contain.worker_gone(self.containment, pid)
        dead: List[JobResult] = []
        chunks: Set[int] = set()
        with self.lock:
            for job_id, held in self.held.items():
                task = held.task
                if not held.worker:
                    continue
                if task.func is not None and task.timeout and now - held.started > task.timeout + self.hard_kill_grace:
                    contain.kill_worker(self.containment, held.worker)  # and all its callable started
                    error, state = f"timed out after {task.timeout:g}s; its worker was killed", _TIMEOUT
                elif held.worker not in self.workers:
                    error, state = "the pool worker running it died (killed, or the job exited the process)", _FAILED
                else:
                    continue
                chunks.add(held.chunk)
                dead.append(JobResult(job_id, task.attempt, state, error=error, started=held.started, ended=now))
        if dead:
            self._settle(dead, chunks)

    # ---- the end ------------------------------------------------------------------------

    def stop(self) -> Set[int]:
        """Stop the pool and its workers; returns the ids of the jobs still held, which were killed
        (with all their processes). With nothing held, a clean stop."""
        self.closed.set()
        with self.lock:
            killed = set(self.held)
            pgids = [held.pgid for held in self.held.values() if held.pgid]
        for pgid in pgids:
            execute.kill_group(pgid)  # a shell job's own session: terminating its worker would leave it running
        # close + terminate, not join() alone: a worker killed mid-chunk leaves an orphaned pool task
        # behind that join() would wait on forever (`Pool.__exit__` terminates too).
        self.pool.close()
        self.pool.terminate()
        self.pool.join()
        contain.release(self.containment)  # the workers are gone: anything a job left goes now
        self.watcher.join(timeout=2 * EVENT_POLL_SECONDS + 1)
        self.events.close()
        return killed

    def held_tasks(self) -> List[Tuple[Task, float]]:
        """The tasks held, each with when its worker started it (0.0: not started)."""
        with self.lock:
            return [(held.task, held.started) for held in self.held.values()]


def _signal(pid: int, signum: int) -> None:
    try:
        os.kill(pid, signum)
    except ProcessLookupError:
        pass


def _gone(pid: int) -> bool:
    """Whether no process has this pid (one of another user's holding it is not ours, but exists)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False
