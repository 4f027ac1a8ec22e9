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


def env_of(*names: str) -> dict:
    """The worker's environment, as far as these names go (None for unset)."""
    return {name: os.environ.get(name) for name in names}


def set_env_then(action: str, seconds: float = 0.0) -> None:
    """Change the worker's environment itself, then end as told: "raise", "nap" (for a timeout or a cancel) or "return"."""
    os.environ["SET_BY_JOB"] = "leak"
    os.environ.pop("HOME", None)
    os.environ["PATH"] = "/changed-by-job"
    if action == "raise":
        raise RuntimeError("failing with the environment changed")
    if action == "nap":
        time.sleep(seconds)


def write_bytes() -> None:
    """Output of every kind a callable may write: text, bytes, surrogateescape'd bytes, a lone surrogate."""
    import sys

    print("héllo")
    sys.stdout.flush()
    sys.stdout.buffer.write(b"\xff\x00raw\n")
    print("name " + b"\xfe".decode("utf-8", "surrogateescape"))
    print("odd \ud800")
    print("warn", file=sys.stderr)
