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
CANCEL_RING = 256  # attempts the workers can be told to cancel at once (a ring: the oldest are overwritten)
SWEEP_SECONDS = 0.5  # how often dead workers and overdue callables are looked for
EVENT_POLL_SECONDS = 0.2
TERMINATE_SECONDS = 5.0  # how long Pool.terminate() may take before its workers are killed outright

# JobState values as plain strings: results are compared per job, on the hot path.
_DONE, _FAILED = JobState.DONE.value, JobState.FAILED.value
_CANCELLED, _TIMEOUT = JobState.CANCELLED.value, JobState.TIMEOUT.value

Report = Callable[[List[JobResult]], None]
# What the agent holds, runs, reports and kills: one attempt of one job (protocol.Attempt's fields), never a
# job id alone: the master may send a job again (a new attempt) while an older attempt still runs here.
Key = Tuple[int, int]


def key_of(item: Any) -> Key:
    """The (job id, attempt) of a Task or a JobResult."""
    return (item.job_id, item.attempt)


def released(task: Task, why: str, started: float = 0.0) -> JobResult:
    """A result that gives a task back to the master, to be queued again: never started (started 0),
    or started and killed by this agent's stop (the master keeps that attempt as interrupted)."""
    return JobResult(task.job_id, task.attempt, RELEASED, error=why, started=started,
                     ended=time.time() if started else 0.0)


class _Held:
    """What the agent knows of one job it holds (taken, not yet settled)."""

    __slots__ = ("task", "chunk", "worker", "pgid", "started", "began", "output")

    def __init__(self, task: Task) -> None:
        self.task = task
        self.chunk = 0  # the pool task (chunk number) carrying it, once fed to the pool
        self.worker = 0  # the pool worker's pid once its chunk started
        self.pgid = 0  # the shell's process group, for shell jobs
        self.started = 0.0  # when its chunk (or, once known, the job itself) started in its worker
        self.began = 0.0  # when its process (shell) or call (callable) started: 0 while only assigned
        self.output: Optional[Tuple[bytes, bytes]] = None  # the latest (stdout, stderr) tails while it runs


class Holding(NamedTuple):
    """What a report tells the master of the jobs held here."""

    running: List[Key]  # the attempts held here (taken, not yet settled)
    wanted: int  # the credit: how many more jobs to send
    live: Dict[int, Tuple[bytes, bytes]]  # job id -> (stdout, stderr) tails that changed since the last report
    began: List[Tuple[int, int, float]]  # (job id, attempt, when it started) of every held attempt that has started


