"""The console's views in-process (master/views.py): windows of the dispatched and finished views, their order,
filters and totals, incremental counts and changes, and the properties that keep them cheap — the expensive
half runs outside the scheduler's lock, and a window costs its rows, not the queue's."""

from __future__ import annotations

from typing import Any

import pytest

from corral.agent.errors import CorralError
from corral.agent.protocol import JobSpec
from corral.console.master import views as views_module
from corral.console.master.rows import DispatchedRow, FinishedRow
from corral.console.master.scheduler import Scheduler

from .agentcalls import register, result, start, take
from .conftest import Master


def cmd(command: str = "true", **options: Any) -> dict[str, Any]:
    return JobSpec(command=command, **options).to_wire()


def window(s: Scheduler, view: str, since: int = 0, **asked: Any) -> dict[str, Any]:
    part = s.snapshot(since, {view: {"offset": 0, "limit": 100, **asked}})[view]
    assert all(type(row) is tuple for row in part["rows"])  # plain tuples on the wire
    return dict(part)


def dispatched(s: Scheduler, **asked: Any) -> tuple[int, list[DispatchedRow]]:
    part = window(s, "dispatched", **asked)
    return part["total"], [DispatchedRow._make(row) for row in part["rows"]]


def finished(s: Scheduler, **asked: Any) -> tuple[int, list[FinishedRow]]:
    part = window(s, "finished", **asked)
    return part["total"], [FinishedRow._make(row) for row in part["rows"]]


def run_all(s: Scheduler, outcome: dict[int, tuple[str, int | None]] | None = None, ended: float = 1000.0) -> None:
    """An agent runs everything queued; `outcome` says how some jobs end (state, exit code); they end a
    second apart from `ended` on."""
    session = register(s, "runner", slots=1000)
    tasks = take(s, session, 100_000)
    rows = []
    for task in tasks:
        state, code = (outcome or {}).get(task.job_id, ("done", 0))
        ended += 1
        rows.append(result(task, state, code, started=ended - 0.5, ended=ended, error="" if state == "done" else state))
    s.report(session, rows, [], 0)


# ---- the dispatched view ---------------------------------------------------------------------

def test_dispatched_shows_running_first_then_the_queue_in_dispatch_order(scheduler: Scheduler) -> None:
    ids = scheduler.submit([cmd("a"), cmd("b", priority=5), cmd("c", name="named", tags=["z", "gpu"]),
                            cmd("d", priority=5), {"func": "m:f"}])
    session = register(scheduler, "alpha", slots=1, tags=("gpu", "z"))
    (task,) = take(scheduler, session, 1)
    start(scheduler, session, [task])  # the agent started it (until then it is assigned)
    total, rows = dispatched(scheduler)
    assert total == 5 and rows[0].id == task.job_id == ids[1] and rows[0].state == "running"
    assert [r.id for r in rows] == [ids[1], ids[3], ids[0], ids[2], ids[4]]
    named = next(r for r in rows if r.id == ids[2])
    assert (named.what, named.tags, named.agent, named.attempt) == ("named", "gpu,z", None, 0)
    assert next(r for r in rows if r.id == ids[4]).what == "m:f()"
    assert (rows[0].agent, rows[0].attempt) == ("alpha", 1) and rows[0].started is not None


def test_dispatched_windows_and_their_totals(scheduler: Scheduler) -> None:
    ids = scheduler.submit([cmd(f"job {i}", priority=i % 3) for i in range(300)])
    order = sorted(ids, key=lambda j: (-((j - 1) % 3), j))
    part = window(scheduler, "dispatched", offset=290, limit=50)
    assert part["total"] == 300 and part["offset"] == 290 and [r[0] for r in part["rows"]] == order[290:]
    part = window(scheduler, "dispatched", offset=100, limit=10**9)
    assert len(part["rows"]) == 200  # a huge limit is capped, not obeyed (WINDOW rows at most)


