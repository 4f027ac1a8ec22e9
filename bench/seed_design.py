"""The seed's design ported to Python 3: a BaseManager serving a dispatched and a finished Queue, slaves doing get → run → put.

Faithful to the seed (`/work/shared/seed/`): the master registers two `queue.Queue`s on a
BaseManager and starts its server process with `manager.start()`; the master puts `Job`
objects one per proxied call; each slave connects its own manager and loops
`dispatched.get(timeout=1)` → run the job → `finished.put(job)`, one job per proxied call.

What changed, and why:
- Python 3: `queue.Queue`, bytes authkey, `print` gone (no output while timing).
- The server listens on 127.0.0.1 with a random 32-byte authkey and a free port, not
  `0.0.0.0:8888` with `authkey='jobs'`.
- The queues and the functions returning them live at module level and are registered on a
  BaseManager subclass (the seed used bound methods on `BaseManager` itself): under spawn the
  registry is pickled to the server process, and bound methods of an object holding queues
  cannot be (STYLE.md habit 9). The server still holds exactly two plain queues.
- `Job` keeps `job_id` and gains what to run (`func` + `args`, or a shell `command`) and its
  `result`, so the job does something and the master can check the answer.
- A slave survives `queue.Empty` (the seed's slave died after 1 s idle), stops at a `None`
  sentinel or its lifetime, and says "ready" once connected so timing starts with every
  slave in place.
- W3 needs 4 jobs in parallel per slave: a slave then runs 4 threads, each with its own
  manager connection (proxies are not thread-safe) and the same get → run → put loop.
"""

from __future__ import annotations

import multiprocessing
import os
import queue
import threading
import time
from multiprocessing.managers import BaseManager
from typing import Any, Callable, List, Optional, Tuple

from . import Deadline, Params, latency_summary, rss_mb
from .jobs import inc, shell

# spawn, not Linux's default fork: the bench's own process has threads (collectors), and
# forking a threaded process is unsafe; spawn is also what Python 3.14+ does by default.
CTX = multiprocessing.get_context("spawn")

READY = "ready"  # what a slave thread puts on `finished` once connected


class Job:
    """The seed's Job (job_id), plus what to run and where its result goes."""

    def __init__(
        self,
        job_id: int,
        func: Optional[Callable[..., Any]] = None,
        args: Tuple[Any, ...] = (),
        command: Optional[str] = None,
    ) -> None:
        self.job_id = job_id
        self.func = func
        self.args = args
        self.command = command
        self.result: Any = None

    def run(self) -> None:
        if self.command is not None:
            self.result = shell(self.command)
        elif self.func is not None:
            self.result = self.func(*self.args)


# The two queues: they exist in the manager's server process (its import of this module).
_dispatched_job_queue: "queue.Queue[Any]" = queue.Queue()
_finished_job_queue: "queue.Queue[Any]" = queue.Queue()


def get_dispatched_job_queue() -> "queue.Queue[Any]":
    return _dispatched_job_queue


def get_finished_job_queue() -> "queue.Queue[Any]":
    return _finished_job_queue


class SeedManager(BaseManager):
    """The seed's manager: two queues, nothing else."""


SeedManager.register("get_dispatched_job_queue", callable=get_dispatched_job_queue)
SeedManager.register("get_finished_job_queue", callable=get_finished_job_queue)


def _connect(address: Tuple[str, int], authkey: bytes) -> Tuple[Any, Any, SeedManager]:
    manager = SeedManager(address=address, authkey=authkey)
    manager.connect()
    return manager.get_dispatched_job_queue(), manager.get_finished_job_queue(), manager


# --- slave ------------------------------------------------------------------------------


def _slave_loop(address: Tuple[str, int], authkey: bytes, end: float) -> None:
    """The seed's slave loop, bounded by `end` (time.monotonic) and a `None` sentinel."""
    dispatched_jobs, finished_jobs, _manager = _connect(address, authkey)
    finished_jobs.put(READY)
    while time.monotonic() < end:
        try:
            job = dispatched_jobs.get(timeout=1)
        except queue.Empty:
            continue
        if job is None:
            break
        job.run()
        finished_jobs.put(job)


