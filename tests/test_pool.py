"""corral.Pool against CPython's own Pool tests (_TestPool in Lib/test/_test_multiprocessing.py), on a real
master and real agents that cannot import the tasks' module: its code is shipped."""

from __future__ import annotations

import itertools
import multiprocessing
import sys
import threading
import time
import types
import uuid
from pathlib import Path
from multiprocessing.pool import RemoteTraceback  # type: ignore[attr-defined]

import pytest

from corral import Pool
from corral.console.errors import JobFailed
from tests.cluster import Cluster, wait_until
from tests.shipkit import forget, import_from, pool_cluster, tasks, write_module  # noqa: F401 (fixtures)

TIMEOUT1 = 0.5


@pytest.fixture(scope="module")
def pool(pool_cluster: Cluster, tasks: types.ModuleType):  # noqa: F811
    p = Pool(4, home=pool_cluster.home)
    try:
        yield p
    finally:
        p.terminate()
        p.join()


def test_the_agents_cannot_import_the_tasks_module_by_name(pool_cluster: Cluster, tasks: types.ModuleType) -> None:  # noqa: F811
    done = pool_cluster.corral("call", "--wait", f"{tasks.__name__}:sqr", "3")
    assert done.returncode != 0 and f"No module named '{tasks.__name__}'" in done.stdout + done.stderr


def test_apply(pool: Pool, tasks: types.ModuleType) -> None:  # noqa: F811
    assert pool.apply(tasks.sqr, (5,)) == 25
    assert pool.apply(tasks.sqr, (), {"x": 3}) == 9


def test_map(pool: Pool, tasks: types.ModuleType) -> None:  # noqa: F811
    assert pool.map(tasks.sqr, list(range(10))) == [x * x for x in range(10)]
    assert pool.map(tasks.sqr, list(range(100)), chunksize=20) == [x * x for x in range(100)]
    assert pool.map(tasks.sqr, range(30), chunksize=1) == [x * x for x in range(30)]
    assert pool.map(tasks.sqr, range(30), chunksize=1000) == [x * x for x in range(30)]
    # A task returning a list is one value, whatever the chunking.
    assert pool.map(tasks.identity, [[1, 2], [3]], chunksize=1) == [[1, 2], [3]]


def test_starmap(pool: Pool, tasks: types.ModuleType) -> None:  # noqa: F811
    pairs = list(zip(range(10), range(9, -1, -1)))
    assert pool.starmap(tasks.mul, pairs) == list(itertools.starmap(tasks.mul, pairs))
    pairs = list(zip(range(100), range(99, -1, -1)))
    assert pool.starmap(tasks.mul, pairs, chunksize=20) == list(itertools.starmap(tasks.mul, pairs))
    assert pool.starmap_async(tasks.mul, pairs).get() == list(itertools.starmap(tasks.mul, pairs))


def test_map_async(pool: Pool, tasks: types.ModuleType) -> None:  # noqa: F811
    assert pool.map_async(tasks.sqr, list(range(10))).get() == [x * x for x in range(10)]


def test_map_async_callbacks_run_in_the_callers_process_before_wait_returns(pool: Pool) -> None:
    calls: list = []
    pool.map_async(int, ["1"], callback=calls.append, error_callback=calls.append).wait()
    assert calls == [[1]]
    pool.map_async(int, ["a"], callback=calls.append, error_callback=calls.append).wait()
    assert len(calls) == 2 and isinstance(calls[1], ValueError)


def test_map_unpicklable_arguments_raise_at_submit(pool: Pool, tasks: types.ModuleType) -> None:  # noqa: F811
    class A:
        def __reduce__(self):
            raise RuntimeError("cannot pickle")

    with pytest.raises(RuntimeError, match="cannot pickle"):
        pool.map(tasks.sqr, [A()] * 10)


def test_map_of_nothing_with_chunksize_does_not_stall(pool: Pool, tasks: types.ModuleType) -> None:  # noqa: F811
    try:
        assert pool.map_async(tasks.sqr, [], chunksize=1).get(timeout=TIMEOUT1) == []
    except multiprocessing.TimeoutError:
        pytest.fail("map_async with chunksize stalled on an empty list")


