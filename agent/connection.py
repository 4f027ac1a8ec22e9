"""TCP for the managers protocol with Nagle's algorithm off, registered as the serializer SERIALIZER.

multiprocessing.connection writes a large message as two writes (length, then body) and the
handshake ends with two writes in a row; with Nagle on, the second waits for the peer's delayed
ACK: about 40 ms per round trip on Linux. Every corral manager (master, agents, clients) uses
this serializer: plain pickle, over sockets with TCP_NODELAY set on both ends.
"""

from __future__ import annotations

import socket
from multiprocessing import connection, managers
from typing import Any, Optional, Tuple

SERIALIZER = "pickle-nodelay"


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
    """multiprocessing.connection.Client for TCP, with TCP_NODELAY set before the handshake."""
    if family not in (None, "AF_INET", "AF_INET6") or not isinstance(address, tuple):
        return connection.Client(address, family, authkey)
    sock = socket.create_connection(address)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    conn = connection.Connection(sock.detach())
    if authkey is not None:
        connection.answer_challenge(conn, authkey)
        connection.deliver_challenge(conn, authkey)
    return conn


class Listener(connection.Listener):
    """multiprocessing.connection.Listener whose accepted connections have TCP_NODELAY set."""

    def accept(self) -> connection.Connection:
        return nodelay(super().accept())


# managers looks serializers up by name, for the server, the manager and every proxy alike (the table
# has no public setter, and typeshed does not list it).
managers.listener_client[SERIALIZER] = (Listener, Client)  # type: ignore[attr-defined]
