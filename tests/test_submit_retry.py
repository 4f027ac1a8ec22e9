"""A submission whose reply is lost with its connection is sent again, and queued once: the connection is cut by a
real TCP relay between the client and a real master, after the master journaled the submission and answered it,
before the client reads the answer."""

from __future__ import annotations

import json
import operator
import os
import pickle
import shutil
import socket
import sqlite3
import struct
import threading
from pathlib import Path
from typing import Iterator

import pytest

from corral import Client, Executor, Pool
from corral.agent.protocol import JobSpec
from corral.console.errors import MasterUnreachable
from tests.cluster import Cluster

Relayed = tuple[Cluster, "CuttingRelay", Path]
neg = operator.neg  # a second function agents can import


def _read_frame(sock: socket.socket) -> bytes | None:
    """One message of multiprocessing.connection's framing (a 4-byte length, or -1 and an 8-byte length), whole."""
    header = _read_exactly(sock, 4)
    if header is None:
        return None
    size = struct.unpack("!i", header)[0]
    if size == -1:
        more = _read_exactly(sock, 8)
        if more is None:
            return None
        header += more
        size = struct.unpack("!Q", more)[0]
    body = _read_exactly(sock, size)
    return None if body is None else header + body


def _read_exactly(sock: socket.socket, size: int) -> bytes | None:
    data = b""
    while len(data) < size:
        try:
            chunk = sock.recv(size - len(data))
        except OSError:
            return None
        if not chunk:
            return None
        data += chunk
    return data


class CuttingRelay:
    """Relays whole messages between clients and the master. Armed, it lets the next submit_map through to the
    master, reads the master's answer (so the master has journaled it), and instead of passing it on closes
    that connection at both ends."""

    def __init__(self, target: tuple[str, int]) -> None:
        self.target = target
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.address = self.listener.getsockname()[:2]
        self.armed = threading.Event()
        self.skip = 0  # armed: how many submit_map requests to let through whole before the one that is cut
        self.cut = threading.Event()  # a submit_map's answer was read and dropped
        self.submits = 0  # submit_map requests relayed
        self.lock = threading.Lock()
        self.sockets: list[socket.socket] = []
        self.accepter = threading.Thread(target=self._accept, daemon=True)
        self.accepter.start()

    def _accept(self) -> None:
        while True:
            try:
                near, _ = self.listener.accept()
            except OSError:
                return
            try:
                far = socket.create_connection(self.target)
            except OSError:  # the master has gone (the test is ending): so has this client's connection
                _close(near)
                continue
            cut_reply = threading.Event()
            with self.lock:
                self.sockets += [near, far]
            threading.Thread(target=self._upstream, args=(near, far, cut_reply), daemon=True).start()
            threading.Thread(target=self._downstream, args=(far, near, cut_reply), daemon=True).start()

    def _upstream(self, near: socket.socket, far: socket.socket, cut_reply: threading.Event) -> None:
        while (frame := _read_frame(near)) is not None:
            if b"submit_map" in frame:
                with self.lock:
                    self.submits += 1
                    if self.armed.is_set() and self.skip:
                        self.skip -= 1
                    elif self.armed.is_set():
                        self.armed.clear()
                        cut_reply.set()  # before the request goes on: its answer cannot overtake this
            try:
                far.sendall(frame)
            except OSError:
                break
        _close(near, far)

    def _downstream(self, far: socket.socket, near: socket.socket, cut_reply: threading.Event) -> None:
        while (frame := _read_frame(far)) is not None:
            if cut_reply.is_set():
                self.cut.set()  # the master answered (its journal written); the client never hears it
                _close(near, far)
                return
            try:
                near.sendall(frame)
            except OSError:
                break
        _close(near, far)

    def close(self) -> None:
        self.listener.close()
        with self.lock:
            for sock in self.sockets:
                _close(sock)


def _close(*socks: socket.socket) -> None:
    for sock in socks:
        try:
            sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        sock.close()