def test_map_handle_iterable_exception(pool: Pool, tasks: types.ModuleType) -> None:  # noqa: F811
    for _ in range(2):  # re-entrant
        with pytest.raises(tasks.SayWhenError):
            pool.map(tasks.sqr, tasks.exception_throwing_generator(1, -1), 1)
    with pytest.raises(tasks.SayWhenError):
        pool.map(tasks.sqr, tasks.exception_throwing_generator(10, 3), 1)

    class SpecialIterable:
        def __iter__(self):
            return self

        def __next__(self):
            raise tasks.SayWhenError

        def __len__(self):
            return 1

    for _ in range(2):
        with pytest.raises(tasks.SayWhenError):
            pool.map(tasks.sqr, SpecialIterable(), 1)


def test_async_get_waits_for_a_slow_task(pool: Pool, tasks: types.ModuleType) -> None:  # noqa: F811
    result = pool.apply_async(tasks.sqr, (7, TIMEOUT1))
    began = time.monotonic()
    assert result.get() == 49
    assert TIMEOUT1 * 0.8 <= time.monotonic() - began < TIMEOUT1 + 5


def test_async_timeout(pool: Pool, tasks: types.ModuleType) -> None:  # noqa: F811
    result = pool.apply_async(tasks.sqr, (6, 3.0))
    began = time.monotonic()
    with pytest.raises(multiprocessing.TimeoutError):
        result.get(timeout=TIMEOUT1)
    assert TIMEOUT1 * 0.8 <= time.monotonic() - began < TIMEOUT1 + 1
    assert not result.ready()
    with pytest.raises(ValueError):
        result.successful()  # not ready yet
    assert result.get(timeout=10) == 36 and result.ready() and result.successful()


def test_imap(pool: Pool, tasks: types.ModuleType) -> None:  # noqa: F811
    assert list(pool.imap(tasks.sqr, list(range(10)))) == [x * x for x in range(10)]
    it = pool.imap(tasks.sqr, list(range(10)))
    for i in range(10):
        assert next(it) == i * i
    with pytest.raises(StopIteration):
        next(it)
    it = pool.imap(tasks.sqr, list(range(1000)), chunksize=100)
    for i in range(1000):
        assert next(it) == i * i
    with pytest.raises(StopIteration):
        next(it)


def test_imap_reads_its_iterable_lazily(pool: Pool, tasks: types.ModuleType) -> None:  # noqa: F811
    taken = itertools.count()

    def endless():
        while True:
            yield next(taken)

    it = pool.imap(tasks.sqr, endless())
    assert [next(it) for _ in range(5)] == [0, 1, 4, 9, 16]
    time.sleep(0.3)
    # Read ahead by a bounded amount (two chunks per slot), not consumed to the end (it has none).
    assert next(taken) < 5 + 2 * 4 + 2


def test_imap_handle_iterable_exception(pool: Pool, tasks: types.ModuleType) -> None:  # noqa: F811
    for _ in range(2):
        it = pool.imap(tasks.sqr, tasks.exception_throwing_generator(1, -1), 1)
        with pytest.raises(tasks.SayWhenError):
            next(it)
    it = pool.imap(tasks.sqr, tasks.exception_throwing_generator(10, 3), 1)
    for i in range(3):
        assert next(it) == i * i
    with pytest.raises(tasks.SayWhenError):
        next(it)
    # The error surfaces at the start of the chunk it broke: that chunk's items are lost, as in CPython.
    it = pool.imap(tasks.sqr, tasks.exception_throwing_generator(20, 7), 2)
    for i in range(6):
        assert next(it) == i * i
    with pytest.raises(tasks.SayWhenError):
        next(it)
    it = pool.imap(tasks.sqr, tasks.exception_throwing_generator(20, 7), 4)
    for i in range(4):
        assert next(it) == i * i
    with pytest.raises(tasks.SayWhenError):
        next(it)


def test_imap_next_timeout(pool: Pool, tasks: types.ModuleType) -> None:  # noqa: F811
    it = pool.imap(tasks.pid_after, [1.5], 1)
    with pytest.raises(multiprocessing.TimeoutError):
        it.next(timeout=TIMEOUT1)
    assert isinstance(it.next(timeout=10), int)
    with pytest.raises(StopIteration):
        pool.imap(tasks.identity, [], 1).next(timeout=1)


