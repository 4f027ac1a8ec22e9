"""A job's processes all end with it: jobs that escape their process group (setsid, `set -m`, GNU timeout,
double-fork daemons), on real agents with each containment, ended normally, by timeout and by cancel."""

from __future__ import annotations

import json
import os
import shlex
import sys
import time
from pathlib import Path

import pytest

from corral.agent import contain
from corral.agent.protocol import JobSpec
from tests.cluster import Cluster, wait_until
from tests.faultkit import alive, journal_outcomes, processes_of, record_run, times_run

ESCAPES = ("setsid", "set-m", "timeout", "daemon", "timeout-child")

# A Python daemon as the books write one: fork, setsid, fork again, the middle one exits; stdio closed.
DAEMON = ("import os, sys, time\n"
          "if os.fork(): os._exit(0)\n"
          "os.setsid()\n"
          "if os.fork(): os._exit(0)\n"
          "open(sys.argv[1], 'w').write(str(os.getpid()))\n"
          "os.closerange(0, 3)\n"
          "time.sleep(300)\n")


def escaping_job(pids: Path, then: str) -> str:
    """Shell text that leaves its process group in every way listed above, each writing its pid to a
    file in `pids`, waits until all have, then runs `then` (exit 0, or a long sleep)."""
    d = shlex.quote(str(pids))
    daemon = shlex.quote(DAEMON)
    return "\n".join([
        f"mkdir -p {d}",
        # a new session, keeping the job's stdout open (it holds the pipe, as a careless daemon does)
        f"setsid sh -c 'echo $$ > {d}/setsid; exec sleep 300' &",
        # job control on: the background job gets a process group of its own; its shell exits at once
        f"sh -c 'set -m; sleep 300 & echo $! > {d}/set-m' >/dev/null 2>&1",
        # GNU timeout moves itself and its command into a new process group
        f"timeout 300 sh -c 'echo $PPID > {d}/timeout; echo $$ > {d}/timeout-child; exec sleep 300' &",
        # the classic double fork with setsid: reparented, in its own session, stdio closed
        f"{shlex.quote(sys.executable)} -c {daemon} {d}/daemon",
        f"for f in {' '.join(ESCAPES)}; do while [ ! -s {d}/$f ]; do sleep 0.05; done; done",
        "echo all escaped",
        then,
    ])


def escaped(pids: Path) -> dict[str, int]:
    return {name: int((pids / name).read_text()) for name in ESCAPES}


def require_cgroup() -> None:
    """Skip where no cgroup v2 can be made for jobs here; CI (CORRAL_NO_SKIPS=1, as root) fails instead."""
    probe = contain.choose("auto", owns_process=False)
    if probe.kind == contain.CGROUP:
        contain.release(probe)
        return
    pytest.skip(f"no writable cgroup v2 here ({probe.why}); CI runs as root, where there is one")


@pytest.fixture(params=[contain.CGROUP, contain.SUBREAPER])
def kind(request: pytest.FixtureRequest) -> str:
    if request.param == contain.CGROUP:
        require_cgroup()
    return str(request.param)


