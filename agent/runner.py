"""The agent's supervisor: connect with backoff, register, serve sessions (take and report loops), signals, stop."""

from __future__ import annotations

import dataclasses
import faulthandler
import logging
import signal
import socket
import sys
import threading
import time
from multiprocessing import AuthenticationError
from pathlib import Path
from typing import Any, Callable, List, Optional, Set, Tuple

from . import codecache, contain
from .connection import Backoff, call, drop, open_proxy
from .errors import CorralError, JournalFailed, NameTaken
from .pool import Holding, JobPool, released
from .protocol import (RELEASED, REPORT_RESULTS, SCHEDULER_TYPEID, AgentInfo, JobResult, Task, pack_attempts,
                       pack_results, pack_starts)
from .spool import Outbox, Spool

log = logging.getLogger(__name__)

HEARTBEAT_SECONDS = 1.0
# The master holds a take() this long when it has no work (long poll; the most it allows). New work and
# cancels end it at once: the length only sets how often an idle agent calls (200 idle agents: 40 takes/s).
TAKE_WAIT_SECONDS = 5.0
BACKOFF_FIRST_SECONDS = 0.5
BACKOFF_CAP_SECONDS = 10.0
TICK_SECONDS = 0.05  # how often the supervisor looks at its flags
SESSION_JOIN_SECONDS = 3.0  # a session's loops end within one long poll; never wait on them longer
# Deadlines (agent/connection.py): a call not answered by then is abandoned, its connection dropped,
# and the agent registers again, as after a master restart. The margin is what a call may take beyond
# its own long poll on a loaded master (a crowd registering, a journal write). Too short costs more than
# too long: on 2 cores at load 100, 100 agents joining saw honest takes answered after 15 s, and each
# abandoned call re-registered its agent, which then missed its lease while it did (declared lost).
CALL_MARGIN_SECONDS = 20.0
REPORT_BYTES_PER_SECOND = 1024 * 1024  # a report's deadline grows by a second for each MiB it carries
STEADY_SECONDS = 30.0  # a session that lasted this long ended by chance: register again at once
JOURNAL_RETRY_SECONDS = 1.0  # a master whose journal refuses writes is asked again this often


def connect(address: Tuple[str, int], authkey: bytes) -> Any:
    """A scheduler proxy (one connection to make it; then one per thread that calls it), within CONNECT_SECONDS."""
    return open_proxy(address, authkey, SCHEDULER_TYPEID)


def report_seconds(results: List[JobResult]) -> float:
    """A report's deadline: the margin, plus the time to move what its results carry."""
    size = sum(len(r.value or b"") + len(r.stdout) + len(r.stderr) + len(r.traceback) for r in results)
    return CALL_MARGIN_SECONDS + size / REPORT_BYTES_PER_SECOND


