"""The tests' one way to wait for something: poll a predicate until it holds or a deadline passes, naming what was awaited."""

from __future__ import annotations

import time
from typing import Any, Awaitable, Callable

# Generous: CI's machine is idle, but a developer's may be shared; a deadline bounds only a wait for
# something that should happen, never an assertion that something does not.
TIMEOUT = 30.0


class Deadline:
    """`timeout` seconds from now, and the one message a wait that outlives it fails with."""

    def __init__(self, timeout: float, what: str) -> None:
        self.timeout, self.what = timeout, what
        self.end = time.monotonic() + timeout

    def check(self) -> None:
        if time.monotonic() > self.end:
            raise AssertionError(f"timed out after {self.timeout}s waiting for {self.what}")


def wait_until(predicate: Callable[[], Any], timeout: float = TIMEOUT, interval: float = 0.02,
               what: str = "condition") -> Any:
    """Poll until predicate() is truthy; its value, or AssertionError naming `what`."""
    deadline = Deadline(timeout, what)
    while True:
        value = predicate()
        if value:
            return value
        deadline.check()
        time.sleep(interval)


async def wait_until_async(pause: Callable[[float], Awaitable[Any]], predicate: Callable[[], Any], what: str,
                           timeout: float = TIMEOUT, interval: float = 0.05) -> Any:
    """wait_until for code on an event loop (a Textual pilot: pass pilot.pause), which must keep running
    while we wait."""
    deadline = Deadline(timeout, what)
    while True:
        value = predicate()
        if value:
            return value
        deadline.check()
        await pause(interval)
