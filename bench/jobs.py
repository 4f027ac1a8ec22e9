"""Module-level job functions every system runs, found by name (`bench.jobs:inc`) or by pickled reference."""

from __future__ import annotations

import subprocess


def inc(x: int) -> int:
    """W1/W2: the trivial job."""
    return x + 1


def shell(command: str) -> int:
    """W3 and M on Pool and the seed: run `command` the way a corral shell job runs it, return its exit code.

    Same as corral's agent: `/bin/sh -c`, its own session, stdout and stderr captured, stdin closed.
    """
    proc = subprocess.run(
        ["/bin/sh", "-c", command],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        start_new_session=True,
        check=False,
    )
    return proc.returncode
