"""Jobs through a real master and real agents: priorities, tags, timeouts, retries, cancel, output."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from corral.agent.connection import call, drop
from corral.agent.errors import BadJobSpec
from corral.agent.protocol import OUTPUT_TAIL_BYTES, AgentInfo, JobSpec
from corral.agent.runner import Agent, connect
from corral.agent.statedir import read_authkey
from tests.cluster import Cluster, wait_until
from tests.faultkit import journal_outcomes


def alive(pid: int) -> bool:
    """Whether a process exists and is not a zombie (an unreaped zombie is already dead)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, IndexError):
        return False
    return state != "Z"


def read_pid(path: Path) -> int:
    return int(wait_until(lambda: path.exists() and path.read_text().strip(), what=f"pid in {path}"))


def test_priority_then_fifo(cluster: Cluster) -> None:
    with cluster.client() as c:
        ids = c.submit([JobSpec(command=f"echo p{p}-{i}", priority=p, name=f"p{p}-{i}")
                        for i, p in enumerate([0, 5, 1, 5, 0, 9])])
        cluster.start_agent("solo", slots=1)
        c.wait(ids, timeout=30)
        # When each really started on the agent (one slot: they ran one after another).
        started = sorted((c.job(j)["attempt_list"][0]["started"], c.job(j)["name"]) for j in ids)
    assert [name for _, name in started] == ["p9-5", "p5-1", "p5-3", "p1-2", "p0-0", "p0-4"]


def test_tags_route_jobs(cluster: Cluster) -> None:
    cluster.start_agent("gpu", slots=2, tags="gpu,big")
    cluster.start_agent("plain", slots=2)
    with cluster.client() as c:
        tagged = c.submit([JobSpec(command="true", tags=("gpu",)) for _ in range(8)])
        both = c.submit([JobSpec(command="true", tags=("gpu", "big")) for _ in range(4)])
        nowhere = c.submit([JobSpec(command="true", tags=("tpu",))])
        c.wait(tagged + both, timeout=30)
        assert {c.job(j)["agent"] for j in tagged + both} == {"gpu"}
        assert c.wait(nowhere, timeout=1.5) == {}
        assert c.job(nowhere[0])["state"] == "queued"


def test_shell_timeout_kills_the_whole_group(cluster: Cluster, tmp_path: Path) -> None:
    cluster.start_agent("a", slots=1)
    pidfile = tmp_path / "bg.pid"
    with cluster.client() as c:
        [job] = c.submit([JobSpec(command=f"sleep 60 & echo $! > {pidfile}; sleep 60", timeout=1.0)])
        background = read_pid(pidfile)
        assert c.wait([job], timeout=20) == {job: "timeout"}
        record = c.job(job)
    assert "timed out after 1s" in record["error"]
    wait_until(lambda: not alive(background), timeout=5, what="the background sleep to die")


def test_callable_timeout(cluster: Cluster) -> None:
    cluster.start_agent("a", slots=1)
    with cluster.client() as c:
        job = c.submit_call("tests.jobs:nap", (60,), timeout=0.5)
        assert c.wait([job], timeout=20) == {job: "timeout"}
        after = c.submit_call("tests.jobs:inc", (1,))
        c.wait([after], timeout=20)
        assert c.values([after]) == [2]


def test_a_daemon_left_behind_is_cleaned_up(cluster: Cluster, tmp_path: Path) -> None:
    cluster.start_agent("a", slots=1)
    pidfile = tmp_path / "daemon.pid"
    with cluster.client() as c:
        [job] = c.submit([JobSpec(command=f"(sleep 60 >/dev/null 2>&1 &) ; sleep 60 & echo $! > {pidfile}; echo started")])
        assert c.wait([job], timeout=20) == {job: "done"}
    wait_until(lambda: not alive(read_pid(pidfile)), timeout=5, what="the job's leftover child to be killed")