def test_every_escaped_process_ends_with_its_job(cluster: Cluster, tmp_path: Path, kind: str) -> None:
    cluster.start_agent("box", 3, "", "--containment", kind)
    with cluster.client() as c:
        [record] = [a for a in c.agents() if a["name"] == "box"]
        assert record["containment"] == (kind if kind == contain.CGROUP else "subreaper (asked for)")
        normal, timed, cancelled = (tmp_path / name for name in ("normal", "timeout", "cancel"))
        runs = tmp_path / "runs"
        [done_job] = c.submit([JobSpec(command=record_run(runs) + escaping_job(normal, "exit 0"), name="normal")])
        [timeout_job] = c.submit([JobSpec(command=record_run(runs) + escaping_job(timed, "sleep 300"), timeout=15,
                                          name="timeout")])
        [cancel_job] = c.submit([JobSpec(command=record_run(runs) + escaping_job(cancelled, "sleep 300"), name="cancel")])

        assert c.wait([done_job], timeout=60) == {done_job: "done"}
        left = escaped(normal)
        assert [name for name, pid in left.items() if alive(pid)] == [], f"outlived a job that ended: {left}"
        assert_noted(c.job(done_job)["attempt_list"], left)

        wait_until(lambda: all((cancelled / name).exists() and (cancelled / name).read_text() for name in ESCAPES),
                 timeout=60, what="the cancelled job's escapes to start")
        left = escaped(cancelled)
        assert all(alive(pid) for pid in left.values())  # they really ran, until the cancel
        c.cancel([cancel_job])
        assert c.wait([cancel_job], timeout=30) == {cancel_job: "cancelled"}
        assert [name for name, pid in left.items() if alive(pid)] == [], f"outlived its cancel: {left}"

        assert c.wait([timeout_job], timeout=60) == {timeout_job: "timeout"}
        left = escaped(timed)
        assert [name for name, pid in left.items() if alive(pid)] == [], f"outlived its timeout: {left}"
        timeout_record = c.job(timeout_job)
    assert "all its processes killed" in timeout_record["error"]
    assert [a["note"] for a in timeout_record["attempt_list"]] == [""]  # killed by design: its error says so
    out = cluster.corral("agents")
    assert out.returncode == 0 and "CONTAINMENT" in out.stdout and f" {kind}" in out.stdout.splitlines()[1]
    shown = cluster.corral("show", str(done_job))
    assert shown.returncode == 0 and "    note: 5 processes left running at its end were killed: " in shown.stdout
    detail = json.loads(cluster.corral("show", str(done_job), "--json").stdout)["attempts_detail"]
    assert [a["note"].split(":")[0] for a in detail] == ["5 processes left running at its end were killed"]
    # From the journal file: each job one final outcome, one counted attempt; and each really ran once.
    assert journal_outcomes(cluster.home / "corral.db", [done_job, timeout_job, cancel_job], states=None) == {
        done_job: "done", timeout_job: "timeout", cancel_job: "cancelled"}
    assert times_run(runs) == {done_job: 1, timeout_job: 1, cancel_job: 1}


def assert_noted(attempts: list[dict], left: dict[str, int]) -> None:
    """The attempt record names each process killed at the job's normal end (by its pid)."""
    [attempt] = attempts
    assert attempt["state"] == "done" and attempt["counted"]
    note = attempt["note"]
    assert note.startswith("5 processes left running at its end were killed: "), note
    # timeout has forked its child by then; the others may be caught before their exec of sleep
    assert f"timeout (pid {left['timeout']})" in note
    assert all(f"(pid {pid})" in note for pid in left.values()), note


def test_a_forced_stop_kills_escaped_processes(cluster: Cluster, tmp_path: Path, kind: str) -> None:
    """The second SIGTERM kills running jobs: all of each, not only their process groups."""
    proc = cluster.start_agent("box", 2, "", "--containment", kind)
    with cluster.client() as c:
        [job] = c.submit([JobSpec(command=escaping_job(tmp_path / "p", "sleep 300"))])
        wait_until(lambda: all((tmp_path / "p" / name).exists() and (tmp_path / "p" / name).read_text()
                             for name in ESCAPES), timeout=60, what="the escapes to start")
        left = escaped(tmp_path / "p")
        proc.terminate()
        time.sleep(0.5)
        proc.terminate()
        assert proc.wait(timeout=30) == 1
    assert [name for name, pid in left.items() if alive(pid)] == [], f"outlived the agent's forced stop: {left}"


def test_a_callables_processes_end_with_it(cluster: Cluster, tmp_path: Path, kind: str) -> None:
    cluster.start_agent("box", 1, "", "--containment", kind)
    with cluster.client() as c:
        pids = tmp_path / "call"
        job = c.submit_call("tests.jobs:run_shell", (escaping_job(pids, "exit 0"),))
        assert c.wait([job], timeout=60) == {job: "done"}
        left = escaped(pids)
        assert [name for name, pid in left.items() if alive(pid)] == [], f"outlived the callable: {left}"
        assert_noted(c.job(job)["attempt_list"], left)
        after = c.submit_call("tests.jobs:inc", (1,))  # the worker is fine, and the next job runs on it
        c.wait([after], timeout=30)
        assert c.values([after]) == [2]


