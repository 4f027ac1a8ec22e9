"""What the console's panes see (counts, rates, windows of the dispatched and finished views, filtered), and show/jobs/status.

Cheap enough to ask a few times a second with 100,000 jobs about: under the scheduler's lock a view takes
only what it needs from memory; the rest (a sort, a filter, the journal's rows) runs after the lock is
released, so dispatch never waits on a console; and a window costs the window's rows, not the queue's.
"""

from __future__ import annotations

import bisect
import heapq
import json
import math
import time
from itertools import islice
from typing import TYPE_CHECKING, Any, Callable, Iterator, NamedTuple

from corral.agent.errors import CorralError, UnknownJob
from corral.agent.protocol import JobState

from .records import ASSIGNED, DONE, FINAL, ON_AGENT, QUEUED, RUNNING, Job
from .rows import DispatchedRow, FinishedRow, pack
from .validate import MAX_LIST, is_whole, limit_rule, shown

if TYPE_CHECKING:
    from .core import Core

WINDOW = 1000  # rows of one view in one snapshot
WALK = 5000  # deeper than this into the queue, a view is computed from a copy, outside the lock
ANCHOR_WALK = 20_000  # newest finished searched in memory for an anchor; deeper ones are found by the journal
CHANGED = 5000  # more changed ids than this since a console's last look: "many" (None)
RATE_SECONDS = 60
VIEW_NAMES = ("dispatched", "finished")


class Window(NamedTuple):
    """What a console asks of one view: rows from `offset`, at most `limit`, matching `needle`."""

    offset: int
    limit: int
    needle: str  # lower case; '' matches everything
    invert: bool  # show the rows that do not match
    # The job the console's cursor is on, and the row of the window it should be at: while it is in the
    # view, the window moves with it (offset = its place - at), so the cursor follows the job, not a row
    # number, however far the flow carried it since the last look.
    anchor: int | None = None
    at: int = 0


def dispatched_row(job: Job) -> DispatchedRow:
    return DispatchedRow(job.id, job.what, job.state, job.priority, job.agent, job.attempts, job.started,
                         job.submitted, ",".join(sorted(job.tags)))


def haystack(job: Job) -> str:
    """What a console filter matches in an active job: id, name, command, state, agent, tags (lower case)."""
    return "\x1f".join((str(job.id), job.name or "", job.command or "", job.func or "", job.state,
                        job.agent or "", ",".join(sorted(job.tags)))).lower()


def window(name: str, view: Any) -> Window:
    """A console's view request, checked, or a CorralError saying what is wrong."""
    if not isinstance(view, dict):
        raise CorralError(f"bad {name} view: {shown(view)}", "a dict of offset, limit, match, invert")
    offset, limit, match = view.get("offset", 0), view.get("limit", 100), view.get("match") or ""
    if (not is_whole(offset) or not 0 <= offset <= MAX_LIST or not is_whole(limit) or limit < 1
            or not isinstance(match, str)):
        raise CorralError(f"bad {name} view: offset {shown(offset)}, limit {shown(limit)}, match {shown(match)}",
                          "offset >= 0, limit >= 1, match a string")
    anchor, at = view.get("anchor"), view.get("at", 0)
    if anchor is not None and (not is_whole(anchor) or not is_whole(at) or not 0 <= at < limit):
        raise CorralError(f"bad {name} view: anchor {shown(anchor)}, at {shown(at)}",
                          "anchor a job id, at a row of the window (0 <= at < limit)")
    return Window(offset, min(limit, WINDOW), match.lower(), bool(view.get("invert")), anchor, min(at, WINDOW - 1))