def test_deep_windows_filters_and_shallow_windows_agree(scheduler: Scheduler) -> None:
    count = views_module.WALK + 500  # deeper than the lazy walk: the view is made from a copy
    ids = scheduler.submit([cmd(f"job {i}", priority=i % 4, tags=["gpu"] if i % 7 == 0 else []) for i in range(count)])
    order = sorted(ids, key=lambda j: (-((j - 1) % 4), j))
    deep = window(scheduler, "dispatched", offset=count - 100, limit=100)
    assert [r[0] for r in deep["rows"]] == order[-100:] and deep["total"] == count
    shallow = window(scheduler, "dispatched", offset=0, limit=20)
    assert [r[0] for r in shallow["rows"]] == order[:20]
    total, hits = dispatched(scheduler, match="GPU")  # the filter is case-blind, and sees tags
    gpu = [j for j in order if (j - 1) % 7 == 0]
    assert total == len(gpu) and [r.id for r in hits] == gpu[:100]
    total, misses = dispatched(scheduler, match="gpu", invert=True)
    assert total == count - len(gpu) and all("gpu" not in r.tags for r in misses)


def test_a_window_costs_its_rows_not_the_queue(scheduler: Scheduler, monkeypatch: pytest.MonkeyPatch) -> None:
    scheduler.submit([cmd()] * 4000)
    made: list[int] = []
    real = views_module.dispatched_row
    monkeypatch.setattr(views_module, "dispatched_row", lambda job: made.append(job.id) or real(job))
    monkeypatch.setattr(views_module, "haystack", lambda job: pytest.fail("no filter, no haystack"))  # type: ignore
    part = window(scheduler, "dispatched", offset=1000, limit=50)
    assert len(made) == 50 and made == [r[0] for r in part["rows"]] == list(range(1001, 1051))


def test_the_expensive_halves_run_outside_the_lock(master: Master, monkeypatch: pytest.MonkeyPatch) -> None:
    s = master.scheduler
    s.submit([cmd(f"job {i}") for i in range(views_module.WALK + 10)])
    run_all(s)
    s.submit([cmd("waiting")] * (views_module.WALK + 10))
    held: list[bool] = []
    real_haystack, real_page = views_module.haystack, s.journal.finished_page

    def haystack(job: Any) -> str:
        held.append(s.lock.locked())
        return real_haystack(job)

    def page(*args: Any, **kwargs: Any) -> Any:
        held.append(s.lock.locked())
        return real_page(*args, **kwargs)

    monkeypatch.setattr(views_module, "haystack", haystack)
    monkeypatch.setattr(s.journal, "finished_page", page)
    s.snapshot(0, {"dispatched": {"offset": 0, "limit": 10, "match": "wait"},
                   "finished": {"offset": 0, "limit": 10, "match": "job"}})
    assert held and not any(held)


# ---- the finished view ----------------------------------------------------------------------

def test_finished_newest_first_from_memory_and_from_the_journal(master: Master) -> None:
    s = master.scheduler
    ids = s.submit([cmd(f"echo job-{i}") for i in range(30)] + [cmd("exit 3", name="three")])
    run_all(s, {ids[-1]: ("failed", 3)})
    total, rows = finished(s, limit=5)
    assert total == 31 and [r.id for r in rows] == ids[::-1][:5]
    assert (rows[0].what, rows[0].state, rows[0].exit_code, rows[0].error, rows[0].agent) == (
        "three", "failed", 3, "failed", "runner")
    assert rows[1].error == "" and rows[1].ended is not None and rows[1].started is not None
    s = master.restart()  # nothing in memory: the same window from the journal
    total, again = finished(s, limit=5)
    assert total == 31 and again == rows


def test_finished_filters_match_what_the_operator_sees(scheduler: Scheduler) -> None:
    ids = scheduler.submit([cmd(f"echo job-{i}") for i in range(20)] + [cmd("exit 3")])
    run_all(scheduler, {ids[-1]: ("failed", 3)})
    total, hits = finished(scheduler, match="JOB-1")
    assert total == 11 and sorted(r.what for r in hits) == sorted(["echo job-1"] + [f"echo job-1{i}" for i in range(10)])
    total, misses = finished(scheduler, match="job-", invert=True)
    assert total == 1 and [(r.what, r.state) for r in misses] == [("exit 3", "failed")]
    total, failed = finished(scheduler, match="failed")
    assert [r.exit_code for r in failed] == [3]
    total, none = finished(scheduler, match="100%_")  # LIKE's wildcards are matched as themselves
    assert total == 0 and none == []


# ---- counts, changes, the rest of a snapshot ------------------------------------------------------