def test_an_imap_still_being_read_completes_after_close_and_join(pool_cluster: Cluster, tasks: types.ModuleType) -> None:  # noqa: F811
    p = Pool(2, home=pool_cluster.home)
    it = p.imap(tasks.sqr, range(100))  # lazily read: only a few chunks are out yet
    assert next(it) == 0
    p.close()  # reads the rest now, as multiprocessing's task handler would have
    p.join()
    assert list(it) == [x * x for x in range(1, 100)]


def test_imap_unordered(pool: Pool, tasks: types.ModuleType) -> None:  # noqa: F811
    assert sorted(pool.imap_unordered(tasks.sqr, list(range(10)))) == [x * x for x in range(10)]
    assert sorted(pool.imap_unordered(tasks.sqr, list(range(1000)), chunksize=100)) == [x * x for x in range(1000)]


def test_imap_unordered_handle_iterable_exception(pool: Pool, tasks: types.ModuleType) -> None:  # noqa: F811
    for _ in range(2):
        it = pool.imap_unordered(tasks.sqr, tasks.exception_throwing_generator(1, -1), 1)
        with pytest.raises(tasks.SayWhenError):
            next(it)
    for total, when, size in ((10, 3, 1), (20, 7, 2)):
        it = pool.imap_unordered(tasks.sqr, tasks.exception_throwing_generator(total, when), size)
        expected = [x * x for x in range(total)]
        with pytest.raises(tasks.SayWhenError):
            for _ in range(total):
                value = next(it)
                assert value in expected
                expected.remove(value)


def test_make_pool(pool_cluster: Cluster) -> None:  # noqa: F811
    for bad in (-1, 0):
        with pytest.raises(ValueError):
            Pool(bad, home=pool_cluster.home)


def test_terminate_cancels_the_pools_queued_and_running_jobs(pool_cluster: Cluster, tasks: types.ModuleType) -> None:  # noqa: F811
    p = Pool(3, home=pool_cluster.home)
    result = p.starmap_async(tasks.sqr, [(x, 60.0) for x in range(50)], chunksize=1)
    with pool_cluster.client() as c:
        # Taken by the agents: running, or assigned (an agent's pacing may queue a second task behind a
        # first on one pool worker; it starts when that one ends).
        wait_until(lambda: sum(j["state"] in ("running", "assigned") for j in c.jobs(limit=200)
                               if j["name"].startswith(p.name + " ")) == 3,
                   what="three of the pool's jobs taken by the agents (processes=3)")
        began = time.monotonic()
        p.terminate()
        p.join()
        assert time.monotonic() - began < 5
        with pytest.raises(JobFailed, match="terminated"):
            result.get(timeout=1)
        # On the cluster: the three running were killed, and the rest never started.
        ours = lambda: [j for j in c.jobs(limit=200) if j["name"].startswith(p.name + " ")]  # noqa: E731
        wait_until(lambda: all(j["state"] == "cancelled" for j in ours()), timeout=10, what="every job of the pool cancelled")
        assert len(ours()) <= 50


def test_processes_caps_the_pools_jobs_on_the_cluster(pool_cluster: Cluster, tasks: types.ModuleType) -> None:  # noqa: F811
    with Pool(2, home=pool_cluster.home) as p:
        assert sorted(p.starmap(tasks.sqr, [(x, 0.3) for x in range(6)], chunksize=1)) == [x * x for x in range(6)]
        with pool_cluster.client() as c:
            spans = sorted((j["started"], j["ended"]) for j in c.jobs(limit=100) if j["name"].startswith(p.name + " "))
    assert len(spans) == 6
    for i, (start, _) in enumerate(spans):  # at any job's start, at most 2 of the pool's jobs had started and not ended
        assert sum(1 for s, e in spans if s <= start < e) <= 2, spans


def test_empty_iterable(pool_cluster: Cluster, tasks: types.ModuleType) -> None:  # noqa: F811
    p = Pool(1, home=pool_cluster.home)
    assert p.map(tasks.sqr, []) == []
    assert list(p.imap(tasks.sqr, [])) == []
    assert list(p.imap_unordered(tasks.sqr, [])) == []
    assert p.map_async(tasks.sqr, []).get() == []
    p.close()
    p.join()


