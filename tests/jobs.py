"""Module-level job functions the tests submit as callables (agents import them by name)."""

from __future__ import annotations

import datetime
import os
import time


def inc(x: int) -> int:
    return x + 1


def a_date(year: int) -> datetime.date:
    """A value that is not plain data (its class must be imported to unpickle it)."""
    return datetime.date(year, 1, 2)


def boom(message: str) -> None:
    raise ValueError(message)


def nap(seconds: float) -> float:
    time.sleep(seconds)
    return seconds


def shout(text: str) -> str:
    print(text.upper())
    return text


def getenv(name: str) -> str | None:
    return os.environ.get(name)


def die() -> None:
    os._exit(7)


def environ() -> dict[str, str]:
    """The whole environment the job runs in."""
    return dict(os.environ)


def meddle_env_and_nap(seconds: float) -> None:
    """Change the pool worker's environment itself, then sleep (to be timed out or cancelled)."""
    os.environ["MEDDLED"] = "by an earlier job"
    os.environ.pop("CORRAL_HOME", None)
    time.sleep(seconds)


def run_shell(text: str) -> int:
    """Run shell text from inside the callable (in a session of its own, as a careless job might); its exit code."""
    import subprocess

    return subprocess.run(["/bin/sh", "-c", text], start_new_session=True, stdout=subprocess.DEVNULL).returncode


def escape_then(text: str, ready: str, end: str) -> None:
    """Start shell text in a session of its own and leave it running; once the file `ready` exists,
    end as told: "exit" ends the pool worker itself (os._exit), "stubborn" ignores the timeout signal."""
    import signal
    import subprocess
    from pathlib import Path

    subprocess.Popen(["/bin/sh", "-c", text], start_new_session=True, stdout=subprocess.DEVNULL)
    while not Path(ready).exists():
        time.sleep(0.05)
    if end == "exit":
        os._exit(3)
    signal.signal(signal.SIGALRM, signal.SIG_IGN)
    time.sleep(300)