def test_counts_are_kept_up_to_date_without_a_scan(master: Master) -> None:
    s = master.scheduler
    ids = s.submit([cmd()] * 10)
    first = s.snapshot(0, {})
    assert (first["counts"]["queued"], first["counts"]["done"]) == (10, 0)
    s.cancel(ids[:2])
    run_all(s, {ids[2]: ("failed", 1)})
    counts = s.snapshot(first["seq"], {})["counts"]
    assert {k: counts[k] for k in ("queued", "running", "done", "failed", "cancelled")} == {
        "queued": 0, "running": 0, "done": 7, "failed": 1, "cancelled": 2}
    assert counts == s.views.status()["counts"]  # the tally agrees with a GROUP BY
    s = master.restart()
    assert s.snapshot(0, {})["counts"]["done"] == 7  # from the journal


def test_changed_ids_since_a_look(scheduler: Scheduler) -> None:
    a, b = scheduler.submit([cmd(), cmd()])
    look = scheduler.snapshot(0, {"dispatched": {"offset": 0, "limit": 10}})
    assert look["changed"] is None and "dispatched" in look  # since 0: "I have nothing yet"
    same = scheduler.snapshot(look["seq"], {"dispatched": {"offset": 0, "limit": 10}})
    assert same["changed"] == [] and "dispatched" not in same  # nothing changed: no rows sent
    scheduler.cancel([b])
    later = scheduler.snapshot(look["seq"], {})
    assert later["changed"] == [b]
    (c,) = scheduler.submit([cmd()])
    assert scheduler.snapshot(look["seq"], {})["changed"] == [b, c]
    scheduler.submit([cmd()] * (views_module.CHANGED + 1))
    assert scheduler.snapshot(look["seq"], {})["changed"] is None  # too many to list: "many"
    assert scheduler.snapshot(10**9, {})["changed"] is None  # a seq of an earlier master


def test_agents_rate_and_slots(scheduler: Scheduler) -> None:
    register(scheduler, "zeta", slots=2)
    register(scheduler, "alpha", slots=3)
    scheduler.submit([cmd()] * 4)
    run_all(scheduler)
    snap = scheduler.snapshot(0, {})
    assert [a["name"] for a in snap["agents"]] == ["alpha", "runner", "zeta"]
    assert snap["slots"] == 1005 and snap["busy"] == 0
    assert len(snap["rate"]) == views_module.RATE_SECONDS and sum(snap["rate"]) <= 4


def test_bad_views_are_refused_in_one_line(scheduler: Scheduler) -> None:
    for views, needle in [({"dispatched": {"offset": -1, "limit": 10}}, "bad dispatched view: offset -1"),
                          ({"finished": {"offset": 0, "limit": "all"}}, "bad finished view: offset 0, limit 'all'"),
                          ({"finished": "x" * 10**6}, "bad finished view: 'xxx"),
                          ({"dispatched": {"match": 5}}, "bad dispatched view")]:
        with pytest.raises(CorralError, match=needle) as caught:
            scheduler.snapshot(0, views)
        assert len(str(caught.value)) < 300
    assert scheduler.snapshot(0, "not a dict")["counts"]["queued"] == 0  # no views asked: still a snapshot


# ---- show, jobs, status -----------------------------------------------------------------------------

def test_job_record_and_listing(scheduler: Scheduler) -> None:
    (job_id,) = scheduler.submit([cmd("echo hi", name="greet", tags=["t"], env={"A": "1"})])
    session = register(scheduler, tags=("t",))
    (task,) = take(scheduler, session)
    start(scheduler, session, [task])
    scheduler.report(session, [], [], 0, {job_id: (b"half way\n", b"")})
    live = scheduler.job(job_id)
    assert (live["state"], live["agent"], live["live_stdout"]) == ("running", "alpha", b"half way\n")
    scheduler.report(session, [result(task)], [], 0)
    record = scheduler.job(job_id)
    assert (record["name"], record["env"], record["tags"], record["state"], record["exit_code"]) == (
        "greet", {"A": "1"}, ["t"], "done", 0)
    # A clean first run has no attempts row of its own: the record still shows one attempt.
    assert [(a["attempt"], a["agent"], a["state"], a["counted"]) for a in record["attempt_list"]] == [
        (1, "alpha", "done", 1)]
    (listed,) = scheduler.list_jobs(["done"], 10)
    assert (listed["id"], listed["tags"], listed["state"]) == (job_id, ["t"], "done")
    assert scheduler.list_jobs(["queued"], 10) == []
    with pytest.raises(CorralError, match="states must be a list of job states"):
        scheduler.list_jobs("done", 10)
    status = scheduler.status()
    assert status["counts"]["done"] == 1 and status["slots"] == 4 and status["agents"][0]["name"] == "alpha"


