"""The master's door: accept connections, run every stranger's authkey handshake in one thread, admit the rest.

The managers Server gives each accepted connection a thread that runs the handshake and then serves it:
a few hundred idle strangers then hold a few hundred threads and fds, and one failed thread start or
EMFILE ends (or spins) its accept loop. Here one thread accepts and runs all handshakes at once, each
with a deadline, never more than MAX_PENDING of them (the oldest goes first); a peer gets a thread only
once it has proved it holds the key; EMFILE/ENFILE make the door close its oldest handshake and back
off; a thread that cannot start costs that one connection.
"""

from __future__ import annotations

import errno
import hmac
import logging
import os
import resource
import selectors
import socket
import struct
import threading
import time
from dataclasses import dataclass, field
from multiprocessing import AuthenticationError, connection
from typing import Any, Callable

log = logging.getLogger(__name__)

HANDSHAKE_SECONDS = 10.0  # a stranger's whole handshake, from accept to its last message
MAX_PENDING = 512  # handshakes under way at once (and at most half the fd limit); past it the oldest goes
MAX_HANDSHAKE_MESSAGE = 256  # what multiprocessing.connection itself reads of a handshake message
_BACKOFF = (0.05, 1.0)  # accept's back-off on EMFILE/ENFILE: first and longest pause
_RESOURCE_ERRORS = {errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM}

CHALLENGE: bytes = getattr(connection, "CHALLENGE")
WELCOME: bytes = getattr(connection, "WELCOME")
FAILURE: bytes = getattr(connection, "FAILURE")


def _frame(payload: bytes) -> bytes:
    return struct.pack("!i", len(payload)) + payload


# The digests, as this Python's own multiprocessing.connection makes them: 3.12 added "{sha256}"-prefixed
# challenges (and answers legacy md5 ones); 3.11 and older speak md5 only. Matching the stdlib keeps
# every client and agent of any supported Python able to connect, as to a plain managers server.
_verify = getattr(connection, "_verify_challenge", None)
_respond = getattr(connection, "_create_response", None)


def _new_challenge() -> bytes:
    if _verify is not None:
        return b"{sha256}" + os.urandom(40)
    return os.urandom(20)


def _answer_ok(authkey: bytes, challenge: bytes, answer: bytes) -> bool:
    if _verify is not None:
        try:
            _verify(authkey, challenge, answer)
        except AuthenticationError:
            return False
        return True
    return hmac.compare_digest(answer, hmac.new(authkey, challenge, "md5").digest())


def _answer(authkey: bytes, challenge: bytes) -> bytes:
    if _respond is not None:
        return bytes(_respond(authkey, challenge))
    return hmac.new(authkey, challenge, "md5").digest()


