"""Shared fixtures: a real cluster (master + agents as processes) in a temporary state directory."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Iterator

import pytest

from tests.cluster import Cluster

# The real-sshd fixtures (`lab`, `ssh_cluster`), for every test module that asks for them.
pytest_plugins = ["tests.sshhosts"]


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[Cluster]:
    """A running master with no agents yet; agents are started by the test with cluster.start_agent()."""
    c = Cluster(tmp_path / "home")
    c.start_master()
    try:
        yield c
    finally:
        c.stop()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo):  # type: ignore[no-untyped-def]
    """With CORRAL_NO_SKIPS=1 (CI sets it), a skipped test is a failure: CI must run everything."""
    outcome = yield
    report = outcome.get_result()
    if os.environ.get("CORRAL_NO_SKIPS") == "1" and report.skipped:
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        report.outcome = "failed"
        report.longrepr = f"skipped, but CORRAL_NO_SKIPS=1 forbids skips in CI: {reason}"