def test_context_manager_terminates_and_a_closed_pool_refuses_work(pool_cluster: Cluster, tasks: types.ModuleType) -> None:  # noqa: F811
    items = list(range(10))
    with Pool(2, home=pool_cluster.home) as p:
        assert p.map_async(tasks.sqr, items).get() == [x * x for x in items]
    p.join()
    with pytest.raises(ValueError):
        p.map_async(tasks.sqr, items)
    with pytest.raises(ValueError):  # bpo-35477: entering a pool that is not running
        with p:
            pass
    q = Pool(home=pool_cluster.home)
    with pytest.raises(ValueError):
        q.join()  # still running
    q.close()
    for refused in (lambda: q.apply_async(tasks.sqr, (1,)), lambda: q.map(tasks.sqr, [1]), lambda: q.imap(tasks.sqr, [1])):
        with pytest.raises(ValueError, match="Pool not running"):
            refused()
    q.join()


def test_leaving_the_with_block_cancels_what_the_pool_still_has_on_the_cluster(pool_cluster: Cluster, tasks: types.ModuleType) -> None:  # noqa: F811
    with pool_cluster.client() as c:
        with Pool(home=pool_cluster.home) as p:  # processes=None: no cap of its own, the cluster's slots
            p.starmap_async(tasks.sqr, [(x, 60.0) for x in range(12)], chunksize=1)
            ours = lambda: [j for j in c.jobs(limit=200) if j["name"].startswith(p.name + " ")]  # noqa: E731
            # All 12 on the cluster at once (no cap), four of them taken by the two agents' four slots.
            wait_until(lambda: len(ours()) == 12 and sum(j["state"] in ("running", "assigned") for j in ours()) >= 4,
                       what="the pool's 12 jobs submitted and the agents' slots filled")
        # __exit__ is terminate(), as multiprocessing's: the running ones killed, the queued never run.
        wait_until(lambda: all(j["state"] == "cancelled" for j in ours()), timeout=10, what="every job of the pool cancelled")


def test_a_pools_timeout_applies_to_each_of_its_jobs(pool_cluster: Cluster, tasks: types.ModuleType) -> None:  # noqa: F811
    with Pool(home=pool_cluster.home, timeout=1) as p:
        began = time.monotonic()
        with pytest.raises(JobFailed, match="timed out|timeout"):
            p.apply(tasks.sqr, (3, 30.0))
        assert time.monotonic() - began < 20  # the job's 1 s, plus the kill and the report; not its 30 s
        assert p.apply(tasks.sqr, (3,)) == 9  # a quick one is not affected


def test_ship_sends_a_module_the_function_only_imports_when_it_runs(pool_cluster: Cluster, tmp_path: Path) -> None:  # noqa: F811
    extra = f"extra_{uuid.uuid4().hex[:8]}"
    user = f"user_{uuid.uuid4().hex[:8]}"
    write_module(tmp_path / "lib", extra, "def tag():\n    return 'from the shipped extra'\n")
    write_module(tmp_path / "app", user, f"def f():\n    import {extra}\n    return {extra}.tag()\n")
    extra_module = import_from(tmp_path / "lib", extra)
    module = import_from(tmp_path / "app", user)
    try:
        # Found by no import at the top of the function's module: without ship=, the agent cannot have it.
        with Pool(home=pool_cluster.home) as p:
            with pytest.raises(ModuleNotFoundError, match=extra):
                p.apply(module.f)
        with Pool(home=pool_cluster.home, ship=[extra_module]) as p:
            assert p.apply(module.f) == "from the shipped extra"
    finally:
        forget(extra, user)


