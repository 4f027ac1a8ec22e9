"""A journal of 200,000 finished jobs (built through a real master and agent): reads cost what they return, and retention prunes."""

from __future__ import annotations

import json
import sqlite3
import time
from pathlib import Path
from typing import Callable

import pytest

from tests.cluster import Cluster, wait_until

BIG = 200_000
SAMPLES = 25


def p50(call: Callable[[], object]) -> float:
    """The median of SAMPLES calls, in seconds (the median: a loaded machine's outliers say nothing of a scan)."""
    times = []
    for _ in range(SAMPLES):
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    return sorted(times)[SAMPLES // 2]


def journal_counts(home: Path) -> dict[str, int]:
    """Jobs by state, read from the journal file itself."""
    with sqlite3.connect(home / "corral.db") as db:
        return dict(db.execute("SELECT state, COUNT(*) FROM jobs GROUP BY state"))


def reads(client) -> dict[str, float]:  # type: ignore[no-untyped-def]
    return {
        "status": p50(client.status),
        "jobs --limit 50": p50(lambda: client.jobs(limit=50)),
        "jobs --state failed": p50(lambda: client.jobs(["failed"], limit=50)),
        "jobs --state queued": p50(lambda: client.jobs(["queued"], limit=50)),
        "show (oldest)": p50(lambda: client.job(1)),
        "console snapshot": p50(lambda: client.snapshot(0, {"finished": {"offset": 500, "limit": 50},
                                                           "dispatched": {"offset": 0, "limit": 50}})),
    }


@pytest.mark.timeout(900)  # building 200,000 jobs takes ~15 s on an idle 2-core machine, minutes on a loaded one
def test_reads_with_200k_finished_jobs_cost_what_they_return(cluster: Cluster) -> None:
    cluster.start_agent("a", slots=2, verbose=False)
    with cluster.client() as client:
        # A few failures first: `--state failed` must find them among 200,000 without reading them all.
        failed = [client.submit_command("exit 3") for _ in range(5)]
        client.wait(failed, timeout=60)
        for _ in client.map("tests.jobs:inc", range(300)):
            pass
        small = reads(client)
        for start in range(0, BIG, 50_000):
            assert len(list(client.map("tests.jobs:inc", range(50_000)))) == 50_000
        big = reads(client)
        counts = client.status()["counts"]
    assert counts["done"] == BIG + 300 and counts["failed"] == 5
    assert journal_counts(cluster.home) == {"done": BIG + 300, "failed": 5}
    # Same run, same machine: each read with 200,000 more jobs stays within 3x of the small journal's
    # (a floor of 2 ms, under which a ratio measures the scheduler of a loaded machine, not the journal).
    slow = {name: f"{small[name] * 1000:.1f} ms -> {big[name] * 1000:.1f} ms" for name in big
            if big[name] > 3 * max(small[name], 0.002)}
    assert not slow, f"reads that grew with the journal: {slow}"


def test_paging_walks_every_job_once(cluster: Cluster) -> None:
    cluster.start_agent("a", slots=2, verbose=False)
    with cluster.client() as client:
        ids = client.submit([{"command": "true"} for _ in range(120)])
        client.wait(ids, timeout=60)
    seen: list[int] = []
    before: list[str] = []
    while True:
        result = cluster.corral("jobs", "--limit", "50", *before, "--json", check=True)
        page = [job["id"] for job in json.loads(result.stdout)]
        if not page:
            break
        seen += page
        before = ["--before", str(page[-1])]
    assert seen == sorted(ids, reverse=True)
    table = cluster.corral("jobs", "--limit", "50", "--before", "100")
    assert table.returncode == 0
    assert table.stderr.strip() == "older jobs: corral jobs --limit 50 --before 50"
    bad = cluster.corral("jobs", "--before", "x")
    assert bad.returncode == 2 and len(bad.stderr.strip().splitlines()) == 1


def test_retention_by_count_prunes_the_oldest_while_dispatch_goes_on(cluster: Cluster) -> None:
    cluster.start_agent("a", slots=2, verbose=False)
    with cluster.client() as client:
        assert len(list(client.map("tests.jobs:inc", range(20_000)))) == 20_000
    cluster.master.terminate()
    cluster.master.wait(timeout=30)
    cluster.start_master("--keep-finished-count", "1000")
    with cluster.client() as client:
        # Jobs keep flowing while the backlog is pruned (2,000 per transaction, a few per second).
        during = list(client.map("tests.jobs:inc", range(500)))
        assert during == list(range(1, 501))
        wait_until(lambda: client.status()["counts"]["done"] == 1000, timeout=60, what="retention to keep 1000")
        newest = client.jobs(limit=1)[0]["id"]
        with pytest.raises(Exception, match="no job 1"):
            client.job(1)
        assert client.job(newest)["state"] == "done"
    assert journal_counts(cluster.home) == {"done": 1000}
    with sqlite3.connect(cluster.home / "corral.db") as db:
        kept = [row[0] for row in db.execute("SELECT id FROM jobs ORDER BY id")]
        assert db.execute("SELECT COUNT(*) FROM attempts WHERE job_id < ?", (kept[0],)).fetchone()[0] == 0
    # The newest by end time are kept (two slots end jobs a little out of id order): the 500 run last, surely.
    assert len(kept) == 1000 and set(range(newest - 499, newest + 1)) <= set(kept)
    shown = cluster.corral("show", "1")
    assert shown.returncode != 0 and "no job 1" in shown.stderr and len(shown.stderr.strip().splitlines()) == 1


def test_retention_by_age_keeps_what_is_younger(cluster: Cluster) -> None:
    cluster.start_agent("a", slots=2, verbose=False)
    with cluster.client() as client:
        old = client.submit([{"command": "true"} for _ in range(300)])
        client.wait(old, timeout=60)
    time.sleep(7)
    cluster.master.terminate()
    cluster.master.wait(timeout=30)
    cluster.start_master("--keep-finished", str(6 / 86400))  # six seconds, in days
    with cluster.client() as client:
        young = client.submit([{"command": "true"} for _ in range(50)])
        client.wait(young, timeout=60)
        wait_until(lambda: client.status()["counts"]["done"] == 50, timeout=30, what="the old jobs pruned")
        assert [job["id"] for job in client.jobs(limit=100)] == sorted(young, reverse=True)
    bad = cluster.corral("master", "--keep-finished", "-1")
    assert bad.returncode == 2 and "positive number of days" in bad.stderr