def slave_main(address: Tuple[str, int], authkey: bytes, threads: int, lifetime: float) -> None:
    """One slave process: one loop (as in the seed), or `threads` loops each with its own connection."""
    end = time.monotonic() + lifetime
    if threads == 1:
        _slave_loop(address, authkey, end)
        return
    loops = [
        threading.Thread(target=_slave_loop, args=(address, authkey, end), name=f"slave-{i}", daemon=True)
        for i in range(threads)
    ]
    for loop in loops:
        loop.start()
    for loop in loops:
        loop.join(max(0.0, end - time.monotonic()) + 2.0)


# --- master -----------------------------------------------------------------------------


class SeedMaster:
    """The seed's master: starts the manager's server process, puts jobs, takes finished ones."""

    def __init__(self, params: Params) -> None:
        self.params = params
        self.authkey = os.urandom(32)
        self.manager = SeedManager(address=("127.0.0.1", 0), authkey=self.authkey, ctx=CTX)
        self.slaves: List[Any] = []
        self.consumers = 0
        self.dispatched_jobs: Any = None
        self.finished_jobs: Any = None

    def start(self) -> None:
        self.manager.start()
        self.dispatched_jobs = self.manager.get_dispatched_job_queue()
        self.finished_jobs = self.manager.get_finished_job_queue()

    @property
    def server_pid(self) -> int:
        """The manager's server process: where the queued jobs live (BaseManager has no public pid)."""
        return self.manager._process.pid  # type: ignore[attr-defined]

    @property
    def address(self) -> Tuple[str, int]:
        return self.manager.address  # type: ignore[return-value]

    def start_slaves(self, count: int, threads: int, lifetime: float) -> None:
        """Start `count` slave processes of `threads` loops each; return once every loop said ready."""
        for i in range(count):
            slave = CTX.Process(
                target=slave_main,
                args=(self.address, self.authkey, threads, lifetime),
                name=f"seed-slave-{i + 1}",
                daemon=True,
            )
            slave.start()
            self.slaves.append(slave)
        self.consumers = count * threads
        deadline = Deadline(self.params.start_budget, "seed slaves to connect")
        ready = 0
        while ready < self.consumers:
            deadline.check()
            dead = [s.name for s in self.slaves if not s.is_alive()]
            if dead:
                raise RuntimeError(f"seed slave(s) exited before ready: {', '.join(dead)}")
            try:
                item = self.finished_jobs.get(timeout=min(1.0, deadline.remaining(0.01)))
            except queue.Empty:
                continue
            if item == READY:
                ready += 1

    def stop_slaves(self) -> None:
        """Sentinel per loop, then join; whoever is still alive is terminated."""
        if self.slaves and self.dispatched_jobs is not None:
            try:
                for _ in range(self.consumers):
                    self.dispatched_jobs.put(None)
            except (OSError, EOFError):
                pass  # the server is gone: the slaves will be terminated below
        deadline = Deadline(self.params.stop_budget, "seed slaves to stop")
        for slave in self.slaves:
            slave.join(deadline.remaining())
        for slave in self.slaves:
            if slave.is_alive():
                slave.terminate()
                slave.join(2.0)
            if slave.is_alive():
                slave.kill()
                slave.join(2.0)
        self.slaves = []
        self.consumers = 0

    def close(self) -> None:
        try:
            self.stop_slaves()
        finally:
            process = getattr(self.manager, "_process", None)
            if process is not None:
                self.manager.shutdown()  # joins the server with a timeout, terminates it if need be
                process.join(2.0)
                if process.is_alive():
                    process.kill()
                    process.join(2.0)

    def __enter__(self) -> "SeedMaster":
        self.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


# --- workloads --------------------------------------------------------------------------


def _put_and_collect(master: SeedMaster, jobs: List[Job], deadline: Deadline) -> List[Job]:
    """Put every job (one proxied call each) while a second connection takes finished ones.

    The seed's master put 10 then took until the queue emptied; collecting on a thread of its
    own (its own connection, as proxies are not thread-safe) overlaps the two and only helps
    the seed's figures.
    """
    finished: List[Job] = []
    errors: List[BaseException] = []

    def collect() -> None:
        try:
            _, finished_jobs, _manager = _connect(master.address, master.authkey)
            while len(finished) < len(jobs) and not deadline.expired():
                try:
                    finished.append(finished_jobs.get(timeout=min(1.0, deadline.remaining(0.01))))
                except queue.Empty:
                    continue
        except BaseException as exc:  # noqa: BLE001 - handed to the caller below
            errors.append(exc)

    collector = threading.Thread(target=collect, name="seed-collector", daemon=True)
    collector.start()
    for job in jobs:
        master.dispatched_jobs.put(job)
    collector.join(deadline.remaining())
    if errors:
        raise errors[0]
    deadline.check()
    if len(finished) != len(jobs):
        raise RuntimeError(f"seed: {len(finished)} of {len(jobs)} jobs came back")
    return finished


