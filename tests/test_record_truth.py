"""The record tells the truth, on real processes: an attempt a stopped agent killed stays in the job's
history as interrupted (with why); a job's output is its bytes, end to end, and a tail says it is one."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

from corral.agent.protocol import OUTPUT_TAIL_BYTES, JobSpec
from tests.cluster import REPO, Cluster, wait_until
from tests.faultkit import attempt_rows, journal_outcomes, running_cluster


def stop_hard(cluster: Cluster, name: str) -> int:
    """SIGTERM, and once the agent says it drains, SIGTERM again: its exit status. (Two signals sent
    back to back may merge into one.)"""
    proc = cluster.agents[name]
    proc.send_signal(signal.SIGTERM)
    wait_until(lambda: "draining:" in cluster.agent_log(name), timeout=60, what=f"agent {name} to drain")
    proc.send_signal(signal.SIGTERM)
    return cluster.agent_exit(name, timeout=60)


def test_a_forced_stop_leaves_the_killed_attempt_in_the_history(tmp_path: Path) -> None:
    runs = tmp_path / "runs"
    with running_cluster(tmp_path / "home", "--lease", "3") as cluster:
        cluster.start_agent("stopped", slots=1, tags="only")
        with cluster.client() as c:
            # The first attempt would sleep a minute; a second one ends at once.
            (job,) = c.submit([JobSpec(command=f"echo $CORRAL_JOB_ID $CORRAL_ATTEMPT >> {runs};"
                                               " [ $CORRAL_ATTEMPT -gt 1 ] || sleep 60", tags=("only",))])
            wait_until(lambda: runs.exists() and runs.read_text().split() == [str(job), "1"], timeout=60,
                     what="attempt 1 to start")
            # The first SIGTERM drains (the running job is let finish), a second kills it and the agent
            # leaves. Signals sent back to back merge into one, so send until it is gone.
            assert stop_hard(cluster, "stopped") == 1
            wait_until(lambda: c.job(job)["state"] == "queued", timeout=30, what="the job queued again")
            (attempt,) = c.job(job)["attempt_list"]
            assert (attempt["attempt"], attempt["agent"], attempt["state"]) == (1, "stopped", "interrupted")
            assert attempt["error"] == "stopped by a second signal" and attempt["counted"] == 0
            assert attempt["started"] and attempt["ended"] >= attempt["started"]
            shown = cluster.corral("show", str(job))
            assert "attempt 1 on stopped: interrupted" in shown.stdout, shown
            assert "why: stopped by a second signal" in shown.stdout
            cluster.start_agent("again", slots=1, tags="only")
            assert c.wait([job], 60) == {job: "done"}
            record = c.job(job)
            assert record["failures"] == 0 and record["lost"] == 0 and record["attempts"] == 2
            assert [(a["attempt"], a["agent"], a["state"]) for a in record["attempt_list"]] == [
                (1, "stopped", "interrupted"), (2, "again", "done")]
    journal = tmp_path / "home" / "corral.db"
    journal_outcomes(journal, [job])
    assert attempt_rows(journal, job) == [(1, "stopped", "interrupted", 0), (2, "again", "done", 1)]
    assert runs.read_text().split() == [str(job), "1", str(job), "2"]  # it really ran twice, once each attempt


def corral_bytes(cluster: Cluster, *args: str) -> subprocess.CompletedProcess:  # type: ignore[type-arg]
    """The real CLI, its output kept as bytes."""
    return subprocess.run([sys.executable, "-m", "corral", *args], env=cluster.env, cwd=REPO, capture_output=True,
                          timeout=120)


def test_output_is_bytes_end_to_end_and_a_tail_says_so(cluster: Cluster) -> None:
    cluster.start_agent("a", slots=1)
    odd = rb"printf 'a\377\376b\n'; printf 'err\200\n' >&2"
    waited = corral_bytes(cluster, "submit", "--wait", "--", odd.decode())
    assert waited.returncode == 0, waited.stderr
    assert waited.stdout == b"a\xff\xfeb\n" and waited.stderr == b"err\x80\n"  # no notice: the whole output
    with cluster.client() as c:
        (job,) = [j["id"] for j in c.jobs(limit=1)]
        (attempt,) = c.job(job)["attempt_list"]
        assert (attempt["stdout"], attempt["stderr"]) == (b"a\xff\xfeb\n", b"err\x80\n")  # the Python API: bytes
    raw = corral_bytes(cluster, "show", str(job), "--raw")
    assert (raw.returncode, raw.stdout, raw.stderr) == (0, b"a\xff\xfeb\n", b"err\x80\n")
    shown = corral_bytes(cluster, "show", str(job))
    assert shown.returncode == 0 and "a\ufffd\ufffdb" in shown.stdout.decode() and shown.stderr == b""
    as_json = json.loads(corral_bytes(cluster, "show", str(job), "--json").stdout)
    assert as_json["attempts_detail"][0]["stdout"] == "a\ufffd\ufffdb\n"

    # 200,000 bytes written: what is kept and shown is the last 64 KiB, and each command says so on stderr.
    long = "head -c 200000 /dev/zero | tr '\\0' x; echo END"
    waited = corral_bytes(cluster, "submit", "--wait", "--", long)
    assert waited.returncode == 0 and len(waited.stdout) == OUTPUT_TAIL_BYTES and waited.stdout.endswith(b"xEND\n")
    note = b"attempt 1: stdout shown is the last 64 KiB of 195.3 KiB it wrote\n"
    assert waited.stderr.startswith(b"corral: job ") and waited.stderr.endswith(note), waited.stderr
    job = int(waited.stderr.split()[2])
    for args in (("show", str(job)), ("show", str(job), "--raw"), ("wait", str(job))):
        again = corral_bytes(cluster, *args)
        assert again.returncode == 0 and again.stderr == f"corral: job {job} ".encode() + note, (args, again.stderr)
    assert b"--- stdout (last 64 KiB of 195.3 KiB) ---" in corral_bytes(cluster, "show", str(job)).stdout


def test_wait_on_a_terminal_escapes_the_jobs_bytes_and_raw_does_not(cluster: Cluster) -> None:
    import os
    import pty

    cluster.start_agent("a", slots=1)

    def on_a_tty(*args: str) -> bytes:
        primary, secondary = pty.openpty()
        try:
            proc = subprocess.Popen([sys.executable, "-m", "corral", *args], env=cluster.env, cwd=REPO,
                                    stdin=subprocess.DEVNULL, stdout=secondary, stderr=secondary)
            os.close(secondary)
            seen = b""
            while True:
                try:
                    chunk = os.read(primary, 65536)
                except OSError:  # EIO: the other end closed
                    break
                if not chunk:
                    break
                seen += chunk
            assert proc.wait(timeout=120) == 0, seen
            return seen
        finally:
            os.close(primary)

    seen = on_a_tty("submit", "--wait", "--", r"printf 'x\033]0;owned\007y\377\n'")
    assert b"\x1b" not in seen and b"\x07" not in seen and b"x\\x1b]0;owned\\x07y" in seen, seen
    with cluster.client() as c:
        (job,) = [j["id"] for j in c.jobs(limit=1)]
    assert b"\x1b]0;owned\x07y\xff" in on_a_tty("show", str(job), "--raw")  # --raw: the bytes, as asked


def test_prefetched_jobs_are_assigned_and_only_running_ones_fill_slots(cluster: Cluster) -> None:
    """Short jobs on one slot: the agent takes several at a time (pacing), runs one. The master counts
    the one running and the others assigned, apart; busy is the running one; started is set once running."""
    cluster.start_agent("solo", slots=1)
    seen_apart = False
    with cluster.client() as c:
        ids = c.submit([JobSpec(command="sleep 0.03") for _ in range(400)])
        deadline = time.monotonic() + 180
        while not seen_apart and time.monotonic() < deadline:
            status = c.status()
            counts = status["counts"]
            if counts["assigned"] >= 2 and counts["running"] <= 1 and status["busy"] == counts["running"]:
                seen_apart = True
                assigned = [j for j in c.jobs(["assigned"], limit=5)]
                assert assigned and all(j["started"] is None and j["agent"] == "solo" for j in assigned), assigned
            time.sleep(0.05)
        assert seen_apart, "never saw the prefetched jobs counted apart from the running one"
        assert len(c.wait(ids, timeout=300)) == len(ids)
        shown = c.jobs(["done"], limit=20)
        assert all(j["started"] and j["ended"] >= j["started"] for j in shown), shown
    journal_outcomes(cluster.home / "corral.db", ids)
