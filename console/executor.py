"""corral.Executor: concurrent.futures.Executor's API and semantics over the engine, each call a corral job."""

from __future__ import annotations

import concurrent.futures
import time
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

from .engine import Cancelled, Submitter, Work
from .values import TRUST, Policy


# ---- concurrent.futures --------------------------------------------------------------------------

class _JobFuture(concurrent.futures.Future[Any]):
    """A Future whose cancel() cancels its job on the cluster while it is still queued there."""

    def __init__(self, owner: "Executor") -> None:
        super().__init__()
        self._owner = owner
        self._work: Work | None = None

    def cancel(self) -> bool:
        with self._condition:
            if self._state in ("RUNNING", "FINISHED"):
                return False
            if self._state in ("CANCELLED", "CANCELLED_AND_NOTIFIED"):
                return True
        work = self._work
        if work is not None and not self._owner._cancel([work]):
            return False
        return self._cancel_here()

    def _cancel_here(self) -> bool:
        if not super().cancel():
            return False
        self.set_running_or_notify_cancel()  # CANCELLED_AND_NOTIFIED: wait() and as_completed() see it
        return True

    def _settle(self, key: int, ok: bool, value: Any) -> None:
        with self._condition:
            if self._state != "PENDING":
                return  # cancelled here first
        try:
            if isinstance(value, Cancelled):
                self._cancel_here()
            elif ok:
                self.set_result(value)
            else:
                self.set_exception(value)
        except concurrent.futures.InvalidStateError:
            pass  # cancel() won the race


class Executor(Submitter, concurrent.futures.Executor):
    """A concurrent.futures.Executor whose calls are corral jobs: submit(), map(timeout, chunksize),
    shutdown(wait, cancel_futures); futures work with as_completed() and wait(), and cancel() of a
    queued one cancels its job. `max_workers` caps this executor's jobs on the cluster at once."""

    kind = "executor"

    def __init__(self, max_workers: int | None = None, *, home: Path | str | None = None, tags: Sequence[str] = (),
                 ship: Sequence[Any] | None = None, timeout: float | None = None, name: str | None = None,
                 values: Policy = TRUST) -> None:
        if max_workers is not None and (type(max_workers) is not int or max_workers < 1):
            raise ValueError("max_workers must be greater than 0")
        super().__init__(max_workers, Path(home) if home is not None else None, tags, ship, timeout, name, values)
        self._shutdown = False

    def __repr__(self) -> str:
        return f"<corral.Executor {self.name}>"

    def _check_open(self) -> None:
        if self._shutdown:
            raise RuntimeError("cannot schedule new futures after shutdown")

    def submit(self, fn: Any, /, *args: Any, **kwargs: Any) -> concurrent.futures.Future[Any]:
        self._check_open()
        future = _JobFuture(self)
        future._work = self._single(fn, args, kwargs, future._settle)
        return future

    def map(self, fn: Any, *iterables: Iterable[Any], timeout: float | None = None,
            chunksize: int = 1) -> Iterator[Any]:
        """Results in order, as an iterator; every call is submitted before this returns (as the stdlib's)."""
        self._check_open()
        if type(chunksize) is not int or chunksize < 1:
            raise ValueError("chunksize must be >= 1.")
        end = None if timeout is None else time.monotonic() + timeout
        items = list(zip(*iterables))
        futures: list[_JobFuture] = []
        if items:
            size = self._chunk_limit(fn, chunksize)
            futures = [_JobFuture(self) for _ in range(-(-len(items) // size))]
            works = self._chunks(fn, items, size, lambda i, ok, value: futures[i]._settle(i, ok, value))
            for future, work in zip(futures, works):
                future._work = work
        return self._results(futures, end)

    @staticmethod
    def _results(futures: list[_JobFuture], end: float | None) -> Iterator[Any]:
        """Each chunk's values in order; past `end`, TimeoutError; leaving early cancels what has not run."""
        pending = list(reversed(futures))
        try:
            while pending:
                future = pending[-1]
                values = future.result() if end is None else future.result(end - time.monotonic())
                pending.pop()
                yield from values
        finally:
            for future in pending:
                future.cancel()

    def _cancel(self, works: Sequence[Work]) -> set[Work]:
        return self._engine.cancel(works, self._client())

    def __del__(self) -> None:
        if getattr(self, "_engine", None) is not None and not getattr(self, "_shutdown", True):
            self._engine.close()

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        self._shutdown = True
        if cancel_futures:
            self._engine.cancel_all(self._client())
        self._engine.close()
        if wait:
            self._engine.thread.join()