def test_retries_until_success_or_exhausted(cluster: Cluster, tmp_path: Path) -> None:
    cluster.start_agent("a", slots=2)
    script = 'n=$(cat {f} 2>/dev/null || echo 0); n=$((n+1)); echo $n > {f}; echo try $n; [ $n -ge 3 ]'
    with cluster.client() as c:
        ok = c.submit([JobSpec(command=script.format(f=tmp_path / "ok"), retries=2)])[0]
        bad = c.submit([JobSpec(command=script.format(f=tmp_path / "bad"), retries=1)])[0]
        assert c.wait([ok, bad], timeout=30) == {ok: "done", bad: "failed"}
        good, failed = c.job(ok), c.job(bad)
    assert good["attempts"] == 3
    assert [a["state"] for a in good["attempt_list"]] == ["failed", "failed", "done"]
    assert good["attempt_list"][-1]["stdout"] == b"try 3\n"
    assert failed["attempts"] == 2 and failed["exit_code"] == 1


def test_cancel_running_shell_job_frees_the_slot(cluster: Cluster, tmp_path: Path) -> None:
    cluster.start_agent("a", slots=1)
    pidfile = tmp_path / "job.pid"
    with cluster.client() as c:
        [job] = c.submit([JobSpec(command=f"echo $$ > {pidfile}; sleep 60")])
        pid = read_pid(pidfile)
        t0 = time.monotonic()
        assert c.cancel([job]) == {job: "cancelling"}
        assert c.wait([job], timeout=10) == {job: "cancelled"}
        took = time.monotonic() - t0
        assert not alive(pid)
        # The only slot is free again: the next job runs.
        follow = c.submit([JobSpec(command="echo next")])
        assert c.wait(follow, timeout=10) == {follow[0]: "done"}
    assert took < 5, f"cancel took {took:.1f}s"


def test_cancel_running_callable_and_queued_job(cluster: Cluster) -> None:
    cluster.start_agent("a", slots=1)
    with cluster.client() as c:
        running = c.submit_call("tests.jobs:nap", (60,))
        queued = c.submit_call("tests.jobs:inc", (1,), tags=("nowhere",))
        wait_until(lambda: c.job(running)["state"] == "running", what="the callable to start")
        time.sleep(0.2)  # let the worker enter the function
        assert c.cancel([queued]) == {queued: "cancelled"}
        c.cancel([running])
        assert c.wait([running, queued], timeout=10) == {running: "cancelled", queued: "cancelled"}
        again = c.submit_call("tests.jobs:inc", (41,))
        c.wait([again], timeout=10)
        assert c.values([again]) == [42]


def test_output_capture_and_truncation(cluster: Cluster) -> None:
    cluster.start_agent("a", slots=2)
    with cluster.client() as c:
        big = c.submit([JobSpec(command="head -c 300000 /dev/zero | tr '\\0' x; echo END; echo oops >&2")])[0]
        printed = c.submit_call("tests.jobs:shout", ("hello",))
        c.wait([big, printed], timeout=30)
        attempt = c.job(big)["attempt_list"][0]
        assert len(attempt["stdout"]) == OUTPUT_TAIL_BYTES
        assert attempt["stdout"].endswith(b"xxxxEND\n")
        assert attempt["stderr"] == b"oops\n"
        shouted = c.job(printed)
        assert shouted["attempt_list"][0]["stdout"] == b"HELLO\n"
        assert c.values([printed]) == ["hello"]


def test_env_cwd_and_job_variables(cluster: Cluster, tmp_path: Path) -> None:
    cluster.start_agent("a", slots=1)
    with cluster.client() as c:
        [job] = c.submit([JobSpec(command="echo $GREETING $(pwd) $CORRAL_JOB_ID", env={"GREETING": "hi"},
                                  cwd=str(tmp_path))])
        c.wait([job], timeout=20)
        assert c.job(job)["attempt_list"][0]["stdout"] == f"hi {tmp_path} {job}\n".encode()
        env_job = c.submit_call("tests.jobs:getenv", ("GREETING",), env={"GREETING": "callable"})
        c.wait([env_job], timeout=20)
        assert c.values([env_job]) == ["callable"]


