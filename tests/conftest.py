"""Shared fixtures: a real cluster (master + agents as processes) in a temporary state directory."""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

import pytest

from tests.cluster import Cluster


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[Cluster]:
    """A running master with no agents yet; agents are started by the test with cluster.start_agent()."""
    c = Cluster(tmp_path / "home")
    c.start_master()
    try:
        yield c
    finally:
        c.stop()
