"""TCP for the managers protocol: Nagle off, and a deadline on every connect, handshake and reply (SERIALIZER).

multiprocessing.connection writes a large message as two writes (length, then body) and the
handshake ends with two writes in a row; with Nagle on, the second waits for the peer's delayed
ACK: about 40 ms per round trip on Linux. Every corral manager (master, agents, clients) uses
this serializer: plain pickle, over sockets with TCP_NODELAY set on both ends.

managers' own connections block for ever: a master that stops answering (SIGSTOPped, wedged, its
host gone without a FIN) holds the caller in a read with no end. Our client side never blocks: the
socket is non-blocking and every read and write first waits, with poll(), no later than the
deadline of the call it belongs to (`deadline(seconds)` around the call; CONNECT_SECONDS for a
connect and its handshake; IDLE_SECONDS of silence for anything else). Past it, CallTimeout (an
OSError, as a refused connect is): the caller drops that connection (`drop(proxy)`; a message may be
half read) and builds a new one.
"""

from __future__ import annotations

import contextlib
import math
import os
import random
import select
import socket
import threading
import time
from multiprocessing import connection, managers
from typing import Any, Iterator, Optional, Tuple

SERIALIZER = "pickle-nodelay"

CONNECT_SECONDS = 10.0  # a TCP connect plus the authkey handshake (four short messages)
IDLE_SECONDS = 30.0  # outside deadline(): the longest one read or write may wait for the peer


class CallTimeout(TimeoutError):
    """The master did not answer within the call's deadline (its connection must be dropped)."""


class _Budget(threading.local):
    until: Optional[float] = None  # monotonic time by which the current call must be over (this thread)


_budget = _Budget()


@contextlib.contextmanager
def deadline(seconds: float) -> Iterator[None]:
    """Every read and write this thread makes inside the block ends by `seconds` from now (CallTimeout
    after). Nested blocks keep the earlier deadline."""
    outer = _budget.until
    until = time.monotonic() + seconds
    _budget.until = until if outer is None else min(outer, until)
    try:
        yield
    finally:
        _budget.until = outer


def _wait(fd: int, event: int, what: str) -> None:
    until = _budget.until
    timeout = IDLE_SECONDS if until is None else until - time.monotonic()
    poller = select.poll()
    poller.register(fd, event)  # an error or a hang-up wakes it too: the read or write then says which
    if timeout <= 0 or not poller.poll(math.ceil(timeout * 1000)):
        raise CallTimeout(f"no {what} from the master in time (the call's deadline passed)")


class DeadlineConnection(connection.Connection):
    """A client-side Connection on a non-blocking socket whose reads and writes keep the call's deadline."""

    def _recv(self, size: int, read: Any = None) -> Any:
        return super()._recv(size, _timed_read)  # type: ignore[misc]  # private, unstubbed; same since 3.3

    def _send(self, buf: Any, write: Any = None) -> None:
        super()._send(buf, _timed_write)  # type: ignore[misc]


def _timed_read(fd: int, count: int) -> bytes:
    while True:
        _wait(fd, select.POLLIN, "answer")
        try:
            return os.read(fd, count)
        except (BlockingIOError, InterruptedError):
            continue  # woken for nothing: wait again, within the same deadline


def _timed_write(fd: int, data: Any) -> int:
    while True:
        _wait(fd, select.POLLOUT, "room to write")
        try:
            return os.write(fd, data)
        except (BlockingIOError, InterruptedError):
            continue


def nodelay(conn: connection.Connection) -> connection.Connection:
    """Turn Nagle off on an established socket connection (no-op for anything else)."""
    try:
        with socket.socket(fileno=conn.fileno()) as sock:
            try:
                if sock.family in (socket.AF_INET, socket.AF_INET6):
                    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            finally:
                sock.detach()  # the fd stays the connection's
    except OSError:
        pass
    return conn