class Agent:
    """One agent process: a supervisor around a pool of workers (agent/pool.py).

    Like huey's consumer: signal handlers only set flags and the supervisor's loop acts on them.
    The first SIGTERM/SIGINT drains (take nothing more, hand back what has not started, finish
    the rest, report, exit 0); a second one kills every job and leaves (exit 1). Between sessions
    it reconnects with capped backoff; what finished meanwhile waits in the outbox and its spool.
    """

    def __init__(
        self,
        address: Tuple[str, int],
        authkey: bytes,
        info: AgentInfo,
        verbose: bool = False,
        locate: Optional[Callable[[], Tuple[str, int]]] = None,
        spool: Optional[Path] = None,
        name_is_default: bool = False,
        containment: Optional[contain.Containment] = None,
    ) -> None:
        self.containment = containment
        self.address = address
        # Where to look the master up again before each (re)connect: a restarted master may
        # listen on a new port (read from the state directory); None when --connect fixed it.
        self.locate = locate
        self.authkey = authkey
        self.info = info
        self.verbose = verbose
        self.name_is_default = name_is_default
        # Results the master has not acknowledged survive a restart of this agent in
        # <spool dir>/<name>.pickle (the name is final once registered).
        self.spool_dir = spool
        self.outbox = Outbox()
        self.pool: Optional[JobPool] = None
        self.session = ""
        self.scheduler: Any = None  # the session's proxy, shared by its loops (each on its own connection)
        self.draining = threading.Event()
        self.drain_said = False  # whether the log said we drain
        self.stopping = threading.Event()  # second signal: kill everything and leave
        self.disconnected = threading.Event()
        self.journal_failing = threading.Event()  # the master said its journal refuses writes; logged once
        self.pool_ready = threading.Event()  # the pool exists: the take and report loops may start
        self.stop_signals = 0
        # How many tasks this session has received and settled into the pool or the outbox: a report
        # says so, and the master only re-queues an attempt missing from our list once we have every
        # task it sent (a take reply still on its way is not "missing").
        self.received = 0
        self.received_lock = threading.Lock()
        # Shipped code: fetched from the master before a task that needs it reaches the pool.
        self.code = codecache.CodeCache(lambda digest: codecache.fetch(self.address, self.authkey, digest),
                                        verbose=verbose)

    # ---- signals: handlers only set flags; the loops act -------------------------------

    def on_signal(self, signum: int, frame: Any) -> None:
        self.stop_signals += 1
        if self.stop_signals == 1:
            self.draining.set()
        else:
            self.stopping.set()

    # ---- the supervisor -----------------------------------------------------------------

    def run(self) -> int:
        """Run until drained (exit 0) or stopped by a second signal (exit 1). NameTaken (another
        live agent has our chosen name) ends it too: the caller says so and exits 2."""
        if self.spool_dir is not None and not self.name_is_default:
            # The name is fixed: read the spool before the first register, so its jobs are among
            # those we say we hold (the master keeps them ours instead of re-queueing them).
            self._attach_spool()
        backoff = Backoff(BACKOFF_FIRST_SECONDS, BACKOFF_CAP_SECONDS)
        try:
            while not self.stopping.is_set():
                try:
                    self._register()
                except NameTaken:
                    raise
                except AuthenticationError as exc:
                    if not self.session:
                        raise  # the first master we reach holds another key: the caller says so and exits 1
                    # Registered before: the port may now be another cluster's master, or ours restarted
                    # with a new key; wait for ours as for any master that does not answer.
                    pause = backoff.next()
                    log.warning("master %s:%s refused our authkey (%s); retrying in %.1fs", *self.address, exc, pause)
                    self._sleep(pause)
                    continue
                except (OSError, EOFError, CorralError) as exc:
                    if self.draining.is_set() and self._idle():
                        break
                    pause = backoff.next()
                    if isinstance(exc, JournalFailed):  # reachable, but it could not journal what we hand back
                        log.warning("master %s:%s could not register us: %s; retrying in %.1fs", *self.address,
                                    exc.message, pause)
                    else:
                        log.warning("master %s:%s unreachable (%s); retrying in %.1fs", *self.address, exc, pause)
                    self._sleep(pause)
                    continue
                if self.outbox.spool is None and self.spool_dir is not None:
                    self._attach_spool()
                began = time.monotonic()
                self._serve_session()
                if self.draining.is_set() and self._drained():
                    break
                self.outbox.save()
                if self.stopping.is_set():
                    break
                if time.monotonic() - began >= STEADY_SECONDS:
                    backoff.reset()  # it worked for a while: the master went away once; register again now
                else:
                    # Sessions that break at once (a master answering register but nothing else) must
                    # not become a loop of registers: back off as for a master that does not answer.
                    self._sleep(backoff.next())
        finally:
            self._stop_pool()
        return 1 if self.stopping.is_set() else 0

    def _attach_spool(self) -> None:
        assert self.spool_dir is not None
        self.outbox.attach(Spool(self.spool_dir / f"{self.info.name}.pickle"))

    def _register(self) -> None:
        """Open a session with the master, telling it which attempts are still ours."""
        if self.locate is not None:
            self.address = self.locate()
        scheduler = connect(self.address, self.authkey)
        with self.received_lock:
            self.received = 0  # a new session counts its tasks afresh, as the master does
        try:
            while True:
                try:
                    reply = call(scheduler, "register", CALL_MARGIN_SECONDS, self.info.to_wire(), pack_attempts(sorted(self._ours())))
                    break
                except NameTaken:
                    if not self.name_is_default:
                        raise
                    self.info = dataclasses.replace(self.info, name=next_name(self.info.name))
        finally:
            drop(scheduler)  # the supervisor calls nothing until the next register: no idle thread on the master
        self.scheduler = scheduler
        self.session = reply["session"]
        log.info("registered with master %s:%s as %s (%d slots)", *self.address, self.info.name, self.info.slots)

    def _ours(self) -> Set[Tuple[int, int]]:
        """The jobs this agent holds: running or waiting here, and finished but not yet reported."""
        running = self.pool.held_keys() if self.pool is not None else set()
        return running | self.outbox.keys()

    def _serve_session(self) -> None:
        """Take, report and beat on this session until it breaks, we are told to stop, or we drained.

        Three loops, each on its own connection, so none waits behind another: a take parked on the
        master, or a report stuck in a slow journal write, never delays the heartbeat."""
        self.disconnected.clear()
        threads = [threading.Thread(target=self._session_loop, args=(what, body), name=name, daemon=True)
                   for what, body, name in (("taking work", self._take, "take"), ("reporting", self._report, "report"),
                                            ("beating", self._beat, "heartbeat"))]
        for thread in threads:
            thread.start()
        if self.pool is None:
            # Once registered, and beating: the master (and a deploy waiting for "ready") hears from us
            # before we pay for a forkserver and N workers, and keeps hearing from us while they start
            # (on a host starting a crowd of agents at once that takes longer than a lease). No work
            # is taken before they exist.
            self.pool = JobPool(self.info.slots, self._queue_results, self.draining, self.verbose,
                                containment=self.containment)
        self.pool_ready.set()
        while not (self.disconnected.is_set() or self.stopping.is_set()):
            if self.draining.is_set():
                if not self.drain_said:  # said here, not in the signal handler (handlers only set flags)
                    self.drain_said = True
                    log.info("draining: finishing the jobs that run, taking no more (a second signal kills them)")
                if self._drained():
                    break
            time.sleep(TICK_SECONDS)
        self.outbox.wake()
        for thread in threads:
            thread.join(timeout=SESSION_JOIN_SECONDS)

    def _sleep(self, seconds: float) -> None:
        """Back off, but wake for a stop, or for a drain with nothing left to do."""
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline and not self.stopping.is_set():
            if self.draining.is_set() and self._idle():
                return
            time.sleep(TICK_SECONDS)

    def _idle(self) -> bool:
        return self.pool is None or self.pool.idle()

    def _drained(self) -> bool:
        return self._idle() and not len(self.outbox)

    # ---- a session's two loops, each on its own connection ------------------------------

    def _session_loop(self, what: str, body: Callable[[Any], None]) -> None:
        """Run one loop of the session; any failure (a call past its deadline too) ends the session and
        the supervisor registers again."""
        scheduler = self.scheduler
        try:
            body(scheduler)
        except (OSError, EOFError) as exc:
            log.warning("lost the master while %s: %s", what, exc)
            self.disconnected.set()
        except CorralError as exc:
            log.warning("the master refused this agent while %s: %s", what, exc)
            self.disconnected.set()
        except Exception:  # noqa: BLE001 - never die silently with work unreported: say so, reconnect
            log.exception("failed while %s; reconnecting", what)
            self.disconnected.set()
        finally:
            drop(scheduler)  # this thread ends: its connection with it, not at the garbage collector's leisure

    def _wait_for_pool(self) -> Optional[JobPool]:
        """The pool, once it exists; None if the session ends first."""
        while not self.pool_ready.wait(TICK_SECONDS):
            if self.stopping.is_set() or self.disconnected.is_set():
                return None
        return self.pool

    def _take(self, scheduler: Any) -> None:
        pool = self._wait_for_pool()
        if pool is None:
            return
        while not (self.draining.is_set() or self.stopping.is_set() or self.disconnected.is_set()):
            # Even when full, the long poll is how cancels reach us at once. `wanted` is our
            # credit on the master: each report() renews it as slots free up, and this parked
            # take() then receives new work the moment it is submitted.
            try:
                rows, cancel = call(scheduler, "take", TAKE_WAIT_SECONDS + CALL_MARGIN_SECONDS, self.session,
                                    pool.wanted(), TAKE_WAIT_SECONDS)
            except JournalFailed as exc:
                self._journal_refused(exc, "new work for us")  # nothing was handed to us: ask again in a while
                continue
            self._received(rows, cancel)

    def _report(self, scheduler: Any) -> None:
        """Send results as soon as there are any (what piles up meanwhile goes in the next call)."""
        if self._wait_for_pool() is None:
            return
        while not (self.stopping.is_set() or self.disconnected.is_set()):
            # At most REPORT_RESULTS per call (the master refuses more); the rest go in the next ones.
            batch = self.outbox.wait(HEARTBEAT_SECONDS)[:REPORT_RESULTS]
            if batch:
                try:
                    self._send_report(scheduler, batch)
                except JournalFailed as exc:
                    # None of the batch was recorded: it stays in the outbox (and the spool file, should
                    # this agent die meanwhile) and goes again.
                    self.outbox.save()
                    self._journal_refused(exc, f"our {len(batch)} results")
                    continue
                if self.journal_failing.is_set():
                    self.journal_failing.clear()
                    log.warning("the master's journal takes writes again: handed in %d results", len(batch))
                self.outbox.acknowledge(len(batch))
            elif self.draining.is_set() and self._drained():
                return

    def _journal_refused(self, exc: JournalFailed, what: str) -> None:
        """The master could not journal our call: say so once, wait a little (a stop or a broken session
        ends the wait), and let the loop send the same call again."""
        if not self.journal_failing.is_set():
            self.journal_failing.set()
            log.warning("the master could not journal %s: %s; asking again every %.0fs", what, exc.message,
                        JOURNAL_RETRY_SECONDS)
        until = time.monotonic() + JOURNAL_RETRY_SECONDS
        while time.monotonic() < until and not (self.stopping.is_set() or self.disconnected.is_set()):
            time.sleep(TICK_SECONDS)

    def _beat(self, scheduler: Any) -> None:
        """The heartbeat: an empty report every HEARTBEAT_SECONDS, on a connection of its own."""
        while not (self.stopping.is_set() or self.disconnected.is_set()):
            self._send_report(scheduler, [])
            if self.draining.is_set() and self._drained():
                return
            # A job that starts is told at once (the console shows it running from then), not a beat later.
            pool = self.pool
            until = time.monotonic() + HEARTBEAT_SECONDS
            while time.monotonic() < until and not self.disconnected.is_set():
                if pool is not None and pool.began_news.is_set():
                    break
                self.disconnected.wait(TICK_SECONDS)

    def _send_report(self, scheduler: Any, batch: List[JobResult]) -> None:
        """One report: these results (none for a heartbeat), what we hold, our credit; then what it brought.
        What we hold is every attempt held by the pool or settled and waiting in the outbox (the pool moves
        one from held to the outbox under its lock, so reading held, then the outbox, misses none; and a
        heartbeat that overtakes the report carrying a result still names that attempt), and how many
        tasks we had by then: the master re-queues what we do not hold only once we have had them all."""
        pool = self.pool
        with self.received_lock:
            received = self.received  # first: every task counted so far is held or in the outbox now
        if pool is None:  # a heartbeat while the pool starts: nothing held, nothing wanted yet
            holding = Holding([], 0, {}, [])
        else:
            holding = pool.holding(draining=self.draining.is_set())
        running = pack_attempts(sorted(set(holding.running) | self.outbox.keys()))
        results = pack_results(batch) if batch else []
        # `began`: which held attempts have started (the others are only assigned), when there are any.
        extra = (pack_starts(holding.began),) if holding.began else ()
        tasks, cancel = call(scheduler, "report", report_seconds(batch), self.session, results, running,
                             holding.wanted, holding.live or None, received, *extra)
        if tasks or cancel:
            self._wait_for_pool()  # none come before the pool exists (we wanted none); all the same
            self._received(tasks, cancel)  # no pool (a forced stop took it): the tasks go straight back

    def _received(self, rows: List[Tuple[Any, ...]], cancel: List[Any]) -> None:
        """What a take() or report() brought back, settled into the pool (or the outbox), then counted."""
        pool = self.pool
        if pool is None:
            # A long poll answered after a forced stop took the pool down (the session's loops outlive it by
            # up to SESSION_JOIN_SECONDS): these tasks never reach a worker; say so now, not after a lease.
            if rows:
                self._send_back([released(Task._make(row), "the agent stopped before it could run it") for row in rows])
            return
        _received(pool, self.code, rows, cancel)
        if rows:
            with self.received_lock:
                self.received += len(rows)

    def _queue_results(self, results: List[JobResult]) -> None:
        """The pool's way out: settled results wait in the outbox for the report loop."""
        self.outbox.put(results)
        if self.disconnected.is_set():
            self.outbox.save()  # the master is away: on disk now, in case this agent dies before it is back

    # ---- the end ------------------------------------------------------------------------

    def _stop_pool(self) -> None:
        pool, self.pool = self.pool, None
        if pool is None:
            return
        killed = pool.stop()
        if killed or self.stopping.is_set():
            why = "stopped by a second signal" if self.stopping.is_set() else "the agent stopped"
            self._hand_back(killed, [released(task, why, started) for task, started in pool.held_tasks()], why)

    def _hand_back(self, killed: Set[Tuple[int, int]], results: List[JobResult], why: str) -> None:
        """After a forced stop, tell the master (best effort) that our killed jobs should run again,
        rather than leave them to wait out this agent's lease."""
        pending = self.outbox.wait(0)
        # A job we killed may have ended (killed by signal 9) before the pool went: that is our
        # doing, not the job's failure, so it too is handed back to run again.
        results = results + [result._replace(state=RELEASED, error=why) if (result.job_id, result.attempt) in killed
                             else result
                             for result in pending]
        if results and self._send_back(results):
            self.outbox.acknowledge(len(pending))

    def _send_back(self, results: List[JobResult]) -> bool:
        """Report these results on a connection of our own, at most REPORT_RESULTS per call (the master takes
        no more), wanting nothing; False (said in the log) if the master could not be told."""
        if not self.session:
            return False
        try:
            scheduler = connect(self.address, self.authkey)
            try:
                for first in range(0, len(results), REPORT_RESULTS):
                    batch = results[first:first + REPORT_RESULTS]
                    call(scheduler, "report", report_seconds(batch), self.session, pack_results(batch), b"", 0)
            finally:
                drop(scheduler)
        except (OSError, EOFError, CorralError) as exc:
            log.warning("could not hand back %d jobs (%s); the master re-queues them after the lease", len(results), exc)
            return False
        return True


