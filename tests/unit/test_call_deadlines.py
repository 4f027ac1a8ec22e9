"""Deadlines on the client side of the managers protocol (agent/connection.py), against real sockets that go silent."""

from __future__ import annotations

import socket
import threading
import time
from multiprocessing.managers import BaseManager
from typing import Any, Iterator

import pytest

from corral.agent import connection
from corral.agent.connection import SERIALIZER, Backoff, CallTimeout, call, deadline

AUTHKEY = b"k" * 32


@pytest.fixture
def silent_peer() -> Iterator[tuple[str, int]]:
    """A listener that accepts and then never says a word (a SIGSTOPped master, as the socket sees it)."""
    listener = socket.create_server(("127.0.0.1", 0))
    held: list[socket.socket] = []
    done = threading.Event()

    def accept() -> None:
        listener.settimeout(0.1)
        while not done.is_set():
            try:
                held.append(listener.accept()[0])
            except OSError:
                continue

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    try:
        yield listener.getsockname()
    finally:
        done.set()
        thread.join()
        for sock in held:
            sock.close()
        listener.close()


class _Calc:
    def add(self, a: int, b: int) -> int:
        return a + b

    def nap(self, seconds: float) -> str:
        time.sleep(seconds)
        return "awake"


class _Manager(BaseManager):
    pass


_calc = _Calc()


def _get_calc() -> _Calc:
    return _calc


_Manager.register("calc", callable=_get_calc)


@pytest.fixture
def server() -> Iterator[tuple[str, int]]:
    """A real managers server speaking our serializer, in a thread of this process."""
    manager = _Manager(address=("127.0.0.1", 0), authkey=AUTHKEY, serializer=SERIALIZER)
    srv = manager.get_server()
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    yield srv.address


def _proxy(address: tuple[str, int]) -> Any:
    manager = _Manager(address=address, authkey=AUTHKEY, serializer=SERIALIZER)
    manager.connect()
    return manager.calc()  # type: ignore[attr-defined]


def test_a_handshake_with_a_silent_peer_ends_at_its_deadline(silent_peer: tuple[str, int]) -> None:
    began = time.monotonic()
    with pytest.raises(CallTimeout), deadline(0.5):
        connection.Client(silent_peer, authkey=AUTHKEY)
    assert 0.4 < time.monotonic() - began < 3.0


def test_a_call_past_its_deadline_is_abandoned_and_its_connection_dropped(server: tuple[str, int]) -> None:
    proxy = _proxy(server)
    assert call(proxy, "add", 5.0, 2, 3) == 5
    first = proxy._tls.connection
    began = time.monotonic()
    with pytest.raises(CallTimeout):
        call(proxy, "nap", 0.3, 2.0)
    assert time.monotonic() - began < 1.5
    assert getattr(proxy._tls, "connection", None) is None  # dropped: its stream still holds the late reply
    assert first.closed
    # The next call makes a new connection, and gets its own answer (not the abandoned call's).
    assert call(proxy, "add", 5.0, 20, 22) == 42


def test_nested_deadlines_keep_the_earlier(server: tuple[str, int]) -> None:
    proxy = _proxy(server)
    with pytest.raises(CallTimeout), deadline(0.3):
        call(proxy, "nap", 30.0, 2.0)


def test_backoff_grows_to_its_cap_with_jitter() -> None:
    backoff = Backoff(first=0.5, cap=4.0)
    pauses = [backoff.next() for _ in range(8)]
    assert 0.25 <= pauses[0] <= 0.5 and 0.5 <= pauses[1] <= 1.0
    assert all(2.0 <= p <= 4.0 for p in pauses[4:])  # capped, never zero
    assert len({round(p, 6) for p in pauses[4:]}) > 1  # jittered: a crowd does not come back in step
    backoff.reset()
    assert backoff.next() <= 0.5
