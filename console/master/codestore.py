"""Shipped code at the master: bundles as content-addressed files in the state directory, bounded, served to agents."""

from __future__ import annotations

import logging
import os
import threading
import uuid
from pathlib import Path
from typing import Any

from corral.agent.codecache import BadBundle, is_digest, read_bundle
from corral.agent.errors import CorralError, JournalFailed
from corral.agent.protocol import MAX_BUNDLE_BYTES

log = logging.getLogger(__name__)

# All bundles kept, at most; the least recently used go first when a new one would pass it.
MAX_STORE_BYTES = 512 * 1024 * 1024
EXPOSED = ("missing", "put", "get")


class CodeStore:
    """<directory>/<sha256>.zip, one file per bundle. Methods are called from the master's connection
    threads, concurrently: writes are atomic renames, and the size bound is kept under one lock."""

    def __init__(self, directory: Path, limit: int = MAX_STORE_BYTES) -> None:
        self.directory = directory
        self.limit = limit
        self.lock = threading.Lock()
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)

    def _path(self, digest: object) -> Path:
        if not is_digest(digest):
            raise BadBundle(f"{str(digest)[:80]!r} is not a code bundle's name (a sha256 hex digest)")
        return self.directory / f"{digest}.zip"

    def missing(self, digests: list[Any]) -> list[str]:
        """Those of `digests` the store does not hold (the others count as just used)."""
        if type(digests) is not list or len(digests) > 1000:
            raise BadBundle("missing() takes a list of at most 1000 digests")
        out = []
        for digest in digests:
            path = self._path(digest)
            try:
                os.utime(path)
            except FileNotFoundError:
                out.append(str(digest))
        return out

    def put(self, digest: str, data: bytes) -> None:
        """Keep a bundle, once its content checks out against its name and the limits (BadBundle if not)."""
        path = self._path(digest)
        if type(data) is not bytes or len(data) > MAX_BUNDLE_BYTES:
            raise BadBundle(f"a code bundle may be at most {MAX_BUNDLE_BYTES} bytes")
        read_bundle(data, digest)
        stage = path.with_name(f".{digest}.{uuid.uuid4().hex[:8]}")
        with self.lock:
            self._make_room(len(data))
            try:
                # Made with its final mode (agents run what is in it), by us alone, never through a link.
                fd = os.open(str(stage), os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
                with os.fdopen(fd, "wb") as f:
                    f.write(data)
                os.replace(stage, path)
            except OSError as exc:
                # A full or read-only disk: the caller's one line, not an OSError that a client would take
                # for its connection breaking. A client sends it again (a Pool does, while it waits).
                stage.unlink(missing_ok=True)
                raise JournalFailed(f"code bundle write failed: {exc.strerror or exc} ({self.directory})",
                                    "nothing was stored; free space or fix the file system, then try again") from None
        log.info("code bundle %s stored (%d bytes)", digest[:12], len(data))

    def get(self, digest: str) -> bytes:
        """A bundle's bytes, for an agent about to run a job that needs it."""
        path = self._path(digest)
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            raise CorralError(f"the master holds no code bundle {digest[:12]}",
                              "it was removed to make room; submit the job again") from None
        os.utime(path)
        return data

    def _make_room(self, size: int) -> None:
        """Remove the least recently used bundles until `size` more fits under the limit (lock held)."""
        bundles = []
        for entry in os.scandir(self.directory):
            if entry.name.endswith(".zip") and entry.is_file():
                stat = entry.stat()
                bundles.append((stat.st_mtime, stat.st_size, entry.path))
        total = sum(b[1] for b in bundles)
        for _, used, where in sorted(bundles):
            if total + size <= self.limit:
                break
            os.unlink(where)
            total -= used
            log.info("code bundle %s removed to make room", os.path.basename(where)[:12])


# Module-level (no lambdas): the registered callable must be importable by name.
_store: CodeStore | None = None


def open_store(directory: Path) -> CodeStore:
    global _store
    _store = CodeStore(directory)
    return _store


def get_code_store() -> CodeStore:
    assert _store is not None, "the master has no code store yet"
    return _store