class Views:
    """What clients look at, over one scheduler: the console's snapshot, and `show`, `jobs`, `status`.
    The methods in the "under the scheduler's lock" section run with it held; the callables they return
    run after it is released."""

    def __init__(self, scheduler: Core) -> None:
        self.scheduler = scheduler

    def snapshot(self, since: Any = 0, views: Any = None) -> dict[str, Any]:
        """What a console draws.

        Always: `seq`, the master's `now`, counts by state, agents, and finished jobs per second over
        the last minute. When something changed since `since` (the `seq` of the caller's last look):
        the ids that changed (`changed`, None when too many or too old to know), and the rows of each
        view in `views` ({"dispatched"|"finished": {"offset", "limit", "match", "invert"}}), a window
        of at most WINDOW rows with the view's `total`, so no caller ever holds every job.
        """
        if not isinstance(views, dict):
            views = {}
        asked = {name: window(name, views[name]) for name in VIEW_NAMES if name in views}
        s = self.scheduler
        now = time.time()
        with s.lock:
            seq = s.seq
            fresh = not is_whole(since) or since <= 0 or since != seq  # since 0: "I have nothing yet"
            changed = self._changed(since) if fresh else []
            counts = self._counts()
            agents = sorted((a.wire(now, s.clock()) for a in s.agents.values()), key=lambda a: a["name"])
            rate = self._rate(now)
            picked = {name: self._pick(name, view) for name, view in asked.items()} if fresh else {}
        out: dict[str, Any] = {
            "seq": seq, "now": now, "counts": counts, "agents": agents, "rate": rate,
            "slots": sum(a["slots"] for a in agents if a["state"] != "lost"),
            "busy": sum(a["busy"] for a in agents), "assigned": sum(a["assigned"] for a in agents),
            "changed": changed, "journal": s.journal.health.wire(),
        }
        # The expensive halves run here, outside the lock, so dispatch never waits on a console.
        for name, pick in picked.items():
            offset, total, rows = pick()
            out[name] = {"offset": offset, "total": total, "rows": pack(rows)}
        return out

    def job(self, job_id: Any) -> dict[str, Any]:
        """One job as `corral show` and the detail screen see it: every column, its attempts, and
        (running) the latest output its agent sent."""
        s = self.scheduler
        with s.lock:
            s.check_ids([job_id])
        row = s.journal.job(job_id)
        if row is None:
            raise UnknownJob(f"no job {job_id}")
        record = row._asdict()
        record["env"] = json.loads(row.env)
        record["tags"] = json.loads(row.tags)
        attempts = [a._asdict() for a in s.journal.attempts(job_id)]
        if row.state == DONE and not any(a["counted"] for a in attempts):
            # A clean first run has no attempts row of its own (see Scheduler._apply_results): the jobs row is it.
            attempts.append({
                "attempt": row.attempts, "agent": row.agent, "state": DONE, "started": row.started,
                "ended": row.ended, "exit_code": row.exit_code, "stdout": b"", "stderr": b"", "error": "",
                "traceback": "", "counted": 1, "note": "", "stdout_total": 0, "stderr_total": 0,
            })
        record["attempt_list"] = attempts
        with s.lock:
            live = s.jobs.get(job_id)
            if live is not None:  # the journal may lag a running job's in-memory state by nothing; be exact
                record["state"], record["agent"], record["attempts"] = live.state, live.agent, live.attempts
                if live.state == RUNNING and job_id in s.live_output:
                    record["live_stdout"], record["live_stderr"] = s.live_output[job_id]
        return record

    def list_jobs(self, states: Any = None, limit: Any = 1000, before: Any = None) -> list[dict[str, Any]]:
        """Jobs newest first, as `corral jobs` lists them; with `before`, only ids below it (the next page)."""
        if states is not None and (not isinstance(states, list) or not all(isinstance(x, str) for x in states)):
            raise CorralError(f"states must be a list of job states, not {shown(states)}")
        limit = limit_rule(limit)
        if before is not None and (not is_whole(before) or not 0 <= before < 2**63):
            raise CorralError(f"before must be a job id, not {shown(before)}")
        s = self.scheduler
        journal = s.journal
        if states and not set(states) & FINAL:
            # Only active states: every such job is in memory, so pick the ids there, not by a scan.
            with s.lock:
                ids = sorted((j.id for j in s.jobs.values()
                              if j.state in states and (before is None or j.id < before)), reverse=True)[:limit]
            rows = journal.summaries_by_ids(ids)
        else:
            rows = journal.summaries(states or None, limit, before)
        out = []
        for row in rows:
            record = row._asdict()
            record["tags"] = json.loads(row.tags)
            out.append(record)
        return out

    def status(self) -> dict[str, Any]:
        """`corral status`: counts by state, agents, slots, and the rate over the last 10 s."""
        s = self.scheduler
        now = time.time()
        with s.lock:
            agents = [a.wire(now, s.clock()) for a in s.agents.values()]
            # Finished in the last 10 s: a bisection (as _rate does), not a walk of up to 100,000 times.
            recent = len(s.finished_times) - bisect.bisect_right(s.finished_times, now - 10)
            counts = {state.value: 0 for state in JobState}
            counts.update(s.final_counts)
            for job in s.jobs.values():
                counts[job.state] = counts.get(job.state, 0) + 1
            seq = s.seq
        return {
            "counts": counts,
            "agents": agents,
            "slots": sum(a["slots"] for a in agents if a["state"] != "lost"),
            "busy": sum(a["busy"] for a in agents),  # slots running a job (not those only assigned one)
            "assigned": sum(a["assigned"] for a in agents),  # jobs agents hold and have not started
            "rate": recent / 10.0,
            "seq": seq,
            "uptime": now - s.started,
            "journal": s.journal.health.wire(),  # whether its writes go through (store.JournalHealth)
        }

    # ---- under the scheduler's lock ------------------------------------------------------------

    def _changed(self, since: Any) -> list[int] | None:
        """Job ids changed after `since`, newest change last; None when the window lost them or they are many."""
        s = self.scheduler
        changes = s.changes
        if not is_whole(since) or since <= 0 or since > s.seq or not changes or changes[0][0] > since + 1:
            return None  # nothing to compare with, a seq of an earlier master, or the log moved on
        ids: dict[int, None] = {}
        for seq, job_id in reversed(changes):
            if seq <= since:
                break
            ids[job_id] = None
            if len(ids) > CHANGED:
                return None
        return list(reversed(ids))

    def _counts(self) -> dict[str, int]:
        """Counts by state without a table scan: active ones from memory, final ones from the
        scheduler's tally (kept as jobs become final, and as retention prunes them)."""
        s = self.scheduler
        held = self._running()
        jobs = s.jobs
        started = sum(1 for j in held if (job := jobs.get(j)) is not None and job.state == RUNNING)
        counts = {state.value: 0 for state in JobState}
        counts.update((state, n) for state, n in s.final_counts.items() if n)
        counts[RUNNING] = started  # running: started; assigned: held by an agent, not started yet
        counts[ASSIGNED] = len(held) - started
        counts[QUEUED] = len(jobs) - len(held)
        return counts

    def _running(self) -> list[int]:
        """Ids of the jobs agents hold (assigned or running): those of the agents, except orphans a
        restarted master has not settled yet."""
        s = self.scheduler
        if s.orphans_since:
            return sorted(j.id for j in list(s.jobs.values()) if j.state in ON_AGENT)
        return sorted(j for a in s.agents.values() for j in a.running)

    def _rate(self, now: float) -> list[int]:
        """Jobs finished in each of the last RATE_SECONDS whole seconds, oldest first."""
        times = self.scheduler.finished_times
        end = math.floor(now)
        edges = [bisect.bisect_left(times, end - k) for k in range(RATE_SECONDS, -1, -1)]
        return [b - a for a, b in zip(edges, edges[1:])]

    def _pick(self, name: str, view: Window) -> Callable[[], tuple[int, int, list[Any]]]:
        """Take what a view needs from memory; return the rest of the work, (offset, total, rows), as a
        callable to run after the lock is released."""
        if name == "dispatched":
            return self._dispatched(view)
        s = self.scheduler
        ring = None
        anchored = False
        if view.anchor is not None and not view.needle and view.anchor in s.recent_final:
            # Its place among the newest finished (the ring is in the order they finished).
            for place, job_id in enumerate(islice(reversed(s.recent_final), ANCHOR_WALK)):
                if job_id == view.anchor:
                    view = view._replace(offset=max(0, place - view.at))
                    anchored = True
                    break
        look_up = view.anchor is not None and not anchored  # _finished asks the journal, outside the lock
        if not look_up and not view.needle and view.offset + view.limit <= len(s.recent_final):
            # The newest finished are the tail of recent_final, in the order they finished.
            ring = [job_id for job_id, _ in islice(reversed(s.recent_final.items()), view.offset + view.limit)]
            ring = ring[view.offset:]
        total = sum(s.final_counts.values())
        return lambda: self._finished(view, ring, total, look_up)

    def _dispatched(self, view: Window) -> Callable[[], tuple[int, int, list[Any]]]:
        s = self.scheduler
        running = self._running()
        jobs = s.jobs
        deep = False  # the anchor is deeper into the queue than a walk of the heaps goes: found in rest()
        if view.anchor is not None and not view.needle and view.anchor in jobs:
            place = self._dispatched_place(view.anchor, running)
            if place is None:
                deep = True
            else:
                view = view._replace(offset=max(0, place - view.at))
        offset, limit = view.offset, view.limit
        if not view.needle and not deep and offset + limit <= WALK:
            # Running first, then the queue in dispatch order (highest priority, then oldest): walk the
            # heaps lazily, so the cost is the window's, not the queue's.
            ids = running[offset : offset + limit]
            if len(ids) < limit:
                ids += self._queued(max(0, offset - len(running)), limit - len(ids))
            rows = [dispatched_row(jobs[j]) for j in ids if j in jobs]
            total = len(jobs)
            return lambda: (offset, total, rows)
        everyone = list(jobs.values())
        running_set = set(running)

        def rest() -> tuple[int, int, list[Any]]:
            # A copy of the job list, read outside the lock: a row may be a moment stale, never torn
            # enough to matter for a screen redrawn four times a second.
            needle, invert = view.needle, view.invert
            hits = [job for job in everyone if (needle in haystack(job)) != invert] if needle else everyone
            hits.sort(key=lambda job: (job.id not in running_set, -job.priority if job.id not in running_set else 0,
                                       job.id))
            start = offset
            if view.anchor is not None:
                place = next((i for i, job in enumerate(hits) if job.id == view.anchor), None)
                if place is not None:
                    start = max(0, place - view.at)
            return start, len(hits), [dispatched_row(job) for job in hits[start : start + limit]]

        return rest

    def _dispatched_place(self, job_id: int, running: list[int]) -> int | None:
        """Where an active job stands in the unfiltered Dispatched view (running by id, then the queue in
        dispatch order), if a walk of WALK queued jobs finds it; None: deeper (or held)."""
        if self.scheduler.jobs[job_id].state == RUNNING:
            place = bisect.bisect_left(running, job_id)
            if place < len(running) and running[place] == job_id:
                return place
            return None
        queued = self._queued(0, WALK)
        try:
            return len(running) + queued.index(job_id)
        except ValueError:
            return None

    def _queued(self, skip: int, count: int) -> list[int]:
        """`count` queued ids after the first `skip`, in dispatch order, without popping the heaps."""
        def walk(heap: list[tuple[int, int]]) -> Iterator[tuple[int, int]]:
            frontier = [(heap[0], 0)]
            while frontier:
                item, i = heapq.heappop(frontier)
                yield item
                for child in (2 * i + 1, 2 * i + 2):
                    if child < len(heap):
                        heapq.heappush(frontier, (heap[child], child))

        out: list[int] = []
        seen: set[int] = set()
        jobs = self.scheduler.jobs
        for _, job_id in heapq.merge(*(walk(h) for h in self.scheduler.queues.values() if h)):
            job = jobs.get(job_id)
            if job is None or job.state != QUEUED or job_id in seen:
                continue  # a stale heap entry (cancelled, or dispatched and queued again)
            seen.add(job_id)
            if skip:
                skip -= 1
                continue
            out.append(job_id)
            if len(out) >= count:
                break
        return out

    # ---- outside the lock ----------------------------------------------------------------------

    def _finished(self, view: Window, ring: list[int] | None, total: int,
                  look_up: bool = False) -> tuple[int, int, list[FinishedRow]]:
        """The finished window from the journal's reader connection (never under the scheduler lock)."""
        journal = self.scheduler.journal
        if ring is not None:
            return view.offset, total, journal.finished_by_ids(ring)
        if look_up:  # anchored to a job the ring did not place (filtered, or older): where is it now?
            assert view.anchor is not None
            place = journal.finished_position(view.anchor, view.needle, view.invert)
            if place is not None:  # else it is not in the view: the window stays where it was asked
                view = view._replace(offset=max(0, place - view.at))
        matched, rows = journal.finished_page(view.needle, view.invert, view.limit, view.offset, known_total=total)
        return view.offset, total if matched is None else matched, rows