def test_traceback_of_the_remote_task_is_the_cause(pool_cluster: Cluster, tasks: types.ModuleType) -> None:  # noqa: F811
    with Pool(1, home=pool_cluster.home) as p:
        with pytest.raises(RuntimeError) as caught:
            p.apply(tasks.raise_123)
    exc = caught.value
    assert type(exc) is RuntimeError and exc.args == (123,)
    assert type(exc.__cause__) is RemoteTraceback
    assert "raise RuntimeError(123) # some comment" in exc.__cause__.tb
    # The iterable's own error is raised here, not made remote.
    with Pool(1, home=pool_cluster.home) as p:
        with pytest.raises(tasks.SayWhenError) as caught:
            p.map(tasks.sqr, tasks.exception_throwing_generator(1, -1), 1)
    assert caught.value.__cause__ is None


def test_map_no_failfast_join_waits_for_every_task(pool_cluster: Cluster, tasks: types.ModuleType) -> None:  # noqa: F811
    began = time.monotonic()
    with pytest.raises(ValueError):
        with Pool(2, home=pool_cluster.home) as p:
            try:
                p.map(tasks.raise_large_valuerror, [0, 1])
            finally:
                time.sleep(0.5)
                p.close()
                p.join()
    assert time.monotonic() - began > 0.9


def test_error_callback_gets_the_tasks_exception(pool: Pool, tasks: types.ModuleType) -> None:  # noqa: F811
    seen: list = []
    result = pool.apply_async(tasks.raising, error_callback=seen.append)
    with pytest.raises(KeyError):
        result.get()
    assert len(seen) == 1 and isinstance(seen[0], KeyError)
    assert not result.successful()


def test_unpickleable_result_fails_that_task_only(pool: Pool, tasks: types.ModuleType) -> None:  # noqa: F811
    for _ in range(3):
        seen: list = []
        result = pool.apply_async(tasks.unpickleable_result, error_callback=seen.append)
        with pytest.raises(Exception, match="lambda|pickle"):
            result.get()
        assert seen and isinstance(seen[0], Exception)
    assert pool.apply(tasks.sqr, (4,)) == 16


def test_callbacks_run_in_the_callers_process(pool: Pool, tasks: types.ModuleType) -> None:  # noqa: F811
    seen: list = []
    pool.apply_async(tasks.sqr, (3,), callback=lambda v: seen.append((v, threading.current_thread().name))).wait()
    assert seen[0][0] == 9 and seen[0][1] == "corral-pool"  # this process's engine thread, as Pool's result handler


def test_a_partial_and_a_bound_method_of_a_picklable_object(pool: Pool, tasks: types.ModuleType) -> None:  # noqa: F811
    import functools

    assert pool.map(functools.partial(tasks.mul, 10), [1, 2, 3]) == [10, 20, 30]
    assert pool.map(tasks.Counter(100).add, range(3), chunksize=2) == [100, 101, 102]
    assert pool.apply(functools.partial(tasks.capture, 1, k=2), (3,), {"j": 4}) == ((1, 3), {"k": 2, "j": 4})


def test_a_batch_is_named_and_cancelled_as_a_group(pool_cluster: Cluster, tasks: types.ModuleType) -> None:  # noqa: F811
    with Pool(home=pool_cluster.home) as p:
        result = p.starmap_async(tasks.sqr, [(x, 30.0) for x in range(20)], chunksize=1)
        with pool_cluster.client() as c:
            names = wait_until(lambda: sorted((j["name"] for j in c.jobs(limit=100) if j["name"].startswith(p.name + " ")),
                                            key=lambda n: int(n.split("[")[1].split("/")[0])), what="the batch's jobs")
            assert names == [f"{p.name} [{i}/20]" for i in range(1, 21)]
            done = pool_cluster.corral("cancel", "--batch", p.name)
            assert done.returncode == 0, done.stderr
            assert done.stdout.startswith(f"{p.name}: ") and "cancelled" in done.stdout
            with pytest.raises(JobFailed, match="cancelled"):
                result.get(timeout=15)
    for usage in (("cancel",), ("cancel", "5", "--batch", p.name)):
        done = pool_cluster.corral(*usage)
        assert done.returncode == 2 and done.stderr.startswith("corral cancel: give job ids or --batch NAME")
    missing = pool_cluster.corral("cancel", "--batch", "pool-999999")
    assert missing.returncode != 0 and len(missing.stderr.strip().splitlines()) == 1
    assert "no queued or running job belongs to batch 'pool-999999'" in missing.stderr
    assert sys.modules[tasks.__name__] is tasks
