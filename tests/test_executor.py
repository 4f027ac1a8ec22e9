"""corral.Executor against CPython's concurrent.futures tests (executor, as_completed, wait, shutdown), on a real
master and real agents that cannot import the tasks' module: its code is shipped."""

from __future__ import annotations

import itertools
import time
import types
from concurrent import futures
from multiprocessing.pool import RemoteTraceback  # type: ignore[attr-defined]

import pytest

from corral import Executor
from tests.cluster import Cluster, wait_until
from tests.shipkit import pool_cluster, tasks  # noqa: F401 (fixtures)


@pytest.fixture
def executor(pool_cluster: Cluster):  # noqa: F811
    ex = Executor(home=pool_cluster.home)
    try:
        yield ex
    finally:
        ex.shutdown(wait=True, cancel_futures=True)


def batch_jobs(cluster: Cluster, name: str) -> dict[int, dict]:
    """The executor's jobs on the cluster by their index in its batch ("executor-N [i]")."""
    with cluster.client() as c:
        return {int(j["name"].split("[")[1].split("]")[0].split("/")[0]): j
                for j in c.jobs(limit=500) if j["name"].startswith(name + " [")}


def test_submit(executor: Executor, tasks: types.ModuleType) -> None:  # noqa: F811
    assert executor.submit(pow, 2, 8).result() == 256
    assert executor.submit(tasks.sqr, 12).result() == 144


def test_submit_keyword(executor: Executor, tasks: types.ModuleType) -> None:  # noqa: F811
    assert executor.submit(tasks.mul, 2, y=8).result() == 16
    assert executor.submit(tasks.capture, 1, self=2, fn=3).result() == ((1,), {"self": 2, "fn": 3})
    with pytest.raises(TypeError):
        executor.submit(fn=tasks.capture, arg=1)
    with pytest.raises(TypeError):
        executor.submit(arg=1)


def test_map(executor: Executor) -> None:
    assert list(executor.map(pow, range(10), range(10))) == list(map(pow, range(10), range(10)))
    assert list(executor.map(pow, range(10), range(10), chunksize=3)) == list(map(pow, range(10), range(10)))
    assert list(executor.map(pow, [], [])) == []


def test_map_exception(executor: Executor) -> None:
    it = executor.map(divmod, [1, 1, 1, 1], [2, 3, 0, 5])
    assert next(it) == (0, 1)
    assert next(it) == (0, 1)
    with pytest.raises(ZeroDivisionError) as caught:
        next(it)
    assert type(caught.value.__cause__) is RemoteTraceback


def test_map_timeout(executor: Executor) -> None:
    results = []
    with pytest.raises(futures.TimeoutError):
        for value in executor.map(time.sleep, [0, 0, 6], timeout=2):
            results.append(value)
    assert results == [None, None]


def test_map_submits_everything_before_it_returns(pool_cluster: Cluster, executor: Executor) -> None:  # noqa: F811
    executor.map(pow, range(5), range(5))  # never iterated
    wait_until(lambda: len(batch_jobs(pool_cluster, executor.name)) == 5, what="five jobs submitted")


def test_exception_has_its_type_and_the_remote_traceback(executor: Executor, tasks: types.ModuleType) -> None:  # noqa: F811
    future = executor.submit(tasks.raise_123)
    exc = future.exception(timeout=30)
    assert type(exc) is RuntimeError and exc.args == (123,)
    assert "raise RuntimeError(123) # some comment" in exc.__cause__.tb
    with pytest.raises(RuntimeError):
        future.result()


def test_as_completed(executor: Executor, tasks: types.ModuleType) -> None:  # noqa: F811
    f1, f2 = executor.submit(tasks.mul, 2, 21), executor.submit(tasks.mul, 7, 6)
    assert set(futures.as_completed([f1, f2])) == {f1, f2}
    assert [f.result() for f in (f1, f2)] == [42, 42]
    # Duplicates: one answer each (bpo-20367); any iterable (bpo-31641).
    slow = executor.submit(time.sleep, 0.5)
    assert len(list(futures.as_completed(itertools.repeat(slow, 3)))) == 1


def test_as_completed_yields_in_completion_order_and_times_out(executor: Executor, tasks: types.ModuleType) -> None:  # noqa: F811
    slow = executor.submit(tasks.pid_after, 2.0)
    fast = executor.submit(tasks.pid_after, 0.0)
    assert next(futures.as_completed([slow, fast], timeout=30)) is fast
    stuck = executor.submit(time.sleep, 5)
    for timeout in (0, 0.1):
        done = set()
        with pytest.raises(futures.TimeoutError):
            for f in futures.as_completed({fast, stuck}, timeout):
                done.add(f)
        assert done == {fast}


def test_wait(executor: Executor, tasks: types.ModuleType) -> None:  # noqa: F811
    # Seconds apart, not fractions: on a loaded 2-CPU machine a quick job can take a second to come back.
    quick, slow = executor.submit(tasks.mul, 21, 2), executor.submit(time.sleep, 4)
    done, not_done = futures.wait([quick, slow], return_when=futures.FIRST_COMPLETED)
    assert done == {quick} and not_done == {slow}
    broken = executor.submit(divmod, 1, 0)
    slower = executor.submit(time.sleep, 5)
    done, not_done = futures.wait([broken, slower], return_when=futures.FIRST_EXCEPTION)
    assert broken in done and slower in not_done
    done, not_done = futures.wait([quick, slow, broken], return_when=futures.ALL_COMPLETED)
    assert done == {quick, slow, broken} and not not_done
    done, not_done = futures.wait([slower, executor.submit(time.sleep, 10)], timeout=0.3)
    assert not done and len(not_done) == 2