def _received(pool: JobPool, code: codecache.CodeCache, rows: List[Tuple[Any, ...]], cancel: List[Any]) -> None:
    """What a take() or report() brought back: attempts to cancel ((job id, attempt) pairs), and packed
    tasks to run (their shipped code on this host first)."""
    if cancel:
        pool.cancel([(int(pair[0]), int(pair[1])) for pair in cancel])
    if rows:
        ready, failed = code.prepare([Task._make(row) for row in rows])
        if failed:
            pool.report(failed)  # never held: straight to the outbox, with why their code is missing
        if ready:
            pool.accept(ready)


def next_name(name: str) -> str:
    """The next default name when ours is taken: several agents on one host are host, host-2, host-3..."""
    base, _, number = name.rpartition("-")
    if not (base and number.isdigit()):
        base, number = name, "1"
    return f"{base}-{int(number) + 1}"


def default_name() -> str:
    return socket.gethostname().split(".")[0] or "agent"


def install_signal_handlers(agent: Agent) -> None:
    signal.signal(signal.SIGTERM, agent.on_signal)
    signal.signal(signal.SIGINT, agent.on_signal)
    # `kill -USR2 <agent>` writes every thread's stack to its log (stderr) and changes nothing else:
    # what an operator (or a test) asks of an agent that does not stop when told to.
    try:
        faulthandler.register(signal.SIGUSR2, all_threads=True)
    except (RuntimeError, ValueError, OSError):  # no usable stderr: nowhere to write them
        pass


def python_version() -> str:
    return ".".join(str(part) for part in sys.version_info[:3])
