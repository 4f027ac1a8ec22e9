"""`corral master`: the BaseManager that serves the scheduler on loopback, with a pickle boundary at its door."""

from __future__ import annotations

import functools
import io
import logging
import os
import pickle
import signal
import socket
import sqlite3
import struct
import sys
import threading
import time
from multiprocessing import connection
from multiprocessing.managers import BaseManager, Server
from typing import Any, Callable, Mapping, Protocol, Sequence, Tuple, cast

from corral.agent.connection import SERIALIZER
from corral.agent.errors import CorralError
from corral.agent.protocol import CODE_TYPEID, SCHEDULER_TYPEID

from ..state import MasterLock, StateDir
from . import codestore
from .records import Retention
from .scheduler import Scheduler
from .store import Journal

log = logging.getLogger(__name__)

# The largest message the master reads from any peer; a bigger one closes that connection.
MAX_MESSAGE_BYTES = 64 * 1024 * 1024
HANDSHAKE_SECONDS = 10.0


class PlainDataUnpickler(pickle.Unpickler):
    """Unpickles plain data only (dict/list/tuple/str/bytes/int/float/bool/None need no global at all):
    any class or function reference is refused, so nothing runs."""

    def find_class(self, module: str, name: str) -> Any:
        raise pickle.UnpicklingError(f"refused: the master accepts plain data only, not {module}.{name}")


# The handshake's two verdicts (multiprocessing.connection's, which its type stubs do not declare).
_WELCOME: bytes = getattr(connection, "WELCOME")
_FAILURE: bytes = getattr(connection, "FAILURE")


def plain_loads(data: bytes) -> Any:
    return PlainDataUnpickler(io.BytesIO(data)).load()


class PlainDataConnection:
    """A server-side connection whose recv() unpickles with PlainDataUnpickler and bounds the size."""

    def __init__(self, conn: connection.Connection) -> None:
        self._conn = conn
        self._welcomed = False  # the peer passed our authkey challenge

    def recv(self) -> Any:
        try:
            data = self._conn.recv_bytes(MAX_MESSAGE_BYTES)
        except OSError as exc:
            # Too big (its rest still fills the stream, so nothing after it can be read), or cut off
            # mid-message: drop this peer. EOFError ends its thread, which closes the connection.
            log.warning("dropped the connection from %s: %s (a message may hold at most %d MiB)",
                        self._peer(), exc, MAX_MESSAGE_BYTES >> 20)
            raise EOFError(str(exc)) from None
        return plain_loads(data)

    def recv_bytes(self, maxlength: int | None = None) -> bytes:
        """Only the handshake reads with recv_bytes: each of its messages must arrive whole within
        HANDSHAKE_SECONDS, so a peer that stops half-way holds no connection and no thread."""
        deadline = time.monotonic() + HANDSHAKE_SECONDS
        size = struct.unpack("!i", self._read(4, deadline))[0]
        if size < 0 or (maxlength is not None and size > maxlength):
            raise OSError("bad message length")
        return self._read(size, deadline)

    def _read(self, count: int, deadline: float) -> bytes:
        data = b""
        while len(data) < count:
            if not self._conn.poll(max(0.0, deadline - time.monotonic())):
                raise EOFError("the peer did not finish its handshake in time")
            chunk = os.read(self._conn.fileno(), count - len(data))
            if not chunk:
                raise EOFError("the peer hung up during the handshake")
            data += chunk
        return data

    def send_bytes(self, buf: Any, offset: int = 0, size: int | None = None) -> None:
        if len(buf) == len(_WELCOME) and bytes(buf) == _WELCOME:
            self._welcomed = True
        elif len(buf) == len(_FAILURE) and bytes(buf) == _FAILURE:
            # The handshake's verdict on a peer whose authkey is wrong: one line here too.
            log.warning("refused a connection from %s: wrong authkey", self._peer())
        self._conn.send_bytes(buf, offset, size)

    def send(self, obj: Any) -> None:
        if self._welcomed:  # a peer that failed the handshake gets no traceback of why
            self._conn.send(obj)

    def _peer(self) -> str:
        try:
            with socket.socket(fileno=os.dup(self._conn.fileno())) as sock:
                host, port = sock.getpeername()[:2]
            return f"{host}:{port}"
        except OSError:
            return "a peer"

    def __getattr__(self, name: str) -> Any:
        return getattr(self._conn, name)


class CorralServer(Server):
    """The managers Server with the pickle boundary: every message is read as plain data."""

    stop_event: threading.Event  # set by Server.__init__ (undeclared in its type stubs); serve() replaces it

    def handle_request(self, conn: Any) -> None:
        # Duck-typed: PlainDataConnection has every Connection method the Server calls.
        super().handle_request(cast(Any, PlainDataConnection(conn)))


# Module-level (no lambdas): the registered callable must be importable by name.
_scheduler: Scheduler | None = None


def get_scheduler() -> Scheduler:
    assert _scheduler is not None, "the master has no scheduler yet"
    return _scheduler


class Service(Protocol):
    """Something served beside the scheduler (the deploy service): made once the master's address is
    known, started before the master is announced, shut down when it stops."""

    def resume(self) -> None: ...

    def shutdown(self) -> None: ...


# (scheduler, the master's bound address, authkey) -> the service; given by whoever runs the master, so
# master/ knows nothing of what is served beside it (no import from master/ into deploy/).
ServiceFactory = Callable[[Scheduler, Tuple[str, int], bytes], Service]

_services: dict[str, Service] = {}