# ---- anchored windows: the console's cursor follows its job ----------------------------------------

def test_a_dispatched_window_anchored_to_a_job_moves_with_it(scheduler: Scheduler) -> None:
    """However far the job moved since the console's last look, it comes back at row `at` of the window."""
    ids = scheduler.submit([cmd(f"job {i}") for i in range(300)])
    part = window(scheduler, "dispatched", offset=150, limit=40, anchor=ids[200], at=10)
    assert part["offset"] == 190 and part["rows"][10][0] == ids[200]
    session = register(scheduler, "alpha", slots=150)
    tasks = take(scheduler, session, 150)  # the first 150 run: they come first, by id
    running = [t.job_id for t in tasks]
    part = window(scheduler, "dispatched", offset=190, limit=40, anchor=ids[200], at=10)
    assert part["offset"] == 190 and part["rows"][10][0] == ids[200]  # running ones first: still place 200
    s = scheduler
    s.report(session, [result(task, "done", 0) for task in tasks[:120]], [(t.job_id, t.attempt) for t in tasks[120:]], 0)
    part = window(s, "dispatched", offset=190, limit=40, anchor=ids[200], at=10)
    assert part["offset"] == 70 and part["rows"][10][0] == ids[200]  # 120 ahead of it finished
    part = window(s, "dispatched", offset=0, limit=40, anchor=running[125], at=3)  # a running one
    assert part["rows"][3][0] == running[125]
    part = window(s, "dispatched", offset=0, limit=40, anchor=ids[210], at=5, match="job")  # filtered: the copy
    assert part["rows"][5][0] == ids[210]
    part = window(s, "dispatched", offset=40, limit=40, anchor=ids[0], at=5)  # no longer in the view
    assert part["offset"] == 40 and ids[0] not in [r[0] for r in part["rows"]]


def test_a_deep_anchor_is_found_outside_the_lock(scheduler: Scheduler) -> None:
    count = views_module.WALK + 300
    ids = scheduler.submit([cmd(f"job {i}", priority=i % 3) for i in range(count)])
    order = sorted(ids, key=lambda j: (-((j - 1) % 3), j))
    deep = order[views_module.WALK + 100]
    part = window(scheduler, "dispatched", offset=0, limit=50, anchor=deep, at=20)
    assert part["offset"] == views_module.WALK + 80 and part["rows"][20][0] == deep


def test_a_finished_window_anchored_to_a_job_moves_with_it(master: Master) -> None:
    s = master.scheduler
    first = s.submit([cmd(f"echo a-{i}") for i in range(50)])
    run_all(s)
    part = window(s, "finished", offset=0, limit=20, anchor=first[30], at=5)  # newest first: place 19
    assert part["offset"] == 14 and part["rows"][5][0] == first[30]
    s.submit([cmd(f"echo b-{i}") for i in range(500)])  # 500 newer finished push it down by 500
    run_all(s, ended=2000.0)
    part = window(s, "finished", offset=14, limit=20, anchor=first[30], at=5)
    assert part["offset"] == 514 and part["rows"][5][0] == first[30]
    part = window(s, "finished", offset=0, limit=20, anchor=first[30], at=2, match="a-")  # filtered: the journal
    assert part["offset"] == 17 and part["rows"][2][0] == first[30]
    s = master.restart()  # not in memory: the journal places it
    part = window(s, "finished", offset=0, limit=20, anchor=first[30], at=5)
    assert part["offset"] == 514 and part["rows"][5][0] == first[30]
    part = window(s, "finished", offset=7, limit=20, anchor=10**6, at=5)  # no such job: as asked
    assert part["offset"] == 7


def test_bad_anchors_are_refused_in_one_line(scheduler: Scheduler) -> None:
    for asked, needle in [({"anchor": "x"}, "anchor 'x', at 0"), ({"anchor": 1, "at": 100}, "anchor 1, at 100"),
                          ({"anchor": 1, "at": -1}, "anchor 1, at -1")]:
        with pytest.raises(CorralError, match=needle):
            scheduler.snapshot(0, {"finished": {"offset": 0, "limit": 100, **asked}})