def test_a_callable_with_bad_env_then_others_leave_the_worker_env_as_it_was(cluster: Cluster) -> None:
    cluster.start_agent("a", slots=1)  # one pool worker: every job below runs on it, one after another
    with cluster.client() as c:
        first = c.submit_call("tests.jobs:environ")
        c.wait([first], timeout=30)
        [before] = c.values([first])
        with pytest.raises(BadJobSpec) as refused:
            c.submit_call("tests.jobs:environ", env={"GOOD": "1", "BAD": "a\x00b"})
        assert "\n" not in str(refused.value) and "env value of 'BAD' holds a NUL character" in str(refused.value)
        timed_out = c.submit_call("tests.jobs:meddle_env_and_nap", (60,), env={"GOOD": "1"}, timeout=1.0)
        assert c.wait([timed_out], timeout=30) == {timed_out: "timeout"}
        cancelled = c.submit_call("tests.jobs:meddle_env_and_nap", (60,), env={"GOOD": "2"})
        wait_until(lambda: c.job(cancelled)["state"] == "running", timeout=30, what="the callable to start")
        time.sleep(0.5)  # inside the function, past its changes
        c.cancel([cancelled])
        assert c.wait([cancelled], timeout=30) == {cancelled: "cancelled"}
        failed = c.submit_call("tests.jobs:boom", ("x",), env={"GOOD": "3"})
        assert c.wait([failed], timeout=30) == {failed: "failed"}
        last = c.submit_call("tests.jobs:environ")
        c.wait([last], timeout=30)
        [after] = c.values([last])
        assert {c.job(j)["agent"] for j in (first, timed_out, cancelled, failed, last)} == {"a"}
    assert after == before
    # From the journal file: each job one final outcome (the refused one was never a job), one counted attempt.
    assert journal_outcomes(cluster.home / "corral.db", [first, timed_out, cancelled, failed, last], states=None) == {
        first: "done", timed_out: "timeout", cancelled: "cancelled", failed: "failed", last: "done"}


def test_unimportable_callable_fails_and_agent_lives_on(cluster: Cluster) -> None:
    proc = cluster.start_agent("a", slots=1)
    with cluster.client() as c:
        bad = c.submit_call("no_such_module_xyz:run", ())
        raises = c.submit_call("tests.jobs:boom", ("kaboom",))
        c.wait([bad, raises], timeout=20)
        record = c.job(bad)
        assert record["state"] == "failed"
        assert "cannot import no_such_module_xyz:run on this agent" in record["error"]
        failed = c.job(raises)
        assert failed["error"] == "ValueError: kaboom"
        assert "Traceback" in failed["attempt_list"][0]["traceback"]
        ok = c.submit_call("tests.jobs:inc", (1,))
        c.wait([ok], timeout=20)
        assert c.values([ok]) == [2]
    assert proc.poll() is None


def test_job_that_kills_its_pool_worker_fails_cleanly(cluster: Cluster) -> None:
    cluster.start_agent("a", slots=1)
    with cluster.client() as c:
        dead = c.submit_call("tests.jobs:die", ())
        assert c.wait([dead], timeout=20) == {dead: "failed"}
        assert "pool worker running it died" in c.job(dead)["error"]
        ok = c.submit_call("tests.jobs:inc", (2,))
        c.wait([ok], timeout=20)
        assert c.values([ok]) == [3]


def test_map_many_small_jobs_over_two_agents(cluster: Cluster) -> None:
    cluster.start_agent("a", slots=2, verbose=False)
    cluster.start_agent("b", slots=2, verbose=False)
    with cluster.client() as c:
        assert c.map("tests.jobs:inc", range(3000)) == [x + 1 for x in range(3000)]
        status = c.status()
    assert status["counts"]["done"] == 3000
    assert sum(a["done"] for a in status["agents"]) == 3000


def test_sigterm_drains_running_jobs_then_exits_zero(cluster: Cluster) -> None:
    proc = cluster.start_agent("a", slots=2)
    with cluster.client() as c:
        jobs = c.submit([JobSpec(command="sleep 1; echo finished") for _ in range(2)])
        wait_until(lambda: all(c.job(j)["state"] == "running" for j in jobs), what="both jobs to start")
        time.sleep(0.3)
        proc.terminate()
        assert proc.wait(timeout=20) == 0
        assert c.wait(jobs, timeout=5) == {j: "done" for j in jobs}
        queued_after = c.submit([JobSpec(command="true")])
        assert c.wait(queued_after, timeout=1.5) == {}  # nobody took it: the agent stopped taking work