class JobPool:
    """The pool's workers and the jobs this agent holds: taken from the master, not yet settled.

    The session's take and report loops call accept() and cancel(); the pool's result thread calls
    back with finished chunks; the events thread here follows the workers and sweeps. Settled
    results go to `report` (the outbox) under the lock that guards the held attempts, so an attempt
    is always either held or in the outbox: a report's list of what runs here never misses one.
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
        self.held: Dict[Key, _Held] = {}
        self.waiting: Deque[Task] = deque()  # held, not yet fed to the pool (cancelled or released here)
        self.in_pool: Set[int] = set()  # chunk numbers fed to the pool and not yet settled
        self.next_chunk = 1
        self.releasing: Set[Key] = set()  # in the pool's queue while draining: handed back once skipped
        self.cancel_requested: Set[Key] = set()
        self.live_changed: Set[Key] = set()
        self.workers: Set[int] = set()  # pids the workers announced, less those seen gone (events thread only)
        self.closed = threading.Event()
        self.began_news = threading.Event()  # a held job started since the last holding(): worth a report now
        # forkserver: the agent has threads, and fork() from a threaded process can deadlock;
        # forkserver workers start from a clean single-threaded server, and cheaply.
        method = "forkserver" if "forkserver" in multiprocessing.get_all_start_methods() else "spawn"
        ctx = multiprocessing.get_context(method)
        self.events, events_writer = ctx.Pipe(duplex=False)
        self.cancel_ring: Any = ctx.Array("q", 1 + 2 * CANCEL_RING, lock=False)
        self.cancel_next = 1
        self.pool = ctx.Pool(slots, execute.init_worker,
                             (events_writer, ctx.Lock(), self.cancel_ring, os.getpid(), self.containment))
        self.watcher = threading.Thread(target=self._watch_events, name="events", daemon=True)
        self.watcher.start()

    # ---- what the session asks ----------------------------------------------------------

    def wanted(self) -> int:
        with self.lock:
            return self.pacing.wanted(len(self.held))

    def held_keys(self) -> Set[Key]:
        with self.lock:
            return set(self.held)

    def idle(self) -> bool:
        with self.lock:
            return not self.held

    def holding(self, draining: bool) -> Holding:
        with self.lock:
            live = {}
            for key in sorted(self.live_changed):  # two attempts of one job here: the newer one's output shows
                held = self.held.get(key)
                if held is not None and held.output is not None:
                    live[key[0]] = held.output
            self.live_changed.clear()
            wanted = 0 if draining else self.pacing.wanted(len(self.held))
            # Every start, in every report (not only the new ones): the master takes each once, and a
            # report it could not journal, or a master restarted meanwhile, loses none.
            began = [(job_id, attempt, held.began) for (job_id, attempt), held in self.held.items() if held.began]
            self.began_news.clear()
            return Holding(list(self.held), wanted, live, began)

    # ---- work in ------------------------------------------------------------------------

    def accept(self, tasks: List[Task]) -> None:
        """Hold the tasks the master sent and feed the pool; hand back those pacing does not keep."""
        with self.lock:
            kept: List[Task] = []
            back = tasks
            if not self.draining.is_set():
                kept, back = self.pacing.admit(tasks, len(self.held), self.waiting)
            fresh = [task for task in kept if key_of(task) not in self.held]  # the same attempt twice: held once
            for task in fresh:
                self.held[key_of(task)] = _Held(task)
            self.waiting.extend(fresh)
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
            keys = []
            for task in chunk:
                self.held[key_of(task)].chunk = number
                keys.append(key_of(task))
            self.pool.apply_async(execute.run_chunk, ([tuple(task) for task in chunk],),
                                  callback=functools.partial(self._on_chunk, number),
                                  error_callback=functools.partial(self._on_chunk_error, number, keys))

    # ---- results out --------------------------------------------------------------------

    def _on_chunk(self, number: int, rows: List[Tuple[Any, ...]]) -> None:
        """Pool callback (its result thread): a chunk's packed results."""
        self._settle([JobResult._make(row) for row in rows], (number,))

    def _on_chunk_error(self, number: int, keys: List[Key], exc: BaseException) -> None:
        now = time.time()
        error = f"the pool could not run it: {type(exc).__name__}: {exc}"
        self._settle([JobResult(job_id, attempt, _FAILED, error=error, started=now, ended=now)
                      for job_id, attempt in keys], (number,))

    def _settle(self, results: List[JobResult], chunks: Iterable[int]) -> None:
        """Jobs ended: learn their durations, refill the pool, report them. `chunks` are the pool
        tasks these results close (the sweep closes those of dead workers; closing twice is a no-op)."""
        finished = []
        samples = []
        with self.lock:
            self.in_pool.difference_update(chunks)
            for result in results:
                key = key_of(result)
                held = self.held.pop(key, None)
                if held is None:
                    continue  # already settled (e.g. its worker was declared dead)
                if result.state == _CANCELLED and key in self.releasing:
                    self.releasing.discard(key)
                    result = result._replace(state=RELEASED)
                elif result.state == _DONE or result.state == _FAILED:
                    samples.append((kind_of(held.task), result.ended - result.started))
                self.cancel_requested.discard(key)
                self.live_changed.discard(key)
                finished.append(result)
            self.pacing.learn(samples)
            self._feed()
            if finished:
                self.report(finished)  # under the lock: from held to the outbox in one step
        if self.verbose:
            for result in finished:
                print(f"Finished job: {result.job_id} ({result.state})", flush=True)

    # ---- cancel and release -------------------------------------------------------------

    def cancel(self, keys: List[Key]) -> None:
        """Cancel the attempts the master says to: unstarted ones here at once, running ones by signal.
        Another attempt of the same job held here is left alone."""
        now = time.time()
        wanted = set(keys)
        with self.lock:
            unstarted = [task for task in self.waiting if key_of(task) in wanted]
            if unstarted:
                self.waiting = deque(task for task in self.waiting if key_of(task) not in wanted)
                for task in unstarted:
                    del self.held[key_of(task)]
                self.report([JobResult(task.job_id, task.attempt, _CANCELLED, error="cancelled before it started",
                                       started=0.0, ended=now) for task in unstarted])  # it never ran
            targets = [self.held[key] for key in wanted if key in self.held]
            self.cancel_requested.update(key_of(held.task) for held in targets)
            self._mark_cancelled([key_of(held.task) for held in targets])
        for held in targets:
            if held.pgid:
                execute.kill_group(held.pgid)
            elif held.worker and held.task.func:
                _signal(held.worker, signal.SIGUSR1)  # the worker raises in the callable if it is this job
            log.info("cancel job %s attempt %s", held.task.job_id, held.task.attempt)

    def _mark_cancelled(self, keys: List[Key]) -> None:
        """Publish attempts in the shared ring the workers read before and during each job (lock held)."""
        if not keys:
            return
        ring = self.cancel_ring
        for job_id, attempt in keys:
            slot = 2 * self.cancel_next - 1
            ring[slot], ring[slot + 1] = job_id, attempt
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
                del self.held[key_of(task)]
            in_pool = [key for key, held in self.held.items() if not held.worker and key not in self.releasing]
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
        starting: List[Key] = []
        with self.lock:
            if kind == "chunk":
                _, pid, starting, started = event
                for key in starting:
                    held = self.held.get(key)
                    if held is not None:
                        held.worker, held.started = pid, started
                        if key in self.cancel_requested and held.task.func:
                            # cancelled before we knew its worker: cancel() could not signal it then
                            _signal(pid, signal.SIGUSR1)
            elif kind == "output":
                _, key, out, err = event
                held = self.held.get(key)
                if held is not None:
                    held.output = (out, err)
                    self.live_changed.add(key)
            elif kind == "pgid":
                _, key, pgid, began = event
                held = self.held.get(key)
                if held is not None:
                    held.pgid, held.began = pgid, began
                    self.began_news.set()
                    if key in self.cancel_requested:
                        execute.kill_group(pgid)
            elif kind == "start":
                _, key, began = event
                held = self.held.get(key)
                if held is not None:
                    # Its own start, not its chunk's: a callable's timeout counts from here (the sweep).
                    held.began = held.started = began
                    self.began_news.set()
        if self.verbose:
            for job_id, attempt in starting:
                print(f"Run job: {job_id}" + (f" (attempt {attempt})" if attempt > 1 else ""), flush=True)

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
            for held in self.held.values():
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
                dead.append(JobResult(task.job_id, task.attempt, state, error=error, started=held.started, ended=now))
        if dead:
            self._settle(dead, chunks)

    # ---- the end ------------------------------------------------------------------------

    def stop(self) -> Set[Key]:
        """Stop the pool and its workers; returns the attempts still held, which were killed
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
        # Pool.terminate() itself can wait for ever: a worker it terminates while that worker holds the
        # result queue's lock (sending the result of a job just killed above) never releases it, and the
        # pool's task handler then blocks on that lock, which terminate() joins (seen in a forced stop:
        # faulthandler's stacks in tests/test_jobs.py). So it runs where it can be given up on; then the
        # workers are killed outright and the stuck pool threads (daemons) are left to the exit.
        stopper = threading.Thread(target=self.pool.terminate, name="pool-terminate", daemon=True)
        stopper.start()
        stopper.join(TERMINATE_SECONDS)
        if stopper.is_alive():
            log.warning("the job pool did not stop within %.0fs (a worker died holding its result queue's"
                        " lock): killing its workers", TERMINATE_SECONDS)
            for process in list(getattr(self.pool, "_pool", [])):  # the Pool's worker processes
                if process.pid:
                    _signal(process.pid, signal.SIGKILL)
        else:
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
