"""The `corral` command against a real master: outputs, exit codes, JSON, and every bad input in one line."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from tests.cluster import REPO, Cluster, wait_until


def one_line_error(result: subprocess.CompletedProcess, *needles: str) -> str:
    """Assert the command failed with exactly one line on stderr (no traceback) mentioning the needles."""
    assert result.returncode != 0, result
    err = result.stderr.strip()
    assert err.count("\n") == 0, f"expected one line, got:\n{result.stderr}"
    assert "Traceback" not in err
    for needle in needles:
        assert needle in err, err
    return err


def corral_in(home: Path, *args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, CORRAL_HOME=str(home), PYTHONPATH=str(REPO))
    return subprocess.run([sys.executable, "-m", "corral", *args], env=env, cwd=REPO,
                          capture_output=True, text=True, timeout=60)


# ---- good paths ---------------------------------------------------------------------------

def test_submit_prints_ids_and_wait_exit_codes(cluster: Cluster) -> None:
    cluster.start_agent("a", slots=2)
    submitted = cluster.corral("submit", "--count", "3", "--", "true")
    assert submitted.returncode == 0
    ids = [int(x) for x in submitted.stdout.split()]
    assert len(ids) == 3 and ids == sorted(ids)
    waited = cluster.corral("wait", *map(str, ids))
    assert waited.returncode == 0

    assert cluster.corral("submit", "--wait", "--", "echo hello").stdout == "hello\n"
    assert cluster.corral("submit", "--wait", "--", "exit 3").returncode == 3
    many = cluster.corral("submit", "--count", "4", "--wait", "--", "sh", "-c", "echo $CORRAL_INDEX; exit $CORRAL_INDEX")
    assert many.returncode == 3
    assert sorted(many.stdout.split()) == ["0", "1", "2", "3"]
    timed = cluster.corral("submit", "--timeout", "0.3", "--wait", "--", "sleep 30")
    assert timed.returncode == 124
    assert "timed out" in timed.stderr
    killed = cluster.corral("submit", "--wait", "--", "kill -9 $$")
    assert killed.returncode == 137


def test_call_with_json_arguments(cluster: Cluster) -> None:
    cluster.start_agent("a", slots=1)
    result = cluster.corral("call", "--wait", "tests.jobs:inc", "41")
    assert result.returncode == 0 and result.stdout == "42\n"
    failed = cluster.corral("call", "--wait", "tests.jobs:boom", '"no"')
    assert failed.returncode == 1
    assert "ValueError: no" in failed.stderr


def test_jobs_show_status_agents_json(cluster: Cluster) -> None:
    cluster.start_agent("a", slots=2, tags="x")
    done = cluster.corral("submit", "--name", "greet", "--env", "WHO=you", "--wait", "--", "echo hi $WHO")
    assert done.stdout == "hi you\n"
    job_id = json.loads(cluster.corral("jobs", "--json").stdout)[0]["id"]

    shown = json.loads(cluster.corral("show", str(job_id), "--json").stdout)
    assert shown["state"] == "done" and shown["name"] == "greet" and shown["env"] == {"WHO": "you"}
    assert shown["attempts_detail"][0]["stdout"] == "hi you\n"
    assert shown["attempts_detail"][0]["counted"] is True
    text = cluster.corral("show", str(job_id)).stdout
    assert "attempt 1 on a: done" in text and "hi you" in text

    listed = cluster.corral("jobs", "--state", "done")
    assert listed.returncode == 0 and "greet" in listed.stdout and listed.stdout.startswith("ID")

    status = json.loads(cluster.corral("status", "--json").stdout)
    assert status["counts"]["done"] == 1 and status["slots"] == 2
    assert [a["name"] for a in status["agents"]] == ["a"]
    agents = json.loads(cluster.corral("agents", "--json").stdout)
    assert agents[0]["tags"] == ["x"] and agents[0]["state"] == "up"
    assert agents[0]["times_lost"] == 0
    header, row = cluster.corral("agents").stdout.splitlines()[:2]
    assert header.split()[:7] == ["NAME", "HOST", "STATE", "BUSY", "DONE", "FAILED", "LOST"] and row.split()[6] == "0"


def test_cancel_and_requeue_from_cli(cluster: Cluster) -> None:
    queued = cluster.corral("submit", "--tag", "nobody", "--", "true").stdout.strip()
    assert cluster.corral("cancel", queued).stdout.strip() == f"{queued}: cancelled"
    cluster.start_agent("a", slots=1)
    requeued = cluster.corral("requeue", queued)
    new_id = requeued.stdout.split("→")[1].strip()
    cluster.corral("cancel", new_id)
    ran = cluster.corral("submit", "--wait", "--", "echo once").stdout
    assert ran == "once\n"


def test_output_into_a_reader_that_stops_early(cluster: Cluster) -> None:
    """`corral jobs --json | head -1`: the first line, a quiet stderr, and the pipe status `seq | head -1` has."""
    cluster.corral("submit", "--count", "2000", "--tag", "nobody", "--", "true", check=True)
    # ~1 MB of JSON, far more than a pipe holds: corral is still writing when head has gone.
    piped = '"$@" | head -1; echo "${PIPESTATUS[0]}"'
    corral = subprocess.run(["bash", "-c", piped, "-", sys.executable, "-m", "corral", "jobs", "--json", "--limit", "2000"],
                            env=cluster.env, cwd=REPO, capture_output=True, text=True, timeout=60)
    seq = subprocess.run(["bash", "-c", piped, "-", "seq", "10000000"], capture_output=True, text=True, timeout=60)
    assert corral.stderr == ""
    line, status = corral.stdout.split()
    assert line == "["
    assert status == seq.stdout.split()[1] == "141"  # 128 + SIGPIPE, as for any tool whose reader went away


def test_verbose_master_prints_seed_style_lines(tmp_path: Path) -> None:
    cluster = Cluster(tmp_path / "home")
    cluster.start_master("-v")
    try:
        cluster.start_agent("alpha", slots=1)
        cluster.corral("submit", "--wait", "--", "true")
        log = cluster.logs / "master.log"
        wait_until(lambda: "finished" in log.read_text(), what="the finished line")
        text = log.read_text()
        assert "dispatched 1 → alpha" in text
        assert "finished 1 on alpha: exit 0 in" in text
        assert "Run job: 1" in cluster.agent_log("alpha")
    finally:
        cluster.stop()


# ---- bad paths ----------------------------------------------------------------------------

def test_no_master_running(tmp_path: Path) -> None:
    one_line_error(corral_in(tmp_path / "empty", "status"), "no master is recorded")
    # A master that died without cleaning up (kill -9) leaves a stale master.json behind.
    home = tmp_path / "stale"
    home.mkdir()
    (home / "master.json").write_text(json.dumps({"host": "127.0.0.1", "port": 9, "pid": 1}))
    (home / "authkey").write_text("k" * 64)
    one_line_error(corral_in(home, "jobs"), "no master answers at 127.0.0.1:9")


def test_wrong_authkey_is_one_line_and_master_lives_on(cluster: Cluster, tmp_path: Path) -> None:
    other = tmp_path / "other"
    other.mkdir()
    shutil.copy(cluster.home / "master.json", other / "master.json")
    (other / "authkey").write_text("0" * 64)
    one_line_error(corral_in(other, "status"), "refused our authkey")
    assert cluster.corral("status").returncode == 0


def test_corrupt_or_unusable_state_dir(cluster: Cluster, tmp_path: Path) -> None:
    not_a_dir = tmp_path / "file"
    not_a_dir.write_text("x")
    one_line_error(corral_in(not_a_dir, "master"), "is not a directory")

    garbled = tmp_path / "garbled"
    garbled.mkdir()
    (garbled / "master.json").write_text("{not json")
    one_line_error(corral_in(garbled, "status"), "unreadable or corrupt")

    shutil.copy(cluster.home / "master.json", garbled / "master.json")
    (garbled / "authkey").write_text("")
    one_line_error(corral_in(garbled, "status"), "empty or too short")

    journal = tmp_path / "badjournal"
    journal.mkdir()
    (journal / "corral.db").write_bytes(b"this is not a database" * 100)
    err = one_line_error(corral_in(journal, "master"), "journal", "cannot be opened")
    assert str(journal / "corral.db") in err


def test_bad_submissions(cluster: Cluster) -> None:
    one_line_error(cluster.corral("submit", "--"), "no command given")
    one_line_error(cluster.corral("submit"), "no command given")
    one_line_error(cluster.corral("submit", "--", "  "), "no command given")
    one_line_error(cluster.corral("submit", "--timeout", "-1", "--", "true"), "--timeout", "positive")
    one_line_error(cluster.corral("submit", "--timeout", "abc", "--", "true"), "--timeout", "number of seconds")
    one_line_error(cluster.corral("submit", "--timeout", "nan", "--", "true"), "--timeout")
    one_line_error(cluster.corral("submit", "--count", "0", "--", "true"), "--count")
    one_line_error(cluster.corral("submit", "--retries", "-2", "--", "true"), "--retries")
    one_line_error(cluster.corral("submit", "--env", "NOEQUALS", "--", "true"), "NAME=VALUE")
    one_line_error(cluster.corral("call", "tests.jobs:inc", "not json"), "is not JSON")
    one_line_error(cluster.corral("call", "not a function", "1"), "is not a module:function name")
    # Nothing was queued by any of that, and the master still serves.
    status = json.loads(cluster.corral("status", "--json").stdout)
    assert status["counts"]["queued"] == 0


def test_unknown_job_ids(cluster: Cluster) -> None:
    one_line_error(cluster.corral("show", "999"), "no job 999")
    one_line_error(cluster.corral("cancel", "999"), "no job 999")
    one_line_error(cluster.corral("wait", "999"), "no job 999")
    one_line_error(cluster.corral("show", "abc"), "a job id is a whole number")


def test_bad_specs_through_the_python_api(cluster: Cluster) -> None:
    from corral.agent.errors import BadJobSpec

    with cluster.client() as c:
        for spec, needle in [
            ({"command": "true", "timeout": -1}, "timeout must be a positive number"),
            ({"command": "true", "timeout": "soon"}, "timeout must be a positive number"),
            ({"command": ""}, "the command is empty"),
            ({"command": "true", "func": "a:b"}, "exactly one"),
            ({"command": "true", "priority": "high"}, "priority must be a whole number"),
            ({"command": "true", "env": {"A": 1}}, "env must map names to strings"),
            ({"func": "m:f", "payload": "not bytes"}, "pickled, as bytes"),
            ({"func": "m:f", "payload": b"x" * (2 * 1024 * 1024)}, "the limit is"),
            ("not a dict", "must be a dict"),
        ]:
            with pytest.raises(BadJobSpec, match=needle):
                c.submit([{"command": "true"}, spec])
        assert c.status()["counts"]["queued"] == 0  # all or nothing: the good first spec was not queued


def test_agent_bad_arguments(cluster: Cluster, tmp_path: Path) -> None:
    one_line_error(cluster.corral("agent", "--slots", "0"), "--slots must be at least 1")
    one_line_error(cluster.corral("agent", "--connect", "nowhere"), "bad address")
    one_line_error(cluster.corral("agent", "--authkey-file", str(tmp_path / "missing")), "no authkey at")


def test_master_refuses_non_loopback_listen(tmp_path: Path) -> None:
    one_line_error(corral_in(tmp_path / "h", "master", "--listen", "0.0.0.0:7100"), "loopback only", "--allow-remote")


def test_master_on_a_port_in_use_is_one_line(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        done = corral_in(tmp_path / "h", "master", "--listen", f"127.0.0.1:{port}")
    assert done.returncode == 1
    assert one_line_error(done) == "corral master: Address already in use"


def test_show_a_silent_job_has_its_attempt(cluster: Cluster) -> None:
    cluster.start_agent("a", slots=1)
    assert cluster.corral("submit", "--wait", "--", "true").returncode == 0
    shown = json.loads(cluster.corral("show", "1", "--json").stdout)
    [attempt] = shown["attempts_detail"]
    assert attempt["state"] == "done" and attempt["agent"] == "a" and attempt["exit_code"] == 0
    assert attempt["ended"] >= attempt["started"] > 0