def Client(address: Tuple[str, int], family: Optional[str] = None, authkey: Optional[bytes] = None) -> Any:
    """multiprocessing.connection.Client for TCP: TCP_NODELAY set, connect and handshake within CONNECT_SECONDS
    (or the caller's deadline, if sooner), and every later read and write within the call's deadline."""
    if family not in (None, "AF_INET", "AF_INET6") or not isinstance(address, tuple):
        return connection.Client(address, family, authkey)
    with deadline(CONNECT_SECONDS):
        until = _budget.until
        assert until is not None
        try:
            sock = socket.create_connection(address, timeout=max(0.001, until - time.monotonic()))
        except socket.timeout:
            raise CallTimeout(f"no answer from the master at {address[0]}:{address[1]} to connect") from None
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.setblocking(False)  # every read and write waits in poll() instead, up to its deadline
        conn = DeadlineConnection(sock.detach())
        if authkey is not None:
            try:
                connection.answer_challenge(conn, authkey)
                connection.deliver_challenge(conn, authkey)
            except CallTimeout:  # connected, then no challenge or no verdict: one line that says so
                conn.close()
                raise CallTimeout(f"the master at {address[0]}:{address[1]} did not answer the authkey handshake"
                                  f" within {CONNECT_SECONDS:g}s (paused, overloaded, or not a corral master)") from None
            except AssertionError:  # answer_challenge's check that the first message is a challenge
                conn.close()
                raise ConnectionError(f"{address[0]}:{address[1]} is not a corral master"
                                      " (it sent no authkey challenge)") from None
            except BaseException:
                conn.close()
                raise
    return conn


def open_proxy(address: Tuple[str, int], authkey: bytes, typeid: str) -> Any:
    """A proxy for the object the master serves under `typeid`; each thread that calls it gets its own
    connection at its first call (managers keeps them per thread), so one proxy serves a whole session.

    managers' own way (manager.connect(), then manager.<typeid>()) costs four connections, a handshake
    each: connect's check, create, the proxy's incref and the manager's decref; and a decref at garbage
    collection, in whatever thread, that would wait out a stalled master. Here: one, for create, whose
    reference is never given back (the master serves one object for its whole life: a count, no memory),
    so the proxy holds none. Within the caller's deadline, else CONNECT_SECONDS."""
    with deadline(CONNECT_SECONDS):
        conn = Client(address, authkey=authkey)
        try:
            ident, exposed = managers.dispatch(conn, None, "create", (typeid,), {})  # type: ignore[attr-defined]
        finally:
            conn.close()
    token = managers.Token(typeid, address, ident)
    return managers.AutoProxy(token, SERIALIZER, authkey=authkey, exposed=exposed, incref=False)  # type: ignore[attr-defined]


def drop(proxy: Any) -> None:
    """Close and forget the connection a proxy holds in this thread, so its next call makes a new one.

    managers keeps one connection per thread per address, shared by every proxy to that address
    (BaseProxy._address_to_local); after a failed or abandoned call its stream may hold half a message
    or a late reply, so it is never used again. multiprocessing has no public way to do this."""
    tls: Any = getattr(proxy, "_tls", None)
    conn = getattr(tls, "connection", None)
    if conn is not None:
        with contextlib.suppress(OSError):
            conn.close()
        del tls.connection


def call(proxy: Any, method: str, seconds: float, *args: Any) -> Any:
    """proxy.method(*args) within `seconds`; on any failure to talk (CallTimeout, a reset, EOF) the
    proxy's connection is dropped before the error goes up."""
    try:
        with deadline(seconds):
            return getattr(proxy, method)(*args)
    except (OSError, EOFError):
        drop(proxy)
        raise


class Backoff:
    """Capped exponential back-off with jitter: peers that lost the master together (a crowd of agents,
    every client of a stalled master) do not all come back in the same instant."""

    def __init__(self, first: float = 0.5, cap: float = 10.0) -> None:
        self.first, self.cap = first, cap
        self.current = first

    def next(self) -> float:
        """Seconds to wait before the next attempt (between half and all of the current step)."""
        pause = self.current * random.uniform(0.5, 1.0)
        self.current = min(self.current * 2, self.cap)
        return pause

    def reset(self) -> None:
        self.current = self.first


# The master's listen backlog. managers asks for 16: a crowd of agents connecting at once (each session
# opens a few connections) overflows it, the kernel drops their SYNs, and each retries only after 1, 3,
# 7 s... past its connect deadline. The kernel caps it at net.core.somaxconn (4096 on current Linux).
LISTEN_BACKLOG = 1024


class Listener(connection.Listener):
    """multiprocessing.connection.Listener with a backlog for a crowd, whose accepted connections have
    TCP_NODELAY set."""

    def __init__(self, address: Any = None, family: Optional[str] = None, backlog: int = 1,
                 authkey: Optional[bytes] = None) -> None:
        super().__init__(address, family, max(backlog, LISTEN_BACKLOG), authkey)

    def accept(self) -> connection.Connection:
        return nodelay(super().accept())


# managers looks serializers up by name, for the server, the manager and every proxy alike (the table
# has no public setter, and typeshed does not list it).
managers.listener_client[SERIALIZER] = (Listener, Client)  # type: ignore[attr-defined]
