"""A callable's environment is atomic: checked whole, applied for the job, restored whatever ended it (real pool worker)."""

from __future__ import annotations

import pickle
import threading
from typing import Dict, Iterator, Optional

import pytest

from corral.agent.execute import env_fault
from corral.agent.pool import JobPool
from corral.agent.protocol import Task
from tests.test_agent_pool import JOBS, Reported

WATCHED = ("GOOD", "SET_BY_JOB", "HOME", "PATH", "BAD")


def call(job_id: int, func: str, *args: object, env: Optional[Dict[str, str]] = None,
         timeout: Optional[float] = None) -> Task:
    return Task(job_id, 1, None, f"{JOBS}:{func}", pickle.dumps((args, {})), env or {}, None, timeout)


@pytest.fixture
def reported() -> Reported:
    return Reported()


@pytest.fixture
def pool(reported: Reported) -> Iterator[JobPool]:
    jobs = JobPool(1, reported, threading.Event(), hard_kill_grace=5.0)  # one worker: every job runs on it
    try:
        yield jobs
    finally:
        jobs.stop()


def worker_env(pool: JobPool, reported: Reported, job_id: int) -> Dict[str, Optional[str]]:
    pool.accept([call(job_id, "env_of", *WATCHED)])
    result = reported.wait(job_id, timeout=30)[job_id]
    assert result.state == "done", result.error
    return pickle.loads(result.value)


@pytest.mark.parametrize("env, fault", [
    ({"GOOD": "1", "BAD": "a\x00b"}, "env value of 'BAD' holds a NUL character"),
    ({"GOOD": "1", "A=B": "x"}, "env name 'A=B' is empty or holds '=' or NUL"),
    ({"GOOD": "1", "": "x"}, "env name '' is empty or holds '=' or NUL"),
    ({"GOOD": "1", "BAD": 1}, "env must map names to strings, not str to int"),
    ({"GOOD": "1", 2: "x"}, "env must map names to strings, not int to str"),
    ({"GOOD": "1", "BAD": "\ud800"}, "env 'BAD' cannot be encoded for this system"),
])
def test_bad_env_is_refused_whole_and_the_next_job_on_the_worker_sees_none_of_it(
        pool: JobPool, reported: Reported, env: Dict, fault: str) -> None:
    before = worker_env(pool, reported, 1)
    pool.accept([call(2, "env_of", *WATCHED, env=env)])
    bad = reported.wait(2, timeout=30)[2]
    assert (bad.state, bad.error) == ("failed", f"refused: {fault}")
    assert worker_env(pool, reported, 3) == before  # GOOD, listed first, was not applied either


@pytest.mark.parametrize("action, state", [("return", "done"), ("raise", "failed"), ("nap", "timeout")])
def test_env_is_restored_however_the_callable_ends(pool: JobPool, reported: Reported, action: str, state: str) -> None:
    before = worker_env(pool, reported, 1)
    assert before["GOOD"] is None and before["PATH"] is not None
    pool.accept([call(2, "set_env_then", action, 30.0, env={"GOOD": "job's"}, timeout=0.5 if action == "nap" else None)])
    assert reported.wait(2, timeout=30)[2].state == state
    assert worker_env(pool, reported, 3) == before


def test_env_is_restored_after_a_cancel(pool: JobPool, reported: Reported, tmp_path: object) -> None:
    before = worker_env(pool, reported, 1)
    pool.accept([call(2, "set_env_then", "nap", 60.0, env={"GOOD": "job's"})])
    for _ in range(300):  # until the worker runs it (the pool has just one)
        if pool.held[(2, 1)].worker:  # held by (job id, attempt)
            break
        threading.Event().wait(0.02)
    threading.Event().wait(0.2)  # inside the function, past the changes
    pool.cancel([(2, 1)])
    assert reported.wait(2, timeout=30)[2].state == "cancelled"
    assert worker_env(pool, reported, 3) == before


def test_the_job_sees_its_env_and_the_next_one_does_not(pool: JobPool, reported: Reported) -> None:
    assert env_fault({"A": "1", "B": ""}) == ""
    pool.accept([call(1, "env_of", "GOOD", "EMPTY", env={"GOOD": "yes", "EMPTY": ""})])
    assert pickle.loads(reported.wait(1, timeout=30)[1].value) == {"GOOD": "yes", "EMPTY": ""}
    assert worker_env(pool, reported, 2)["GOOD"] is None
