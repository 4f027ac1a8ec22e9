"""corral.Pool: multiprocessing.Pool's API and semantics over the engine, each task (or chunk of a map) a corral job."""

from __future__ import annotations

import itertools
import multiprocessing
import threading
import time
import weakref
from collections import deque
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

from .engine import CLOSE, RUN, TERMINATE, Cancelled, Submitter, Terminated, run_hook
from .values import TRUST, Policy


# ---- multiprocessing.Pool ---------------------------------------------------------------------------

class AsyncResult:
    """multiprocessing.pool.AsyncResult: get(timeout), wait(timeout), ready(), successful()."""

    def __init__(self, callback: Callable[[Any], Any] | None = None,
                 error_callback: Callable[[BaseException], Any] | None = None) -> None:
        self._event = threading.Event()
        self._callback, self._error_callback = callback, error_callback
        self._success = False
        self._value: Any = None

    def ready(self) -> bool:
        return self._event.is_set()

    def successful(self) -> bool:
        if not self.ready():
            raise ValueError(f"{self!r} not ready")
        return self._success

    def wait(self, timeout: float | None = None) -> None:
        self._event.wait(timeout)

    def get(self, timeout: float | None = None) -> Any:
        self.wait(timeout)
        if not self.ready():
            raise multiprocessing.TimeoutError
        if self._success:
            return self._value
        raise self._value

    def _set(self, key: int, ok: bool, value: Any) -> None:
        if isinstance(value, Cancelled):
            value = value.error
        self._success, self._value = ok, value
        if not isinstance(value, Terminated):  # callbacks first, as multiprocessing: wait() returning means they ran
            run_hook(self._callback if ok else self._error_callback, value)
        self._event.set()


class MapResult(AsyncResult):
    """The result of map_async/starmap_async: the values of every chunk in order, or the first failure."""

    def __init__(self, chunks: int, callback: Callable[[Any], Any] | None,
                 error_callback: Callable[[BaseException], Any] | None) -> None:
        super().__init__(callback, error_callback)
        self._parts: list[list[Any] | None] = [None] * chunks
        self._left = chunks
        self._lock = threading.Lock()
        if chunks == 0:
            self._set(0, True, [])

    def _set_chunk(self, index: int, ok: bool, value: Any) -> None:
        with self._lock:
            if self._event.is_set() or self._left == 0:
                return
            if not ok:
                self._left = 0
            else:
                self._parts[index] = value
                self._left -= 1
                if self._left:
                    return
        if ok:
            self._set(0, True, [v for part in self._parts for v in part or ()])
        else:
            self._set(0, False, value)  # the first failure ends the map (the other chunks still run)


class IMapIterator:
    """imap / imap_unordered: reads its iterable as results are taken (a bounded read-ahead), and a failing
    iterable surfaces where it failed, after the results before it."""

    def __init__(self, owner: "Pool", func: Any, iterable: Iterable[Any], chunksize: int, star: bool,
                 ordered: bool) -> None:
        if type(chunksize) is not int or chunksize < 1:
            raise ValueError(f"Chunksize must be 1+, not {chunksize!r}")
        self._owner, self._func, self._star, self._ordered = owner, func, star, ordered
        self._chunksize = owner._chunk_limit(func, chunksize)  # describes func: a lambda is refused here
        self._source = iter(iterable)
        self._cond = threading.Condition()
        self._done: dict[int, tuple[bool, Any]] = {}  # chunk index -> (ok, values or exception)
        self._ready: deque[Any] = deque()  # values of taken chunks, to hand out one by one
        self._sent = 0  # chunks submitted
        self._taken = 0  # chunks handed out (in order for imap)
        self._source_error: BaseException | None = None
        self._exhausted = False
        self._reading = threading.Lock()  # the caller's next() and the pool's close() may both read the iterable
        owner._imaps.add(self)
        self._fill()

    def __iter__(self) -> "IMapIterator":
        return self

    def __next__(self) -> Any:
        return self.next()

    def _fill(self, everything: bool = False) -> None:
        """Submit chunks until two per slot are out (or, closing the pool, all of them), reading the iterable
        in the calling thread."""
        with self._reading:
            ahead = None if everything else 2 * self._owner._workers()
            while not self._exhausted and (ahead is None or self._sent - self._taken < ahead):
                try:
                    chunk = [tuple(x) if self._star else (x,) for x in itertools.islice(self._source, self._chunksize)]
                    if not chunk:
                        self._exhausted = True
                        return
                    if self._owner._state == TERMINATE:
                        raise ValueError("Pool not running")
                    self._owner._chunk(self._func, chunk, self._set_chunk, self._sent)
                except Exception as exc:  # noqa: BLE001 - the iterable (or an argument that will not pickle) failed here
                    self._source_error, self._exhausted = exc, True
                    return
                self._sent += 1

    def _set_chunk(self, index: int, ok: bool, value: Any) -> None:
        if isinstance(value, Cancelled):
            value = value.error
        with self._cond:
            self._done[index] = (ok, value)
            self._cond.notify_all()

    def next(self, timeout: float | None = None) -> Any:
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            if self._ready:
                return self._ready.popleft()
            self._fill()
            with self._cond:
                key = self._pick()
                if key is None:
                    if self._taken == self._sent:  # nothing out: the end, or the iterable's error
                        error, self._source_error = self._source_error, None
                        if error is not None:
                            raise error
                        raise StopIteration
                    remaining = None if deadline is None else deadline - time.monotonic()
                    if remaining is not None and remaining <= 0:
                        raise multiprocessing.TimeoutError
                    self._cond.wait(remaining)
                    continue
                ok, value = self._done.pop(key)
                self._taken += 1
            if not ok:
                raise value
            self._ready.extend(value)

    def _pick(self) -> int | None:
        if self._ordered:
            return self._taken if self._taken in self._done else None
        return next(iter(self._done), None)


