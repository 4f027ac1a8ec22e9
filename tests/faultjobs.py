"""Module-level job functions for the fault, security and soak tests (agents import them by name)."""

from __future__ import annotations

import sys
import time


def soak(i: int, seconds: float = 0.0) -> int:
    """A cheap job whose value proves which job ran: returns its own index."""
    if seconds:
        time.sleep(seconds)
    return i


def chatter(megabytes: int) -> int:
    """Print `megabytes` lines of one MiB each (hundreds of MB in all); returns how many."""
    line = "y" * (1024 * 1024 - 1)
    for _ in range(megabytes):
        print(line)
    return megabytes


def not_utf8() -> str:
    """Print text that is not valid Unicode (a lone surrogate, as surrogateescape makes from
    undecodable file names), on both streams, then fail with it in the error too."""
    print("before \udcff after")
    print("err \ud800", file=sys.stderr)
    raise ValueError("bad name \udcfe")