def test_cancel_of_a_queued_future_cancels_its_job_on_the_cluster(pool_cluster: Cluster, tasks: types.ModuleType) -> None:  # noqa: F811
    with Executor(home=pool_cluster.home) as ex:
        # Fill the cluster's four slots, then one more queues on the master.
        running = [ex.submit(tasks.pid_after, 3.0) for _ in range(4)]
        wait_until(lambda: sum(j["state"] == "running" for j in batch_jobs(pool_cluster, ex.name).values()) == 4,
                 what="four jobs running")
        queued = ex.submit(tasks.sqr, 5)
        wait_until(lambda: batch_jobs(pool_cluster, ex.name).get(5, {}).get("state") == "queued", what="the fifth queued")
        assert queued.cancel() and queued.cancelled() and queued.done()
        with pytest.raises(futures.CancelledError):
            queued.result()
        assert batch_jobs(pool_cluster, ex.name)[5]["state"] == "cancelled"
        # A running one is not cancelled (and keeps running), as with the stdlib's executors.
        assert not running[0].cancel() and not running[0].cancelled()
        assert futures.wait(running, timeout=30).not_done == set()
        assert all(isinstance(f.result(), int) for f in running)


def test_cancel_of_a_future_not_yet_sent(pool_cluster: Cluster, tasks: types.ModuleType) -> None:  # noqa: F811
    with Executor(max_workers=1, home=pool_cluster.home) as ex:
        first = ex.submit(tasks.pid_after, 1.0)
        waiting = [ex.submit(tasks.sqr, i) for i in range(3)]  # held here: max_workers=1 keeps them off the cluster
        assert waiting[1].cancel()
        assert first.result(timeout=30) and waiting[0].result(timeout=30) == 0 and waiting[2].result(timeout=30) == 4
        assert waiting[1].cancelled()
    assert sorted(batch_jobs(pool_cluster, ex.name)) == [1, 2, 4]  # the cancelled one never became a job


def test_shutdown_refuses_new_work_and_waits(pool_cluster: Cluster, tasks: types.ModuleType) -> None:  # noqa: F811
    ex = Executor(home=pool_cluster.home)
    fs = [ex.submit(time.sleep, 0.1) for _ in range(20)]
    ex.shutdown()
    assert all(f.done() and f.result() is None for f in fs)
    with pytest.raises(RuntimeError, match="after shutdown"):
        ex.submit(pow, 2, 5)


def test_shutdown_without_wait_returns_at_once_and_the_futures_still_complete(pool_cluster: Cluster) -> None:  # noqa: F811
    ex = Executor(home=pool_cluster.home)
    fs = [ex.submit(time.sleep, 1.0) for _ in range(4)]
    began = time.monotonic()
    ex.shutdown(wait=False)  # as concurrent.futures: no more work, nothing cancelled, no waiting
    assert time.monotonic() - began < 0.5 and not any(f.done() for f in fs)
    with pytest.raises(RuntimeError, match="after shutdown"):
        ex.submit(pow, 2, 5)
    done, not_done = futures.wait(fs, timeout=30)
    assert not not_done and all(f.result() is None for f in done)


def test_shutdown_cancel_futures(pool_cluster: Cluster) -> None:  # noqa: F811
    ex = Executor(max_workers=4, home=pool_cluster.home)
    fs = [ex.submit(time.sleep, 1.0) for _ in range(50)]
    # A future counts as started once its job runs on an agent (not when it is queued on the master).
    wait_until(lambda: sum(j["state"] == "running" for j in batch_jobs(pool_cluster, ex.name).values()) == 4,
             what="four jobs running")
    ex.shutdown(cancel_futures=True)
    cancelled = [f for f in fs if f.cancelled()]
    others = [f for f in fs if not f.cancelled()]
    assert len(cancelled) == 46 and len(others) == 4
    assert all(f.done() and f.exception() is None for f in others)
    assert sorted(j["state"] for j in batch_jobs(pool_cluster, ex.name).values()) == ["done"] * 4


def test_context_manager_shuts_down(pool_cluster: Cluster, tasks: types.ModuleType) -> None:  # noqa: F811
    with Executor(max_workers=5, home=pool_cluster.home) as ex:
        fs = [ex.submit(tasks.sqr, i) for i in range(5)]
    assert [f.result(timeout=0) for f in fs] == [i * i for i in range(5)]


def test_max_workers_negative(pool_cluster: Cluster) -> None:  # noqa: F811
    for bad in (0, -1):
        with pytest.raises(ValueError, match="max_workers must be greater than 0"):
            Executor(max_workers=bad, home=pool_cluster.home)


def test_done_callbacks_run_once_settled(executor: Executor, tasks: types.ModuleType) -> None:  # noqa: F811
    seen: list = []
    future = executor.submit(tasks.sqr, 6)
    future.add_done_callback(lambda f: seen.append(f.result()))
    wait_until(lambda: seen, what="the done callback")
    assert seen == [36]