class Pool(Submitter):
    """A drop-in for multiprocessing.pool.Pool whose tasks are corral jobs on the cluster.

    `processes` caps how many of this pool's jobs are on the cluster at once (None: no cap beyond the
    cluster's slots); `home` picks the master (its state directory); `tags` and `timeout` apply to every
    job; `ship` names more code to send (modules, module names, folders) besides what each function's
    module needs; `values` is how results are unpickled, as Client's (default "trust"). The jobs are one
    batch, named "pool-N [i/n]" in the console."""

    kind = "pool"

    def __init__(self, processes: int | None = None, *, home: Path | str | None = None, tags: Sequence[str] = (),
                 ship: Sequence[Any] | None = None, timeout: float | None = None, name: str | None = None,
                 values: Policy = TRUST) -> None:
        super().__init__(processes, Path(home) if home is not None else None, tags, ship, timeout, name, values)
        self._imaps: weakref.WeakSet[IMapIterator] = weakref.WeakSet()
        self._state = RUN

    def __repr__(self) -> str:
        return f"<corral.Pool {self.name} state={self._state}>"

    def _check_running(self) -> None:
        if self._state != RUN:
            raise ValueError("Pool not running")

    # ---- the API ----

    def apply(self, func: Any, args: Sequence[Any] = (), kwds: dict[str, Any] | None = None) -> Any:
        return self.apply_async(func, args, kwds).get()

    def apply_async(self, func: Any, args: Sequence[Any] = (), kwds: dict[str, Any] | None = None,
                    callback: Callable[[Any], Any] | None = None,
                    error_callback: Callable[[BaseException], Any] | None = None) -> AsyncResult:
        self._check_running()
        result = AsyncResult(callback, error_callback)
        self._single(func, tuple(args), dict(kwds or {}), result._set)
        return result

    def map(self, func: Any, iterable: Iterable[Any], chunksize: int | None = None) -> list[Any]:
        values: list[Any] = self._map_async(func, iterable, chunksize, False, None, None).get()
        return values

    def map_async(self, func: Any, iterable: Iterable[Any], chunksize: int | None = None,
                  callback: Callable[[Any], Any] | None = None,
                  error_callback: Callable[[BaseException], Any] | None = None) -> MapResult:
        return self._map_async(func, iterable, chunksize, False, callback, error_callback)

    def starmap(self, func: Any, iterable: Iterable[Iterable[Any]], chunksize: int | None = None) -> list[Any]:
        values: list[Any] = self._map_async(func, iterable, chunksize, True, None, None).get()
        return values

    def starmap_async(self, func: Any, iterable: Iterable[Iterable[Any]], chunksize: int | None = None,
                      callback: Callable[[Any], Any] | None = None,
                      error_callback: Callable[[BaseException], Any] | None = None) -> MapResult:
        return self._map_async(func, iterable, chunksize, True, callback, error_callback)

    def _map_async(self, func: Any, iterable: Iterable[Any], chunksize: int | None, star: bool,
                   callback: Callable[[Any], Any] | None,
                   error_callback: Callable[[BaseException], Any] | None) -> MapResult:
        self._check_running()
        items = [tuple(x) for x in iterable] if star else [(x,) for x in iterable]  # the iterable's error: here
        if not items:
            return MapResult(0, callback, error_callback)
        size = self._chunk_limit(func, self._chunksize(len(items), chunksize))
        result = MapResult(-(-len(items) // size), callback, error_callback)
        self._chunks(func, items, size, result._set_chunk)
        return result

    def imap(self, func: Any, iterable: Iterable[Any], chunksize: int = 1) -> IMapIterator:
        self._check_running()
        return IMapIterator(self, func, iterable, chunksize, star=False, ordered=True)

    def imap_unordered(self, func: Any, iterable: Iterable[Any], chunksize: int = 1) -> IMapIterator:
        self._check_running()
        return IMapIterator(self, func, iterable, chunksize, star=False, ordered=False)

    def close(self) -> None:
        """No more tasks; those submitted run to their end (join() waits for them). An imap still being read
        has the rest of its iterable read and submitted now, as multiprocessing's task handler would."""
        if self._state == RUN:
            self._state = CLOSE
            for it in list(self._imaps):
                it._fill(everything=True)
            self._engine.close()

    def terminate(self) -> None:
        """Cancel this pool's queued and running jobs on the cluster, now."""
        if self._state != TERMINATE:
            self._state = TERMINATE
            self._engine.terminate(self._client())

    def join(self) -> None:
        if self._state == RUN:
            raise ValueError("Pool is still running")
        self._engine.thread.join()
        client = getattr(self._local, "client", None)
        if client is not None:
            client.close()
            self._local.client = None

    def __enter__(self) -> "Pool":
        self._check_running()
        return self

    def __del__(self) -> None:
        # Forgotten while running: its engine finishes what was submitted, then its thread ends.
        if getattr(self, "_state", None) == RUN:
            self._engine.close()

    def __exit__(self, *exc: object) -> None:
        self.terminate()


