"""Module-level job functions the tests submit as callables (agents import them by name)."""

from __future__ import annotations

import os
import time


def inc(x: int) -> int:
    return x + 1


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
