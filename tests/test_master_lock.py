"""One master per state directory: a second `corral master` on the same home is refused in one line while
the first lives (even stopped with SIGSTOP: a lock, not a pid check), leaves the first's master.json alone,
and starts once the first has gone, however it went (SIGTERM, or kill -9 with its master.json left behind)."""

from __future__ import annotations

import json
import os
import pwd
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from corral.agent.protocol import JobSpec
from tests.cluster import REPO, wait_until
from tests.faultkit import journal_outcomes, record_run, running_cluster, times_run


def second_master(home: Path, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "corral", "master"], env=env, cwd=REPO, capture_output=True,
                          text=True, timeout=60)


def test_second_master_on_the_same_home_is_refused(tmp_path: Path) -> None:
    home = tmp_path / "home"
    with running_cluster(home) as cluster:
        assert cluster.master is not None
        first = cluster.master
        record = (home / "master.json").read_text()
        host, port = cluster.address()
        expected = f"corral master: a master is already running here (pid {first.pid}, {host}:{port})"

        refused = second_master(home, cluster.env)
        assert refused.returncode == 1, refused
        assert refused.stdout == ""
        [line] = refused.stderr.splitlines()
        assert line.startswith(expected), line
        assert (home / "master.json").read_text() == record  # the refused one neither wrote nor removed it

        # Stopped, the first still holds the directory: no liveness guess lets a second one in.
        first.send_signal(signal.SIGSTOP)
        try:
            refused = second_master(home, cluster.env)
        finally:
            first.send_signal(signal.SIGCONT)
        assert refused.returncode == 1 and refused.stderr.splitlines() == [line], refused
        assert (home / "master.json").read_text() == record

        # The first serves on, as if nothing had happened.
        cluster.start_agent("a", slots=1)
        runs = tmp_path / "runs"
        with cluster.client() as c:
            jobs = c.submit([JobSpec(command=record_run(runs) + "echo still here") for _ in range(5)])
            assert c.wait(jobs, timeout=60) == {j: "done" for j in jobs}
        job = jobs[0]

        # kill -9 leaves a stale master.json and lock file; the kernel has dropped the lock: a new master starts.
        first.send_signal(signal.SIGKILL)
        first.wait(timeout=10)
        assert json.loads((home / "master.json").read_text())["pid"] == first.pid
        second = cluster.start_master()
        assert json.loads((home / "master.json").read_text())["pid"] == second.pid
        with cluster.client() as c:
            assert c.wait([job], timeout=30) == {job: "done"}

        # A clean exit removes its own master.json, and the next master starts in its place.
        second.send_signal(signal.SIGTERM)
        assert second.wait(timeout=30) == 0
        assert not (home / "master.json").exists()
        third = cluster.start_master()
        wait_until(lambda: json.loads((home / "master.json").read_text())["pid"] == third.pid, what="the third master")
    # Through three masters, the refused ones among them: each job one outcome in the journal, run once.
    journal_outcomes(home / "corral.db", jobs)
    assert times_run(runs) == {j: 1 for j in jobs}


def test_a_lock_file_planted_by_another_user_is_refused(tmp_path: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("planting a file as `nobody` needs root; CI runs as root with CORRAL_NO_SKIPS=1")
    home = tmp_path / "home"
    home.mkdir(mode=0o700)
    planted = home / "master.lock"
    planted.write_text("{}")
    os.chown(planted, pwd.getpwnam("nobody").pw_uid, -1)
    env = dict(os.environ, CORRAL_HOME=str(home), PYTHONPATH=str(REPO))
    refused = second_master(home, env)
    assert refused.returncode == 1 and refused.stdout == "", refused
    [line] = refused.stderr.splitlines()
    assert line.startswith(f"corral master: refusing the master lock {planted}: it belongs to nobody"), line
    assert not (home / "master.json").exists() and not (home / "corral.db").exists()