@pytest.mark.parametrize("end, state", [("exit", "failed"), ("stubborn", "timeout")])
def test_a_pool_worker_that_dies_takes_its_jobs_processes_with_it(cluster: Cluster, tmp_path: Path, kind: str,
                                                                  end: str, state: str) -> None:
    """A callable that ends its own worker (os._exit), or ignores its timeout until the agent kills the
    worker: what it started is killed before its outcome is reported, and the next job runs."""
    cluster.start_agent("box", 1, "", "--containment", kind)
    pids = tmp_path / "p"
    with cluster.client() as c:
        job = c.submit_call("tests.jobs:escape_then", (escaping_job(pids, "echo > " + str(tmp_path / "ready")),
                                                       str(tmp_path / "ready"), end), timeout=1.0)
        assert c.wait([job], timeout=60) == {job: state}
        left = escaped(pids)
        assert [name for name, pid in left.items() if alive(pid)] == [], f"outlived its dead worker: {left}"
        after = c.submit_call("tests.jobs:inc", (1,))
        c.wait([after], timeout=30)
        assert c.values([after]) == [2]


def job_processes(home: Path, job_id: int) -> list[int]:
    """Live processes that carry this job's id in their environment (what its shell started)."""
    needle = f"CORRAL_JOB_ID={job_id}".encode()
    found = []
    for pid in processes_of(home):
        try:
            environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if needle in environ and alive(pid):
            found.append(pid)
    return found


@pytest.mark.parametrize("ending", ["normal", "timeout"])
def test_a_job_forking_as_fast_as_it_can_is_killed_whole(cluster: Cluster, tmp_path: Path, kind: str,
                                                         ending: str) -> None:
    """A process that keeps forking while it is being killed (a fork loop in a session of its own)."""
    cluster.start_agent("box", 1, "", "--containment", kind)
    ready = tmp_path / "ready"
    loop = f"setsid sh -c 'while :; do sleep 300 & echo $! >> {ready}; done' >/dev/null 2>&1 &"
    then = f"while [ $(wc -l < {ready} 2>/dev/null || echo 0) -lt 50 ]; do sleep 0.05; done"
    command = f"{loop}\n{then}" + ("" if ending == "normal" else "\nsleep 300")
    with cluster.client() as c:
        [job] = c.submit([JobSpec(command=command, timeout=None if ending == "normal" else 10)])
        assert c.wait([job], timeout=120) == {job: "done" if ending == "normal" else "timeout"}
        assert job_processes(cluster.home, job) == []
        started = [int(line) for line in ready.read_text().split()]
        assert len(started) >= 50 and not [pid for pid in started if alive(pid)]
        if ending == "normal":
            assert c.job(job)["attempt_list"][0]["note"].split(" ")[1:6] == "processes left running at its".split()


def test_the_next_agent_clears_what_an_agent_killed_with_kill_9_left(cluster: Cluster, tmp_path: Path) -> None:
    """kill -9 of a cgroup agent leaves its jobs running (nothing of it is left to act): the next agent
    started on the host kills them and removes the dead agent's cgroups, as the README says."""
    require_cgroup()
    first = cluster.start_agent("first", 1, "", "--containment", "cgroup")
    pids = tmp_path / "p"
    with cluster.client() as c:
        c.submit([JobSpec(command=escaping_job(pids, "sleep 300"))])
        wait_until(lambda: all((pids / name).exists() and (pids / name).read_text() for name in ESCAPES),
                 timeout=60, what="the escapes to start")
    left = escaped(pids)
    root = Path(contain._own_cgroup(), f"corral-{first.pid}")  # the agent was started in this process's cgroup
    assert root.is_dir()
    first.kill()
    first.wait(timeout=10)
    assert all(alive(pid) for pid in left.values())  # nobody has killed them yet
    cluster.start_agent("second", 1, "", "--containment", "cgroup")
    assert [name for name, pid in left.items() if alive(pid)] == [], f"outlived the next agent's start: {left}"
    assert not root.exists()


def test_agent_refuses_a_containment_it_cannot_have(cluster: Cluster) -> None:
    out = cluster.corral("agent", "--containment", "nonsense")
    assert out.returncode == 2 and "--containment" in out.stderr


def test_containment_is_shown_in_agents_json(cluster: Cluster) -> None:
    cluster.start_agent("auto", 1)
    out = cluster.corral("agents", "--json")
    assert out.returncode == 0, out.stderr
    [agent] = json.loads(out.stdout)
    chosen = contain.choose("auto", owns_process=False)
    contain.release(chosen)
    assert agent["containment"].split(" ")[0] == chosen.kind
    assert os.path.isdir(f"/proc/{agent['pid']}")