def test_second_sigterm_kills_running_jobs(cluster: Cluster, tmp_path: Path) -> None:
    proc = cluster.start_agent("a", slots=1)
    pidfile = tmp_path / "long.pid"
    with cluster.client() as c:
        [job] = c.submit([JobSpec(command=f"echo $$ > {pidfile}; sleep 60")])
        pid = read_pid(pidfile)
        proc.terminate()
        time.sleep(0.5)
        assert proc.poll() is None  # first SIGTERM: still draining
        proc.terminate()
        assert cluster.agent_exit("a", timeout=20) == 1
        wait_until(lambda: not alive(pid), timeout=5, what="the job's process group to be killed")
        # Not recorded as an outcome: handed back to the queue, to run again elsewhere. The attempt
        # it killed stays in the history (issue 9), as interrupted, counting nothing.
        assert c.job(job)["state"] == "queued"
        assert [(a["state"], a["counted"]) for a in c.job(job)["attempt_list"]] == [("interrupted", 0)]


def test_tasks_a_long_poll_brings_after_a_forced_stop_go_straight_back(cluster: Cluster) -> None:
    """A forced stop takes the pool down while the session's take may still be parked on the master (its
    loops outlive the pool by up to SESSION_JOIN_SECONDS): what that take then brings must go back to the
    queue at once, not sit "assigned" to a dead agent for a lease (nor crash the loop). The agent here is
    the real Agent object, in this process, on a real master; its pool is gone, as after a forced stop."""
    address = cluster.address()
    authkey = read_authkey(cluster.home / "authkey")
    agent = Agent(address, authkey, AgentInfo(name="late", host="localhost", pid=os.getpid(), slots=1, tags=("late",)))
    agent._register()
    with cluster.client() as c:
        [job] = c.submit([JobSpec(command="true", tags=["late"])])
        scheduler = connect(address, authkey)
        rows, cancel = call(scheduler, "take", 30, agent.session, 1, 5.0)
        drop(scheduler)
        assert [row[0] for row in rows] == [job] and c.job(job)["state"] == "assigned"
        assert agent.pool is None
        agent._received(rows, cancel)
        assert c.job(job)["state"] == "queued"  # at once: the report went before _received returned
        assert c.job(job)["attempt_list"] == []  # never started: no attempt in its history, nothing counted
        cluster.start_agent("b", slots=1, tags="late")  # and it runs, once, elsewhere
        assert c.wait([job], 30) == {job: "done"} and c.job(job)["agent"] == "b"


@pytest.mark.parametrize("slots", [1])
def test_master_restart_keeps_jobs_and_agent_reconnects(cluster: Cluster, slots: int) -> None:
    with cluster.client() as c:
        queued = c.submit([JobSpec(command="echo later", tags=("later",))])
        done = c.submit([JobSpec(command="echo now")])
    cluster.start_agent("a", slots=slots, tags="later-not")
    with cluster.client() as c:
        c.wait(done, timeout=20)
    cluster.master.kill()
    cluster.master.wait(timeout=10)
    cluster.start_master()
    with cluster.client() as c:
        assert c.job(queued[0])["state"] == "queued"
        assert c.job(done[0])["state"] == "done"
        wait_until(lambda: any(a["name"] == "a" and a["state"] == "up" for a in c.agents()), timeout=30,
                 what="the agent to reconnect by itself")
        again = c.submit([JobSpec(command="echo after restart")])
        assert c.wait(again, timeout=20) == {again[0]: "done"}


def test_long_jobs_spread_over_agents_after_tiny_ones(cluster: Cluster) -> None:
    """An agent that learned that jobs are tiny must not hoard a batch of long ones: it keeps
    about 100 ms of work per slot and hands the rest back for idle agents."""
    cluster.start_agent("a", slots=4, verbose=False)
    cluster.start_agent("b", slots=4, verbose=False)
    with cluster.client() as c:
        assert c.map("tests.jobs:inc", range(2000)) == [x + 1 for x in range(2000)]
        slow = c.submit([JobSpec(command="sleep 0.2") for _ in range(40)])
        assert set(c.wait(slow, timeout=60).values()) == {"done"}
        ran = [c.job(j)["agent"] for j in slow]
    assert ran.count("a") >= 10 and ran.count("b") >= 10, ran
