"""The agent's pool in-process: a real forkserver pool, real workers killed for real, no master."""

from __future__ import annotations

import os
import pickle
import signal
import threading
import time
from pathlib import Path
from typing import Dict, Iterator, List, Optional

import pytest
from corral.agent.pool import JobPool
from corral.agent.protocol import JobResult, Task

from tests.waiting import wait_until

JOBS = "tests.unit.agent_jobs"


class Reported:
    """The pool's way out, collected: job id -> its result."""

    def __init__(self) -> None:
        self.results: Dict[int, JobResult] = {}
        self.changed = threading.Condition()

    def __call__(self, results: List[JobResult]) -> None:
        with self.changed:
            for result in results:
                assert result.job_id not in self.results, f"job {result.job_id} settled twice"
                self.results[result.job_id] = result
            self.changed.notify_all()

    def wait(self, *job_ids: int, timeout: float = 10.0) -> Dict[int, JobResult]:
        deadline = time.monotonic() + timeout
        with self.changed:
            while not all(j in self.results for j in job_ids):
                left = deadline - time.monotonic()
                assert left > 0, f"no result for {sorted(set(job_ids) - set(self.results))} in {timeout}s"
                self.changed.wait(left)
            return {j: self.results[j] for j in job_ids}


def call(job_id: int, func: str, *args: object, timeout: Optional[float] = None) -> Task:
    return Task(job_id, 1, None, f"{JOBS}:{func}", pickle.dumps((args, {})), {}, None, timeout)


def shell(job_id: int, command: str) -> Task:
    return Task(job_id, 1, command, None, None, {}, None, None)


def wait_for_file(path: Path, timeout: float = 10.0) -> str:
    return str(wait_until(lambda: path.exists() and path.read_text(), timeout, 0.01, f"{path} to appear"))


@pytest.fixture
def reported() -> Reported:
    return Reported()


@pytest.fixture
def pool(reported: Reported) -> Iterator[JobPool]:
    jobs = JobPool(1, reported, threading.Event(), hard_kill_grace=0.2)
    try:
        yield jobs
    finally:
        jobs.stop()


def test_jobs_run_and_come_back_as_named_results(pool: JobPool, reported: Reported) -> None:
    pool.accept([shell(1, "echo hello; exit 3")])
    reported.wait(1)
    pool.accept([call(2, "pid")])  # one slot: the next unknown job once it is free
    got = reported.wait(1, 2)
    assert (got[1].state, got[1].exit_code, got[1].stdout) == ("failed", 3, b"hello\n")
    assert got[2].state == "done" and pickle.loads(got[2].value or b"") != os.getpid()
    assert got[2].ended >= got[2].started > 0
    assert pool.idle() and pool.holding(draining=False).running == []


def test_a_worker_killed_from_outside_fails_its_job_and_is_replaced(pool: JobPool, reported: Reported,
                                                                   tmp_path: Path) -> None:
    started = tmp_path / "started"
    pool.accept([call(1, "nap_and_mark", str(started), 60)])
    worker = int(wait_for_file(started))
    os.kill(worker, signal.SIGKILL)
    got = reported.wait(1)[1]
    assert got.state == "failed" and "pool worker running it died" in got.error
    pool.accept([call(2, "pid")])  # the pool's replacement worker runs the next one
    replacement = pickle.loads(reported.wait(2)[2].value or b"")
    assert replacement != worker


def test_a_callable_ignoring_its_timeout_has_its_worker_killed(pool: JobPool, reported: Reported) -> None:
    pool.accept([call(1, "stubborn", 60, timeout=0.2)])
    got = reported.wait(1)[1]
    assert got.state == "timeout" and "its worker was killed" in got.error
    pool.accept([call(2, "pid")])
    assert reported.wait(2)[2].state == "done"


def test_a_running_callable_is_cancelled_and_unknown_work_beyond_the_slots_goes_back(
        pool: JobPool, reported: Reported, tmp_path: Path) -> None:
    started = tmp_path / "started"
    pool.accept([call(1, "nap_and_mark", str(started), 60), call(2, "pid")])  # one slot, kinds never seen
    assert reported.wait(2)[2].state == "released"
    wait_for_file(started)
    pool.cancel([(1, 1)])  # an attempt, (job id, attempt)
    assert reported.wait(1)[1].state == "cancelled"
    assert pool.idle()
