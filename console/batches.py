"""Names for batches of jobs (pool-3, executor-4, map-5): one counter in the state directory, for every client of a master."""

from __future__ import annotations

import fcntl
import itertools
import os
import threading
from pathlib import Path

COUNTER_NAME = "batches"
BLOCK = 20  # numbers a process takes from the counter at once (a file lock costs ~0.1-0.3 ms here)

_lock = threading.Lock()
_blocks: dict[str, tuple[int, int]] = {}  # state directory -> (next number, end of this process's block)
_fallback = itertools.count(1)


def _take_block(home: Path) -> int:
    """The first number of a fresh block of BLOCK, from <home>/batches (locked: other clients take blocks too)."""
    path = home / COUNTER_NAME
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        text = os.read(fd, 64).decode(errors="replace").strip()
        first = int(text) if text.isdigit() else 1
        os.lseek(fd, 0, os.SEEK_SET)
        os.ftruncate(fd, 0)
        os.write(fd, str(first + BLOCK).encode())
        return first
    finally:
        os.close(fd)


def batch_name(kind: str, home: Path) -> str:
    """A name no other batch of this state directory has, e.g. "pool-3"; unique within this process if the
    directory cannot be written."""
    key = str(home)
    with _lock:
        number, end = _blocks.get(key, (0, 0))
        if number >= end:
            try:
                number = _take_block(home)
            except OSError:
                return f"{kind}-{os.getpid()}.{next(_fallback)}"
            end = number + BLOCK
        _blocks[key] = (number + 1, end)
    return f"{kind}-{number}"


def in_batch(job_name: str, batch: str) -> bool:
    """Whether a job's name is one of batch `batch`'s ("pool-3 [17/200]" is pool-3's; "pool-30 [1]" is not)."""
    return job_name == batch or job_name.startswith(batch + " [")