@pytest.fixture
def relayed(cluster: Cluster, tmp_path: Path) -> Iterator[Relayed]:
    """(cluster with one agent, relay, a state directory whose master is the relay: same authkey)."""
    cluster.start_agent("a1", slots=4)
    relay = CuttingRelay(cluster.address())
    home = tmp_path / "via-relay"
    home.mkdir(mode=0o700)
    shutil.copy(cluster.home / "authkey", home / "authkey")
    os.chmod(home / "authkey", 0o600)
    (home / "master.json").write_text(json.dumps({"host": relay.address[0], "port": relay.address[1],
                                                  "pid": cluster.master.pid if cluster.master else 0}))
    try:
        yield cluster, relay, home
    finally:
        relay.close()


def _jobs(cluster: Cluster) -> list[tuple[int, str]]:
    db = sqlite3.connect(cluster.home / "corral.db", timeout=30)
    try:
        return db.execute("SELECT id, name FROM jobs ORDER BY id").fetchall()
    finally:
        db.close()


def test_a_pool_whose_submit_reply_was_lost_queues_its_jobs_once(relayed: Relayed) -> None:
    cluster, relay, home = relayed
    with Pool(home=home) as p:
        relay.armed.set()
        assert p.map(abs, range(-40, 0), chunksize=1) == list(range(40, 0, -1))
        name = p.name
    assert relay.cut.is_set()  # the master's answer to the first submit_map never reached the pool
    assert relay.submits == 2  # so the pool sent it again, on a new connection
    jobs = _jobs(cluster)
    assert sorted(n for _, n in jobs) == sorted(f"{name} [{i}/40]" for i in range(1, 41))  # each job once
    assert [i for i, _ in jobs] == list(range(1, 41))

    # An Executor's engine is the same; and the next submission after a cut is a new one.
    with Executor(home=home) as ex:
        assert ex.submit(pow, 2, 5).result(timeout=60) == 32
        relay.armed.set()
        assert ex.submit(pow, 3, 3).result(timeout=60) == 27
    assert relay.submits == 5 and len(_jobs(cluster)) == 42


def test_a_batch_cut_after_its_first_submission_sends_only_the_rest_again(relayed: Relayed) -> None:
    cluster, relay, home = relayed
    heard: list[list[int]] = []
    with Pool(home=home) as p:
        relay.skip = 1
        relay.armed.set()
        # Two maps of two functions: two submissions, in one batch when the engine takes both at once.
        first = p.map_async(abs, range(-10, 0), chunksize=1, callback=heard.append)
        second = p.map_async(neg, range(10), chunksize=1, callback=heard.append)
        assert first.get(60) == list(range(10, 0, -1)) and second.get(60) == [-x for x in range(10)]
        name = p.name
    assert relay.cut.is_set() and relay.submits == 3
    assert sorted(heard) == sorted([list(range(10, 0, -1)), [-x for x in range(10)]])  # each callback once
    names = [n for _, n in _jobs(cluster)]
    assert len(names) == 20 and sorted(names) == sorted(f"{name} [{i}/10]" for i in range(1, 11) for _ in (1, 2))


def test_the_client_sends_a_lost_submission_again_under_its_token(relayed: Relayed) -> None:
    cluster, relay, home = relayed
    template = JobSpec(func="builtins:abs", name="retry").to_wire()
    payloads = [pickle.dumps(((-i,), {})) for i in range(1, 6)]
    relay.armed.set()
    with Client(home=home) as c, pytest.raises(MasterUnreachable):
        c.submit_batch(template, payloads, 0.0, "client-token-1")
    assert relay.cut.is_set() and len(_jobs(cluster)) == 5  # journaled, though the client never heard so
    with Client(home=home) as c:
        ids, _ = c.submit_batch(template, payloads, 0.0, "client-token-1")
        assert ids == [1, 2, 3, 4, 5] and len(_jobs(cluster)) == 5
        assert c.map(abs, [-1]) == [1]  # the relay passes everything else
        assert c.wait(ids, 30) == dict.fromkeys(ids, "done") and c.values(ids) == [1, 2, 3, 4, 5]