def w1_throughput(master: SeedMaster, params: Params) -> dict:
    warm = [Job(-1 - i, inc, (i,)) for i in range(params.w1_warmup)]
    _put_and_collect(master, warm, Deadline(params.w1_budget, "seed W1 warm-up"))
    jobs = [Job(i, inc, (i,)) for i in range(params.w1_jobs)]
    deadline = Deadline(params.w1_budget, "seed W1")
    t0 = time.perf_counter()
    finished = _put_and_collect(master, jobs, deadline)
    elapsed = time.perf_counter() - t0
    total = sum(job.result for job in finished)
    expected = sum(i + 1 for i in range(params.w1_jobs))
    if total != expected:
        raise RuntimeError(f"seed W1: sum of results {total}, expected {expected}")
    return {"w1_jobs_per_s": params.w1_jobs / elapsed, "w1_seconds": elapsed, "w1_jobs": params.w1_jobs}


def w2_latency(master: SeedMaster, params: Params) -> dict:
    deadline = Deadline(params.w2_budget, "seed W2")
    samples: List[float] = []
    for i in range(params.w2_warmup + params.w2_jobs):
        deadline.check()
        t0 = time.perf_counter()
        master.dispatched_jobs.put(Job(i, inc, (i,)))
        job = master.finished_jobs.get(timeout=deadline.remaining(0.01))
        t1 = time.perf_counter()
        if job.result != i + 1:
            raise RuntimeError(f"seed W2: job {i} returned {job.result!r}")
        if i >= params.w2_warmup:
            samples.append(t1 - t0)
    return latency_summary(samples)


def w3_parallel_sleep(master: SeedMaster, params: Params) -> dict:
    jobs = [Job(i, command=params.w3_command) for i in range(params.w3_jobs)]
    deadline = Deadline(params.w3_budget, "seed W3")
    t0 = time.perf_counter()
    finished = _put_and_collect(master, jobs, deadline)
    elapsed = time.perf_counter() - t0
    failed = [job.job_id for job in finished if job.result != 0]
    if failed:
        raise RuntimeError(f"seed W3: {len(failed)} jobs exited non-zero")
    return {"w3_wall_s": elapsed}


def m_memory(params: Params) -> dict:
    """A fresh manager with no slave: queue m_jobs `true` jobs, read the server process's RSS."""
    with SeedMaster(params) as master:
        idle = rss_mb(master.server_pid)
        deadline = Deadline(params.m_budget, "seed M")
        for i in range(params.m_jobs):
            if i % 1000 == 0:
                deadline.check()
            master.dispatched_jobs.put(Job(i, command="true"))
        if master.dispatched_jobs.qsize() != params.m_jobs:
            raise RuntimeError("seed M: queue size is not the number of jobs put")
        time.sleep(0.2)  # let the server settle before reading
        return {"m_rss_mb": rss_mb(master.server_pid), "m_idle_rss_mb": idle, "m_jobs": params.m_jobs}


def run(params: Params, step: Callable[[str], None], record: Callable[[str, Callable[[], dict]], None]) -> None:
    """All workloads on the seed design; `record(name, fn)` runs one, keeping its figures or its error."""
    step("seed: starting manager and 2 single-loop slaves")
    with SeedMaster(params) as master:
        master.start_slaves(params.workers, threads=1, lifetime=params.w1_budget + params.w2_budget + 60)
        record("W1", lambda: w1_throughput(master, params))
        record("W2", lambda: w2_latency(master, params))
        master.stop_slaves()
        step(f"seed: {params.workers} slaves × {params.slots} threads for W3")
        master.start_slaves(params.workers, threads=params.slots, lifetime=params.w3_budget + 60)
        record("W3", lambda: w3_parallel_sleep(master, params))
    step("seed: fresh manager for M")
    record("M", lambda: m_memory(params))
