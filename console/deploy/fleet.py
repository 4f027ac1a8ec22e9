"""Many hosts in parallel: one operation's per-step progress events and per-host success or failure."""

from __future__ import annotations

import logging
import threading
import time
import traceback
import uuid
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable

from ..errors import DeployError
from . import STEPS

log = logging.getLogger(__name__)

MAX_PARALLEL = 32
KEEP_EVENTS = 10_000

# How a host's work tells of its progress: (step, status, message); status is one of
# start ok skip wait info fail.
Report = Callable[[str, str, str], None]
# One host's work in an operation: (alias, report) -> (its result, a closing message), or a DeployError.
Work = Callable[[str, Report], tuple[dict[str, Any], str]]

# Per-host states in an operation's summary.
RUNNING, WAITING, OK, FAILED = "running", "waiting", "ok", "failed"


def step_fraction(step: str) -> float:
    """How far along a deploy a step is, 0..1 (for progress bars)."""
    return (STEPS.index(step) + 1) / len(STEPS) if step in STEPS else 0.0


class Operation:
    """A deploy, stop or remove over several hosts: an event log to follow, and each host's outcome.

    Every method takes and returns plain data, so it crosses the managers boundary as is.
    """

    def __init__(self, kind: str, aliases: list[str]) -> None:
        self.id = uuid.uuid4().hex[:12]
        self.kind = kind
        self.aliases = list(aliases)
        self.started = time.time()
        self.ended: float | None = None
        self.cond = threading.Condition()
        self.events: list[dict[str, Any]] = []
        self.seq = 0
        self.hosts: dict[str, dict[str, Any]] = {
            a: {"state": RUNNING, "step": "", "message": "", "progress": 0.0, "error": "", "hint": "",
                "log_tail": "", "result": None} for a in aliases}
        self.questions: dict[str, dict[str, Any]] = {}  # alias -> an open host-key question

    # ---- recording ----------------------------------------------------------------------------

    def event(self, host: str, step: str, status: str, message: str) -> None:
        with self.cond:
            self.seq += 1
            progress = self.hosts[host]["progress"]
            if status in ("ok", "skip"):
                progress = max(progress, step_fraction(step))
            event = {"seq": self.seq, "time": time.time(), "host": host, "step": step, "status": status,
                     "message": message, "progress": progress}
            self.events.append(event)
            if len(self.events) > KEEP_EVENTS:
                del self.events[: len(self.events) - KEEP_EVENTS]
            summary = self.hosts[host]
            summary.update(step=step, message=message, progress=progress)
            if status == "wait":
                summary["state"] = WAITING
            elif summary["state"] == WAITING:
                summary["state"] = RUNNING
            self.cond.notify_all()

    def reporter(self, host: str) -> Report:
        def report(step: str, status: str, message: str) -> None:
            self.event(host, step, status, message)
        return report

    def succeed(self, host: str, result: dict[str, Any], message: str) -> None:
        with self.cond:
            self.hosts[host].update(state=OK, result=result, progress=1.0)
        self.event(host, "done", "ok", message)

    def failed(self, host: str, error: DeployError) -> None:
        with self.cond:
            self.hosts[host].update(state=FAILED, error=error.message, hint=error.hint, log_tail=error.log_tail,
                                    step=error.step or self.hosts[host]["step"])
        step = error.step or self.hosts[host]["step"] or "?"
        prefix = f"{host}: {step}: "  # the event names host and step already
        message = error.message[len(prefix):] if error.message.startswith(prefix) else error.message
        self.event(host, step, "fail", message)

    def finish(self) -> None:
        with self.cond:
            self.ended = time.time()
            self.cond.notify_all()

    # ---- reading ------------------------------------------------------------------------------

    @property
    def done(self) -> bool:
        return self.ended is not None

    def snapshot(self, since: int = 0, wait: float = 0.0) -> dict[str, Any]:
        """Events after `since` (waiting up to `wait` seconds for one), the hosts' states, open questions."""
        deadline = time.monotonic() + min(max(float(wait), 0.0), 10.0)
        with self.cond:
            while self.seq <= since and not self.done:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                self.cond.wait(remaining)
            events = [dict(e) for e in self.events if e["seq"] > since]
            return {
                "id": self.id, "kind": self.kind, "hosts_order": list(self.aliases),
                "started": self.started, "ended": self.ended, "done": self.done, "next": self.seq,
                "events": events,
                "hosts": {a: dict(h) for a, h in self.hosts.items()},
                "questions": [dict(q, alias=a) for a, q in self.questions.items() if not q.get("answered")],
                "ok": sorted(a for a, h in self.hosts.items() if h["state"] == OK),
                "failed": sorted(a for a, h in self.hosts.items() if h["state"] == FAILED),
            }


def run(op: Operation, work: Work, max_parallel: int = MAX_PARALLEL) -> None:
    """Run `work(alias, report)` for every host of the operation in parallel; one host's failure never
    stops the others. `work` returns (result, closing message) or raises DeployError."""

    def one(alias: str) -> None:
        try:
            result, message = work(alias, op.reporter(alias))
            op.succeed(alias, result, message)
        except DeployError as exc:
            op.failed(alias, exc)
        except Exception as exc:  # a bug must still end this host's line, with its trace in the master's log
            log.error("%s %s on %s failed unexpectedly:\n%s", op.kind, op.id, alias, traceback.format_exc())
            op.failed(alias, DeployError(f"{alias}: internal error: {type(exc).__name__}: {exc}",
                                         "see the master's log", host=alias))

    try:
        workers = max(1, min(max_parallel, len(op.aliases)))
        with ThreadPoolExecutor(max_workers=workers, thread_name_prefix=f"{op.kind}-{op.id}") as pool:
            list(pool.map(one, op.aliases))
    finally:
        op.finish()


def start(op: Operation, work: Work, max_parallel: int = MAX_PARALLEL) -> threading.Thread:
    """run() in a background thread; follow it with op.snapshot()."""
    thread = threading.Thread(target=run, args=(op, work, max_parallel), name=f"{op.kind}-{op.id}", daemon=True)
    thread.start()
    return thread
