"""`corral master`: the BaseManager that serves the scheduler on loopback, with a pickle boundary at its door."""

from __future__ import annotations

import functools
import logging
import os
import signal
import socket
import sqlite3
import sys
import threading
import time
import traceback
from multiprocessing import connection
from multiprocessing.managers import BaseManager, Server
from typing import Any, Callable, Mapping, Protocol, Sequence, Tuple

from corral.agent.connection import SERIALIZER
from corral.agent.errors import CorralError
from corral.agent.protocol import CODE_TYPEID, SCHEDULER_TYPEID

from ..escape import LineFormatter
from ..state import MasterLock, StateDir
from . import codestore
from .decode import PlainDataUnpickler, Refused, plain_loads
from .door import HANDSHAKE_SECONDS, Door
from .records import Retention
from .core import HOUSEKEEPING_SECONDS
from .scheduler import Scheduler
from .store import Journal
from .validate import shown

__all__ = ["HANDSHAKE_SECONDS", "MAX_MESSAGE_BYTES", "PlainDataUnpickler", "plain_loads", "serve"]

log = logging.getLogger(__name__)

# The largest message the master reads from any peer; a bigger one closes that connection.
MAX_MESSAGE_BYTES = 64 * 1024 * 1024
MAX_NAME = 64  # characters of a request's object id and method name (managers' own are a dozen)


def _check_request(request: Any) -> Any:
    """A managers request is (object id or None, method name, args tuple, kwargs dict): anything else is
    refused here, before the Server formats any of it into an error (`%r` of a 64 MiB name)."""
    if (type(request) is not tuple or len(request) != 4
            or not (request[0] is None or (type(request[0]) is str and len(request[0]) <= MAX_NAME))
            or type(request[1]) is not str or len(request[1]) > MAX_NAME
            or type(request[2]) is not tuple or type(request[3]) is not dict
            or not all(type(k) is str for k in request[3])):
        raise Refused("refused: a request is (object id, method name, args tuple, kwargs dict)")
    return request


class PlainDataConnection:
    """An admitted peer's connection (see door.py): recv() reads at most MAX_MESSAGE_BYTES and decodes them
    as bounded plain data (decode.py), then checks the request's shape."""

    def __init__(self, conn: connection.Connection, peer: str) -> None:
        self._conn = conn
        self._peer = peer

    def recv(self) -> Any:
        try:
            data = self._conn.recv_bytes(MAX_MESSAGE_BYTES)
        except OSError as exc:
            # Too big (its rest still fills the stream, so nothing after it can be read), or cut off
            # mid-message: drop this peer. EOFError ends its thread, which closes the connection.
            log.warning("dropped the connection from %s: %s (a message may hold at most %d MiB)",
                        self._peer, exc, MAX_MESSAGE_BYTES >> 20)
            raise EOFError(str(exc)) from None
        try:
            return _check_request(plain_loads(data))
        except Refused as exc:
            log.warning("refused a message from %s (%d bytes): %s", self._peer, len(data), exc)
            raise

    def send(self, obj: Any) -> None:
        if type(obj) is tuple and len(obj) == 2 and obj[0] == "#ERROR" and isinstance(obj[1], OSError):
            # A served call the machine refused (a full disk, a directory gone) answers in one CorralError
            # line: an OSError would reach the caller as if its own connection to us had broken.
            exc = obj[1]
            text = exc.strerror or str(exc) or type(exc).__name__
            obj = ("#ERROR", CorralError(f"the master could not do it: {text}" + (f": {exc.filename}" if exc.filename else ""),
                                         "the master serves on; fix the cause on its host and try again"))
        self._conn.send(obj)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._conn, name)


def _peer_of(conn: connection.Connection) -> str:
    try:
        with socket.socket(fileno=os.dup(conn.fileno())) as sock:
            host, port = sock.getpeername()[:2]
        return f"{host}:{port}"
    except OSError:
        return "a peer"


class CorralServer(Server):
    """The managers Server behind corral's door (door.py: bounded handshakes, one thread per admitted peer
    only), reading every message as bounded plain data, and deaf to a peer's `shutdown`."""

    stop_event: threading.Event  # set by Server.__init__ (undeclared in its type stubs); serve() replaces it

    def accepter(self) -> None:
        # The bound socket (the managers Listener's SocketListener's) and the key (attributes Server.__init__
        # sets, which its type stubs do not declare).
        listener = getattr(getattr(getattr(self, "listener"), "_listener"), "_socket")
        Door(listener, bytes(getattr(self, "authkey")), self._admit, self.stop_event).run()

    def _admit(self, conn: connection.Connection) -> None:
        """Start the thread of a peer that passed the handshake; RuntimeError if none can start."""
        thread = threading.Thread(target=self._serve, args=(conn,), name="peer", daemon=True)
        thread.start()

    def _serve(self, conn: connection.Connection) -> None:
        """Server.handle_request after its handshake (the door ran it): the first request, then for a
        proxy's `accept_connection` the rest of the connection's life (serve_client)."""
        c: Any = PlainDataConnection(conn, _peer_of(conn))
        try:
            try:
                _, funcname, args, kwds = c.recv()
                if funcname not in self.public:
                    raise AttributeError(f"{shown(funcname)} is not a request the master serves")
                func = getattr(self, funcname)
            except (EOFError, OSError):
                return
            except Exception:
                msg: tuple[str, Any] = ("#TRACEBACK", traceback.format_exc())
            else:
                try:
                    msg = ("#RETURN", func(c, *args, **kwds))
                except Exception:
                    msg = ("#TRACEBACK", traceback.format_exc())
            try:
                c.send(msg)
            except Exception:
                c.send(("#TRACEBACK", traceback.format_exc(limit=1)))
        except SystemExit:
            pass  # serve_client's way of saying the peer hung up
        except (EOFError, OSError):
            pass
        finally:
            conn.close()

    def shutdown(self, c: Any) -> None:
        """A peer's managers-level `shutdown` does not stop the master: only `corral master`'s signals do."""
        log.warning("refused a peer's request to shut the master down (a signal to `corral master` stops it)")
        raise PermissionError("the master does not stop on a peer's request; signal `corral master` instead")

    def decref(self, c: Any, ident: str) -> None:
        """Everything the master serves is a singleton that lives as long as it does: a peer's decref (one
        per proxy it drops, or a thousand from a hostile one) never removes it from under the others."""


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
    README shows them (`dispatched 12 → alpha`); warnings and errors on stderr, one line each, escaped
    (LineFormatter: an agent's name is what the agent said it is)."""
    events = logging.StreamHandler(sys.stdout)
    events.addFilter(lambda record: record.levelno < logging.WARNING)
    problems = logging.StreamHandler(sys.stderr)
    problems.setLevel(logging.WARNING)
    for handler in (events, problems):
        handler.setFormatter(LineFormatter("%(message)s"))
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
            "lease expiry": scheduler.housekeeping, "retention": scheduler.prune_finished,
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
        # Announced last: once master.json names this master, it listens, handles signals, and has said
        # all it says at start-up (a test or a console that waits for the file sees the rest done).
        state.write_master(record)
        while not stop.wait(HOUSEKEEPING_SECONDS):
            chores.run()
    finally:
        for service in _services.values():
            service.shutdown()
        state.clear_master(os.getpid())
        with _scheduler.lock:
            journal.close()
    return 0
