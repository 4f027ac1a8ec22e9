"""`corral` start-up when something is wrong: one line on stderr, a non-zero exit, nothing started by mistake."""

from __future__ import annotations

from pathlib import Path

from corral.console.state import StateDir
from corral.console.local import attach_or_start, stop_embedded
from tests.cluster import Cluster


def _one_line(text: str) -> str:
    lines = text.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in text, text
    return lines[0]


def test_state_directory_that_is_a_file(tmp_path: Path) -> None:
    home = tmp_path / "home"
    home.write_text("not a directory")
    cluster = Cluster(tmp_path / "other")  # only for its env and its way of running the CLI
    cluster.env["CORRAL_HOME"] = str(home)
    done = cluster.corral()
    assert done.returncode == 1
    assert "is not a directory" in _one_line(done.stderr) and _one_line(done.stderr).startswith("corral: ")


def test_master_that_cannot_start_says_why(tmp_path: Path) -> None:
    cluster = Cluster(tmp_path / "home")
    (cluster.home / "corral.db").write_bytes(b"this is not an SQLite database" * 100)
    done = cluster.corral("--no-local-agent")
    assert done.returncode == 1
    line = _one_line(done.stderr)
    assert "the master exited at start-up" in line and "logs/master.log" in line
    assert not (cluster.home / "master.json").exists()


def test_wrong_authkey_starts_nothing(cluster: Cluster) -> None:
    (cluster.home / "authkey").write_text("f" * 64 + "\n")
    done = cluster.corral()
    assert done.returncode == 1
    assert "refused our authkey" in _one_line(done.stderr)
    assert cluster.master.poll() is None
    assert not (cluster.home / "console.json").exists()  # no second master, no local agent


def test_bad_slots_is_a_usage_error(tmp_path: Path) -> None:
    done = Cluster(tmp_path / "home").corral("--slots", "0")
    assert done.returncode == 2 and "--slots" in _one_line(done.stderr)


def test_embedded_without_local_agent(tmp_path: Path) -> None:
    state = StateDir(tmp_path / "home")
    try:
        attachment = attach_or_start(state, local_agent=False)
        assert attachment.started and attachment.embedded and attachment.agent_pid is None
        assert "local agent" not in attachment.greeting()
        again = attach_or_start(state, local_agent=False)
        assert not again.started and again.embedded and again.master_pid == attachment.master_pid
    finally:
        assert stop_embedded(state) == [f"stopped the master (pid {attachment.master_pid})"]
