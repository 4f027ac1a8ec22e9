"""Results kept until the master has them: in memory (the outbox), and on disk while the master is away."""

from __future__ import annotations

import io
import logging
import os
import pickle
import threading
import time
from pathlib import Path
from typing import Iterable, List, Optional, Set, Tuple

from .protocol import JobResult

log = logging.getLogger(__name__)


class _PlainRows(pickle.Unpickler):
    """A spool holds plain tuples only: a file someone else put here can name no class, so nothing runs."""

    def find_class(self, module: str, name: str) -> object:
        raise pickle.UnpicklingError(f"a spool names no classes, and this one names {module}.{name}")


class Spool:
    """One file of results not yet handed in, so they outlive this agent process.

    Written by atomic replace (a reader sees the old list or the new one, never half); a file that
    cannot be read back is set aside beside it with a warning, never fatal. Rows are stored as plain
    tuples (the wire's form), so a file outlives a rename of the classes that name them.
    """

    def __init__(self, path: Path) -> None:
        self.path = path

    def save(self, results: Iterable[JobResult]) -> None:
        rows = [tuple(result) for result in results]
        tmp = self.path.with_name(self.path.name + ".tmp")
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            data = pickle.dumps(rows)
            tmp.unlink(missing_ok=True)  # a torn one from a crash: made again below, by us, with its mode
            fd = os.open(str(tmp), os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            os.replace(tmp, self.path)
        except OSError as exc:
            log.warning("cannot write the spool %s: %s", self.path, exc)

    def load(self) -> List[JobResult]:
        """The results a previous run kept here; [] if none, or if the file is unreadable (set aside)."""
        try:
            data = self.path.read_bytes()
        except FileNotFoundError:
            return []
        except OSError as exc:
            log.warning("cannot read the spool %s: %s", self.path, exc)
            return []
        try:
            rows = _PlainRows(io.BytesIO(data)).load()
            if not isinstance(rows, list):
                raise ValueError(f"a {type(rows).__name__}, not a list of results")
            return [_result(row) for row in rows]
        except Exception as exc:  # noqa: BLE001 - a torn or foreign file: set aside and reported, never fatal
            self._set_aside(exc)
            return []

    def drop(self) -> None:
        try:
            self.path.unlink()
        except FileNotFoundError:
            pass
        except OSError as exc:
            log.warning("cannot remove the spool %s: %s", self.path, exc)

    def _set_aside(self, why: BaseException) -> None:
        aside = self.path.with_name(f"{self.path.name}.unreadable-{time.strftime('%Y%m%d-%H%M%S')}")
        try:
            os.replace(self.path, aside)
        except OSError as exc:
            log.warning("ignoring the unreadable spool %s (%s); cannot set it aside: %s", self.path, why, exc)
        else:
            log.warning("ignoring the unreadable spool %s (%s); kept it as %s", self.path, why, aside)


def _result(row: object) -> JobResult:
    """One stored row, checked for the result's shape (a torn pickle may still load as something)."""
    if not isinstance(row, tuple) or len(row) != len(JobResult._fields):
        raise ValueError(f"a row that is not a result: {str(row)[:100]}")
    result = JobResult._make(row)
    if type(result.job_id) is not int or type(result.attempt) is not int or type(result.state) is not str:
        raise ValueError(f"a row that is not a result: {str(row)[:100]}")
    return result


class Outbox:
    """Results waiting to be reported, in order; the report loop sends a batch and acknowledges it.

    Thread-safe: the pool's threads put, the report loop waits and acknowledges, the supervisor saves.
    """

    def __init__(self) -> None:
        self._results: List[JobResult] = []
        self._ready = threading.Condition(threading.Lock())
        self.spool: Optional[Spool] = None

    def attach(self, spool: Spool) -> int:
        """Keep unacknowledged results in `spool` from now on, and queue those it already holds."""
        self.spool = spool
        kept = spool.load()
        if kept:
            log.info("handing in %d results from the spool %s", len(kept), spool.path)
            self.put(kept)
        return len(kept)

    def put(self, results: List[JobResult]) -> None:
        if results:
            with self._ready:
                self._results.extend(results)
                self._ready.notify()

    def wait(self, timeout: float) -> List[JobResult]:
        """The results waiting now, after up to `timeout` seconds for the first if there are none."""
        with self._ready:
            if not self._results and timeout > 0:
                self._ready.wait(timeout)
            return list(self._results)

    def acknowledge(self, count: int) -> None:
        """The master has the first `count` results: forget them (and the spool file once empty)."""
        if count <= 0:
            return
        with self._ready:
            del self._results[:count]
            emptied = not self._results
        if emptied and self.spool is not None:
            self.spool.drop()

    def wake(self) -> None:
        """End a wait() now (the session is ending)."""
        with self._ready:
            self._ready.notify_all()

    def save(self) -> None:
        """Write what waits to the spool file. Under the lock: one writer at a time, and the last one
        writes the newest results."""
        with self._ready:
            if self.spool is not None and self._results:
                self.spool.save(self._results)

    def keys(self) -> Set[Tuple[int, int]]:
        """The (job id, attempt) of every result waiting here."""
        with self._ready:
            return {(result.job_id, result.attempt) for result in self._results}

    def __len__(self) -> int:
        with self._ready:
            return len(self._results)
