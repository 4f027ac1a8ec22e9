"""The journal's WAL file is cut back once a checkpoint has emptied it: a burst does not keep its size for ever."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from corral.agent.protocol import JobSpec
from corral.console.master import store
from corral.console.master.scheduler import Scheduler


def test_a_burst_grows_the_wal_and_the_next_write_after_a_checkpoint_cuts_it_back(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(store, "WAL_SIZE_LIMIT", 1024 * 1024)
    path = tmp_path / "corral.db"
    s = Scheduler(store.Journal(path), lease_seconds=10.0)
    wal = Path(f"{path}-wal")
    try:
        spec = JobSpec(command="echo " + "x" * 2000).to_wire()
        for _ in range(10):
            s.submit([spec] * 500)
        assert os.path.getsize(wal) > 10 * 1024 * 1024  # 5,000 jobs of 2 kB, no checkpoint between
        s.journal.checkpoint()
        s.submit([spec])  # the first write after a full checkpoint starts the WAL over, and cuts it
        assert os.path.getsize(wal) <= 1024 * 1024
        assert s.journal.health.ok and len(s.jobs) == 5001
    finally:
        s.journal.close()
