"""Shared fixtures: a real cluster (master + agents as processes) in a temporary state directory; real sshd hosts."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path
from typing import Callable, Iterator

import pytest

from scripts.sshlab import SshLab, kill_remote_agents, sshd_missing
from tests.cluster import Cluster

REQUIRE_SSHD_ENV = "CORRAL_REQUIRE_SSHD"
REQUIRE_TMUX_ENV = "CORRAL_REQUIRE_TMUX"
SOAK_ENV = "CORRAL_SOAK"  # CI sets it: the long fault-injection runs are deselected from a plain `pytest -q`
SCALE_ENV = "CORRAL_SCALE"  # CI sets it: the crowd of agents (minutes, every core) likewise


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Deselect the `soak` and `scale` tests unless their variable is 1 (CI sets both) or they were asked
    for with `-m soak` / `-m scale`."""
    for marker, env in (("soak", SOAK_ENV), ("scale", SCALE_ENV)):
        if os.environ.get(env) == "1" or marker in (config.getoption("markexpr") or ""):
            continue
        marked = [item for item in items if item.get_closest_marker(marker)]
        if marked:
            config.hook.pytest_deselected(items=marked)
            items[:] = [item for item in items if not item.get_closest_marker(marker)]


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[Cluster]:
    """A running master with no agents yet; agents are started by the test with cluster.start_agent()."""
    c = Cluster(tmp_path / "home")
    try:
        c.start_master()  # inside the try: a master slow to start under load is still stopped
        yield c
    finally:
        c.stop()


def require_sshd() -> None:
    """Skip the calling test where sshd is missing; with CORRAL_REQUIRE_SSHD=1 (CI) that is a failure."""
    why = sshd_missing()
    if not why:
        return
    if os.environ.get(REQUIRE_SSHD_ENV) == "1":
        pytest.fail(f"{why}, and {REQUIRE_SSHD_ENV}=1 says these tests must run")
    pytest.skip(f"{why}; CI sets {REQUIRE_SSHD_ENV}=1 to make this a failure")


@pytest.fixture
def lab(tmp_path: Path) -> Iterator[SshLab]:
    """A client key, ssh config and known_hosts of the test's own (scripts/sshlab.py); hosts are added by the test."""
    require_sshd()
    the_lab = SshLab(tmp_path / "lab")
    try:
        yield the_lab
    finally:
        for host in the_lab.hosts.values():
            kill_remote_agents(host)
        the_lab.stop()


@pytest.fixture
def ssh_cluster(tmp_path: Path, lab: SshLab) -> Iterator[Cluster]:
    """A running master that sees the lab's ssh config and known_hosts (never the machine's ~/.ssh)."""
    cluster = Cluster(tmp_path / "home")
    cluster.env.update(lab.env())
    cluster.env.pop("SSH_AUTH_SOCK", None)
    try:
        cluster.start_master()
        yield cluster
    finally:
        for host in lab.hosts.values():
            kill_remote_agents(host)
        cluster.stop()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo):  # type: ignore[no-untyped-def]
    """With CORRAL_NO_SKIPS=1 (CI sets it), a skipped test is a failure: CI must run everything."""
    outcome = yield
    report = outcome.get_result()
    if os.environ.get("CORRAL_NO_SKIPS") == "1" and report.skipped:
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        report.outcome = "failed"
        report.longrepr = f"skipped, but CORRAL_NO_SKIPS=1 forbids skips in CI: {reason}"


@pytest.fixture
def tmux(tmp_path: Path) -> Callable[..., str]:
    """`tmux(*args)` against a private server (its own socket), killed afterwards."""
    if shutil.which("tmux") is None:
        if os.environ.get(REQUIRE_TMUX_ENV) == "1":
            pytest.fail(f"tmux is missing, and {REQUIRE_TMUX_ENV}=1 says this test must run")
        pytest.skip(f"tmux is missing (apt-get install tmux); CI sets {REQUIRE_TMUX_ENV}=1 to make this a failure")
    socket = tmp_path / "tmux.sock"

    def run(*args: str) -> str:
        done = subprocess.run(["tmux", "-u", "-S", str(socket), *args], capture_output=True, text=True, timeout=30)
        assert done.returncode == 0, f"tmux {' '.join(args)}: {done.stderr}"
        return done.stdout

    try:
        yield run
    finally:
        subprocess.run(["tmux", "-S", str(socket), "kill-server"], capture_output=True, timeout=30)
