"""The fast tier's fixtures: a real Scheduler on a real SQLite journal in a temporary directory, no processes."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterator

import pytest

from corral.console.master.scheduler import Scheduler
from corral.console.master.store import Journal


class Master:
    """A scheduler over a journal file, that can be "restarted": closed and opened again on the same file."""

    def __init__(self, path: Path, **options: Any) -> None:
        self.path = path
        self.options = options
        self.scheduler = Scheduler(Journal(path), **options)

    def restart(self) -> Scheduler:
        self.scheduler.journal.close()
        self.scheduler = Scheduler(Journal(self.path), **self.options)
        return self.scheduler

    def close(self) -> None:
        self.scheduler.journal.close()


@pytest.fixture
def master(tmp_path: Path) -> Iterator[Master]:
    m = Master(tmp_path / "corral.db")
    try:
        yield m
    finally:
        m.close()


@pytest.fixture
def scheduler(master: Master) -> Scheduler:
    return master.scheduler
