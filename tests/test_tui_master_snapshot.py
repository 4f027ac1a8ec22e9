"""Scheduler.snapshot through a real master: what changed since N, windows instead of everything, filters, counts."""

from __future__ import annotations

import pytest

from corral.agent.errors import CorralError
from tests.cluster import Cluster, wait_until

D = {"dispatched": {"offset": 0, "limit": 10}, "finished": {"offset": 0, "limit": 10}}


def test_nothing_changed_means_no_rows(cluster: Cluster) -> None:
    with cluster.client() as c:
        c.submit([{"command": "true"}])
        first = c.snapshot(0, D)
        assert first["dispatched"]["total"] == 1 and first["changed"] is None  # since=0: "everything"
        again = c.snapshot(first["seq"], D)
        assert "dispatched" not in again and "finished" not in again and again["changed"] == []
        assert again["counts"]["queued"] == 1  # counts and agents come every time
        ids = c.submit([{"command": "true"}, {"command": "true"}])
        later = c.snapshot(first["seq"], D)
        assert later["changed"] == ids and later["dispatched"]["total"] == 3


def test_dispatched_is_running_first_then_queue_order_and_windowed(cluster: Cluster) -> None:
    with cluster.client() as c:
        ids = c.submit([{"command": f"echo {i}", "priority": i % 3} for i in range(300)])
        snap = c.snapshot(0, {"dispatched": {"offset": 0, "limit": 50}})
        rows = snap["dispatched"]["rows"]
        assert snap["dispatched"]["total"] == 300 and len(rows) == 50
        order = [(-r[3], r[0]) for r in rows]
        assert order == sorted(order) and rows[0][3] == 2  # highest priority, then oldest
        deep = c.snapshot(0, {"dispatched": {"offset": 290, "limit": 50}})["dispatched"]
        assert [r[0] for r in deep["rows"]] == sorted(i for i in ids if i % 3 == 1)[-10:]  # priority 0, newest
    cluster.start_agent("alpha", slots=2)
    with cluster.client() as c:
        c.submit([{"command": "sleep 30", "priority": -5}, {"command": "sleep 30", "priority": -5}])
        # The agent drains the 300 quick ones, then holds the two sleeps: they come first, queued or not.
        snap = wait_until(lambda: (s := c.snapshot(0, D)) and s["counts"]["running"] == 2 and s["counts"]["queued"] == 0 and s,
                        timeout=60, what="the two sleeps to run")
        assert [r[2] for r in snap["dispatched"]["rows"]] == ["running", "running"]


def test_finished_newest_first_filtered_and_counted(cluster: Cluster) -> None:
    cluster.start_agent("alpha", slots=2)
    with cluster.client() as c:
        ids = c.submit([{"command": f"echo job-{i}"} for i in range(20)] + [{"command": "exit 3"}])
        c.wait(ids)
        snap = c.snapshot(0, {"finished": {"offset": 0, "limit": 5}})
        fin = snap["finished"]
        assert fin["total"] == 21 and len(fin["rows"]) == 5
        ended = [r[6] for r in fin["rows"]]
        assert ended == sorted(ended, reverse=True)
        assert snap["counts"]["done"] == 20 and snap["counts"]["failed"] == 1
        hits = c.snapshot(0, {"finished": {"offset": 0, "limit": 50, "match": "JOB-1"}})["finished"]
        assert sorted(r[1] for r in hits["rows"]) == sorted(["echo job-1"] + [f"echo job-1{i}" for i in range(10)])
        assert hits["total"] == 11
        misses = c.snapshot(0, {"finished": {"offset": 0, "limit": 50, "match": "job-", "invert": True}})["finished"]
        assert [r[1] for r in misses["rows"]] == ["exit 3"] and misses["rows"][0][2] == "failed"
        failed = c.snapshot(0, {"finished": {"offset": 0, "limit": 50, "match": "failed"}})["finished"]
        assert [r[4] for r in failed["rows"]] == [3]


def test_counts_follow_the_change_log_across_a_restart(cluster: Cluster) -> None:
    cluster.start_agent("alpha", slots=2)
    with cluster.client() as c:
        c.wait(c.submit([{"command": "true"}] * 7 + [{"command": "false"}] * 2))
        seq = c.snapshot(0, {})["seq"]
        c.cancel(c.submit([{"command": "true", "tags": ["nowhere"]}]))
        snap = c.snapshot(seq, {})
        assert {k: snap["counts"][k] for k in ("done", "failed", "cancelled", "queued")} == \
            {"done": 7, "failed": 2, "cancelled": 1, "queued": 0}
    cluster.master.terminate()
    cluster.master.wait(timeout=30)
    cluster.start_master()
    with cluster.client() as c:
        counts = c.snapshot(0, {})["counts"]
        assert (counts["done"], counts["failed"], counts["cancelled"]) == (7, 2, 1)  # from the journal


def test_bad_views_are_refused_with_a_clear_error(cluster: Cluster) -> None:
    with cluster.client() as c:
        with pytest.raises(CorralError, match="bad dispatched view"):
            c.snapshot(0, {"dispatched": {"offset": -1, "limit": 10}})
        with pytest.raises(CorralError, match="bad finished view"):
            c.snapshot(0, {"finished": {"offset": 0, "limit": "all"}})
        rows = c.snapshot(0, {"dispatched": {"offset": 0, "limit": 10**9}})["dispatched"]
        assert rows["total"] == 0  # a huge limit is capped, not obeyed