def _pending_limit() -> int:
    """MAX_PENDING, or half the fd limit if that is less: strangers never take the fds of everyone else."""
    soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    return MAX_PENDING if soft == resource.RLIM_INFINITY else max(8, min(MAX_PENDING, soft // 2))


@dataclass
class _Handshake:
    """One stranger's handshake: what it has sent so far, which message we wait for, by when."""

    sock: socket.socket
    peer: str
    deadline: float
    challenge: bytes
    step: int = 0  # 0: its answer to our challenge; 1: its challenge to us; 2: its verdict on our answer
    data: bytearray = field(default_factory=bytearray)


class Door:
    """Accepts on `listener` (a bound, listening socket) until `stop` is set; `admit(conn)` gets each
    peer that passed the handshake, as a blocking multiprocessing Connection, and must start its thread
    (RuntimeError from a thread that cannot start closes that connection only)."""

    def __init__(self, listener: socket.socket, authkey: bytes, admit: Callable[[connection.Connection], None],
                 stop: threading.Event) -> None:
        self.listener = listener
        self.authkey = bytes(authkey)
        self.admit = admit
        self.stop = stop
        self.pending: dict[int, _Handshake] = {}  # fd -> handshake, oldest first
        self.selector = selectors.DefaultSelector()
        self._backoff = 0.0
        self._paused_until = 0.0
        self._said: dict[str, float] = {}  # a repeated complaint is logged once per 10 s

    # ---- the loop -------------------------------------------------------------------------

    def run(self) -> None:
        # The backlog (hundreds of agents connecting at once) is the listener's own: agent/connection.Listener.
        self.listener.setblocking(False)
        self.selector.register(self.listener, selectors.EVENT_READ)
        listening = True
        try:
            while not self.stop.is_set():
                now = time.monotonic()
                if not listening and now >= self._paused_until:
                    self.selector.register(self.listener, selectors.EVENT_READ)
                    listening = True
                timeout = 0.5
                if self.pending:
                    timeout = min(timeout, max(0.0, next(iter(self.pending.values())).deadline - now))
                if not listening:
                    timeout = min(timeout, max(0.0, self._paused_until - now))
                for key, _ in self.selector.select(timeout):
                    if key.fileobj is self.listener:
                        if not self._accept():
                            self.selector.unregister(self.listener)
                            listening = False
                    else:
                        self._read(self.pending.get(key.fd))
                self._expire(time.monotonic())
        finally:
            for shake in list(self.pending.values()):
                self._drop(shake)
            self.selector.close()

    def _accept(self) -> bool:
        """Accept what is waiting; False when out of fds (the door then pauses, having freed one)."""
        for _ in range(64):  # then look at the handshakes again
            try:
                sock, address = self.listener.accept()
            except BlockingIOError:
                break
            except OSError as exc:
                if exc.errno in _RESOURCE_ERRORS:
                    self._say("accept", "cannot accept a connection: %s; %d handshakes open",
                              os.strerror(exc.errno or 0), len(self.pending))
                    if self.pending:  # the oldest strangers give their fds to whoever is waiting
                        for _ in range(max(1, len(self.pending) // 4)):
                            self._drop(self._least_promising())
                        continue
                    # Nothing of ours to free (admitted peers, the journal hold them): pause, longer each time.
                    self._backoff = min(_BACKOFF[1], max(_BACKOFF[0], self._backoff * 2))
                    self._paused_until = time.monotonic() + self._backoff
                    return False
                continue  # ECONNABORTED and the like: that peer is gone, the next one is not
            self._backoff = 0.0
            self._start(sock, address)
        return True

    def _start(self, sock: socket.socket, address: Any) -> None:
        peer = f"{address[0]}:{address[1]}" if isinstance(address, tuple) else "a peer"
        try:
            sock.setblocking(False)
            if sock.family in (socket.AF_INET, socket.AF_INET6):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            challenge = _new_challenge()
            sock.send(_frame(CHALLENGE + challenge))  # a few dozen bytes into an empty socket buffer
        except OSError:
            sock.close()
            return
        if len(self.pending) >= _pending_limit():
            self._drop(self._least_promising())
        shake = _Handshake(sock, peer, time.monotonic() + HANDSHAKE_SECONDS, challenge)
        self.pending[sock.fileno()] = shake
        self.selector.register(sock, selectors.EVENT_READ)

    def _least_promising(self) -> _Handshake:
        """The handshake to give up for a newcomer: the oldest that has not yet answered our challenge (a
        real client answers within milliseconds, so the old silent ones are the crowd), else the oldest."""
        for shake in self.pending.values():
            if shake.step == 0:
                return shake
        return next(iter(self.pending.values()))

    def _expire(self, now: float) -> None:
        while self.pending:
            oldest = next(iter(self.pending.values()))
            if oldest.deadline > now:
                break
            self._drop(oldest)

    def _drop(self, shake: _Handshake) -> None:
        self.pending.pop(shake.sock.fileno(), None)
        try:
            self.selector.unregister(shake.sock)
        except (KeyError, ValueError):
            pass
        shake.sock.close()

    # ---- one handshake ----------------------------------------------------------------------

    def _read(self, shake: _Handshake | None) -> None:
        """Read the rest of the message we wait for, never past it: what follows the last one is the
        peer's first request, which the admitted connection reads."""
        if shake is None:
            return
        have = len(shake.data)
        if have < 4:
            need = 4 - have
        else:
            size = struct.unpack("!i", shake.data[:4])[0]
            need = 4 + size - have
        try:
            chunk = shake.sock.recv(need)
        except BlockingIOError:
            return
        except OSError:
            chunk = b""
        if not chunk:
            self._drop(shake)
            return
        shake.data += chunk
        if len(shake.data) < 4:
            return
        size = struct.unpack("!i", shake.data[:4])[0]
        if not 0 <= size <= MAX_HANDSHAKE_MESSAGE:
            self._drop(shake)  # not a handshake message: a stranger gets no word of why
            return
        if len(shake.data) < 4 + size:
            return
        message = bytes(shake.data[4:])
        shake.data = bytearray()
        try:
            self._step(shake, message)
        except OSError:
            self._drop(shake)

    def _step(self, shake: _Handshake, message: bytes) -> None:
        if shake.step == 0:  # its answer to our challenge
            if not _answer_ok(self.authkey, shake.challenge, message):
                shake.sock.send(_frame(FAILURE))
                log.warning("refused a connection from %s: wrong authkey", shake.peer)
                self._drop(shake)
                return
            shake.sock.send(_frame(WELCOME))
            shake.step = 1
        elif shake.step == 1:  # its challenge to us
            if not message.startswith(CHALLENGE):
                self._drop(shake)
                return
            shake.sock.send(_frame(_answer(self.authkey, message[len(CHALLENGE):])))
            shake.step = 2
        else:  # its verdict on our answer
            if message != WELCOME:
                self._drop(shake)
                return
            self.pending.pop(shake.sock.fileno(), None)
            self.selector.unregister(shake.sock)
            self._admit(shake)

    def _admit(self, shake: _Handshake) -> None:
        sock = shake.sock
        try:
            sock.setblocking(True)
            conn = connection.Connection(sock.detach())
        except OSError:
            sock.close()
            return
        try:
            self.admit(conn)
        except RuntimeError as exc:  # "can't start new thread": a pids limit, or memory
            conn.close()
            self._say("thread", "refused a connection from %s: cannot start a thread for it (%s)", shake.peer, exc)

    def _say(self, what: str, message: str, *args: Any) -> None:
        now = time.monotonic()
        if now - self._said.get(what, -1e9) >= 10.0:
            self._said[what] = now
            log.warning(message, *args)
