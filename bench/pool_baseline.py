"""The local limit: the same workloads on a plain multiprocessing.Pool, no network and no master."""

from __future__ import annotations

import multiprocessing
import time
from typing import Any, Callable, List

from . import Deadline, Params, latency_summary
from .jobs import inc, shell

# spawn, like the seed port: workers import bench.jobs by name, and the bench process has threads.
CTX = multiprocessing.get_context("spawn")


def _stop(pool: Any) -> None:
    """terminate() kills the workers (SIGTERM) and joins them; join() then returns promptly."""
    pool.terminate()
    pool.join()


def w1_throughput(pool: Any, params: Params) -> dict:
    deadline = Deadline(params.w1_budget, "Pool W1")
    pool.map_async(inc, range(params.w1_warmup)).get(deadline.remaining(0.01))
    t0 = time.perf_counter()
    # map()'s default chunksize: len / (4 × processes), the way Pool is normally used.
    results = pool.map_async(inc, range(params.w1_jobs)).get(deadline.remaining(0.01))
    elapsed = time.perf_counter() - t0
    expected = sum(i + 1 for i in range(params.w1_jobs))
    if sum(results) != expected:
        raise RuntimeError(f"Pool W1: sum of results {sum(results)}, expected {expected}")
    return {"w1_jobs_per_s": params.w1_jobs / elapsed, "w1_seconds": elapsed, "w1_jobs": params.w1_jobs}


def w2_latency(pool: Any, params: Params) -> dict:
    deadline = Deadline(params.w2_budget, "Pool W2")
    samples: List[float] = []
    for i in range(params.w2_warmup + params.w2_jobs):
        t0 = time.perf_counter()
        value = pool.apply_async(inc, (i,)).get(deadline.remaining(0.01))
        t1 = time.perf_counter()
        if value != i + 1:
            raise RuntimeError(f"Pool W2: job {i} returned {value!r}")
        if i >= params.w2_warmup:
            samples.append(t1 - t0)
    return latency_summary(samples)


def w3_parallel_sleep(params: Params) -> dict:
    processes = params.workers * params.slots
    pool = CTX.Pool(processes)
    try:
        deadline = Deadline(params.w3_budget, "Pool W3")
        # Every worker has started (spawn) and run a shell once before timing starts.
        pool.map_async(shell, ["true"] * processes, chunksize=1).get(deadline.remaining(0.01))
        t0 = time.perf_counter()
        codes = pool.map_async(shell, [params.w3_command] * params.w3_jobs, chunksize=1).get(
            deadline.remaining(0.01)
        )
        elapsed = time.perf_counter() - t0
        if any(codes):
            raise RuntimeError(f"Pool W3: {sum(1 for c in codes if c)} jobs exited non-zero")
        return {"w3_wall_s": elapsed}
    finally:
        _stop(pool)


def run(params: Params, step: Callable[[str], None], record: Callable[[str, Callable[[], dict]], None]) -> None:
    """All workloads on Pool; `record(name, fn)` runs one, keeping its figures or its error."""
    step(f"Pool: {params.workers} processes")
    pool = CTX.Pool(params.workers)
    try:
        record("W1", lambda: w1_throughput(pool, params))
        record("W2", lambda: w2_latency(pool, params))
    finally:
        _stop(pool)
    step(f"Pool: {params.workers * params.slots} processes for W3")
    record("W3", lambda: w3_parallel_sleep(params))
    record("M", lambda: {"m_rss_mb": None, "m_idle_rss_mb": None})
