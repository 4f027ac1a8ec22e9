"""Job functions for the agent's in-process pool tests (found by name in the pool's workers)."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path


def pid() -> int:
    return os.getpid()


def nap_and_mark(path: str, seconds: float) -> None:
    """Say it started (the file), then sleep."""
    Path(path).write_text(str(os.getpid()))
    time.sleep(seconds)


def stubborn(seconds: float) -> None:
    """Ignore the timeout signal: only a kill of the worker ends it."""
    signal.signal(signal.SIGALRM, signal.SIG_IGN)
    time.sleep(seconds)
