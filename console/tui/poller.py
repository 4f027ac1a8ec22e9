"""The console's one reader of the master: a snapshot a few times a second, from a worker thread, as messages."""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any, Callable

from textual.message import Message

from corral.agent.errors import CorralError

from ..client import Client
from .messages import MasterFound, MasterLost, SnapshotArrived

POLL_SECONDS = 0.25  # four looks a second: finished jobs show within a second of ending
RETRY_SECONDS = 1.0  # between attempts to reach a master that stopped answering


class Poller:
    """Runs in one worker thread (its own Client: a proxy is not shared across threads) and posts
    SnapshotArrived / MasterLost / MasterFound. The UI thread only sets views, wakes it, or stops it."""

    def __init__(self, home: Path | None, post: Callable[[Message], Any], interval: float = POLL_SECONDS) -> None:
        self.home = home
        self.post = post
        self.interval = interval
        self._views: dict[str, dict[str, Any]] = {}
        self._views_version = 0
        self._wake = threading.Event()
        self._stop = threading.Event()

    # ---- called from the UI thread ------------------------------------------------------

    def set_views(self, views: dict[str, dict[str, Any]]) -> None:
        """Ask for these windows from now on; the next look is at once and brings their rows."""
        if views != self._views:
            self._views = views
            self._views_version += 1  # one attribute write each: the thread reads a consistent pair often enough
        self._wake.set()

    def wake(self) -> None:
        """Look now (after a submit or a cancel) instead of at the next tick."""
        self._wake.set()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()

    @property
    def stopped(self) -> bool:
        return self._stop.is_set()

    # ---- the thread ---------------------------------------------------------------------

    def run(self) -> None:
        """Loop until stop(): look, post, wait for the tick or a wake."""
        client: Client | None = None
        lost = False
        address: tuple[str, int] | None = None  # where the master last answered
        seq, seen_version = 0, -1
        try:
            while not self._stop.is_set():
                if client is None:
                    try:
                        client = Client(home=self.home)
                    except CorralError as exc:  # no master.json, no authkey, refused, unreachable
                        if not lost:
                            lost = True
                            self.post(MasterLost(str(exc), address, time.time()))
                        self._sleep(RETRY_SECONDS)
                        continue
                    address = client.address
                    seq = 0  # a new connection may be a new master: ask for everything
                    if lost:
                        lost = False
                        self.post(MasterFound(client.address))
                version, views = self._views_version, self._views
                try:
                    snapshot = client.snapshot(seq if version == seen_version else 0, views)
                except CorralError as exc:
                    client.close()
                    client = None
                    if not lost:
                        lost = True
                        self.post(MasterLost(str(exc), address, time.time()))
                    self._sleep(RETRY_SECONDS)
                    continue
                seq, seen_version = snapshot["seq"], version
                self.post(SnapshotArrived(snapshot, views))
                self._sleep(self.interval)
        finally:
            if client is not None:
                client.close()

    def _sleep(self, seconds: float) -> None:
        self._wake.wait(seconds)
        self._wake.clear()