def get_service(typeid: str) -> Service:
    service = _services.get(typeid)
    assert service is not None, f"the master serves no {typeid}"
    return service


class MasterManager(BaseManager):
    """The master's manager: one registered name, the scheduler."""


MasterManager.register(
    SCHEDULER_TYPEID,
    callable=get_scheduler,
    exposed=(
        "hello", "submit", "submit_map", "cancel", "requeue", "wait", "wait_outcomes", "outcomes", "job", "list_jobs", "status",
        "agent_list", "register", "take", "report", "snapshot",
    ),
)


# Shipped code: clients put bundles, agents get them (see codestore.py).
MasterManager.register(CODE_TYPEID, callable=codestore.get_code_store, exposed=codestore.EXPOSED)


def register_service(typeid: str, exposed: Sequence[str]) -> None:
    """Serve a service under `typeid` beside the scheduler (before serve() builds the server)."""
    MasterManager.register(typeid, callable=functools.partial(get_service, typeid), exposed=tuple(exposed))


def is_loopback(host: str) -> bool:
    return host == "localhost" or host.startswith("127.") or host == "::1"


def configure_logging(verbose: bool) -> None:
    """The master's one logging set-up: its events (INFO, shown with -v) as bare lines on stdout, as the
    README shows them (`dispatched 12 → alpha`); warnings and errors on stderr, one line each."""
    events = logging.StreamHandler(sys.stdout)
    events.addFilter(lambda record: record.levelno < logging.WARNING)
    problems = logging.StreamHandler(sys.stderr)
    problems.setLevel(logging.WARNING)
    for handler in (events, problems):
        handler.setFormatter(logging.Formatter("%(message)s"))
    corral = logging.getLogger("corral")  # not the root: a library's INFO lines are not our events
    corral.handlers[:] = [events, problems]
    corral.setLevel(logging.INFO if verbose else logging.WARNING)
    corral.propagate = False


class Housekeeping:
    """The master's chores, once a second: lease expiry, retention, WAL checkpoint and, while the journal fails, a
    probe of whether it works again. None of them ends the master: a failure is logged once (again when
    it changes or clears) and the chore runs again at the next tick."""

    def __init__(self, scheduler: Scheduler, journal: Journal) -> None:
        self.chores: dict[str, Callable[[], Any]] = {
            "lease expiry": scheduler.expire_leases, "retention": scheduler.prune_finished,
            "checkpoint": journal.checkpoint, "journal probe": journal.probe}
        self.failing: dict[str, str] = {}  # chore -> the failure last logged

    def run(self) -> None:
        for name, chore in self.chores.items():
            try:
                chore()
            except Exception as exc:  # noqa: BLE001 - housekeeping never ends the master: logged, tried again
                text = (exc.message if isinstance(exc, CorralError) else str(exc)) or type(exc).__name__
                if self.failing.get(name) != text:
                    log.warning("%s failed: %s; trying again every second", name, text,
                                exc_info=not isinstance(exc, (CorralError, sqlite3.Error, OSError)))
                    self.failing[name] = text
            else:
                if self.failing.pop(name, None) is not None:
                    log.warning("%s works again", name)


def serve(state: StateDir, host: str = "127.0.0.1", port: int = 0, verbose: bool = False,
          lease: float = 10.0, max_lost: int = 3, fsync: bool = False, retention: Retention = Retention(),
          services: Mapping[str, ServiceFactory] | None = None) -> int:
    """Run the master until SIGTERM/SIGINT. Returns the exit code. `services` maps a typeid registered
    with register_service() to the factory of what it serves."""
    global _scheduler
    configure_logging(verbose)
    # First of all: a second master of this directory stops here, before it touches anything of the first's.
    lock = state.lock_master()
    try:
        return _serve(state, lock, host, port, lease, max_lost, fsync, retention, services)
    finally:
        lock.release()  # after _serve removed master.json: no other master can have written one meanwhile


def _serve(state: StateDir, lock: MasterLock, host: str, port: int, lease: float, max_lost: int, fsync: bool,
           retention: Retention, services: Mapping[str, ServiceFactory] | None) -> int:
    global _scheduler
    authkey = state.ensure_authkey()
    journal = Journal(state.journal_path, fsync=fsync)
    _scheduler = Scheduler(journal, lease_seconds=lease, max_lost=max_lost, retention=retention)
    codestore.open_store(state.home / "shipped")
    registry = getattr(MasterManager, "_registry")  # what register() filled in (BaseManager's, unstubbed)
    server = CorralServer(registry, (host, port), authkey, SERIALIZER)
    address = server.address
    assert isinstance(address, tuple), address  # a TCP listener's (host, port)
    bound_host, bound_port = str(address[0]), int(address[1])
    for typeid, factory in (services or {}).items():
        _services[typeid] = factory(_scheduler, (bound_host, bound_port), authkey)
        _services[typeid].resume()
    record = {"host": bound_host, "port": bound_port, "pid": os.getpid(), "started": time.time()}
    lock.announce(record)
    state.write_master(record)
    stop = threading.Event()

    def on_signal(signum: int, frame: Any) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    server.stop_event = stop
    accepter = threading.Thread(target=server.accepter, name="accepter", daemon=True)
    accepter.start()
    print(f"corral master listening on {bound_host}:{bound_port} (journal {journal.path})", flush=True)
    chores = Housekeeping(_scheduler, journal)
    try:
        while not stop.wait(1.0):
            chores.run()
    finally:
        for service in _services.values():
            service.shutdown()
        state.clear_master(os.getpid())
        with _scheduler.lock:
            journal.close()
    return 0
