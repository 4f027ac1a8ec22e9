"""The agents' side of the scheduler: registering, taking work, reporting, reconciling what they hold, leases."""

from __future__ import annotations

import heapq
import time
import uuid
from typing import Any

from corral.agent.errors import CorralError, JournalFailed, NameTaken, ProtocolMismatch
from corral.agent.protocol import OUTPUT_TAIL_BYTES, PROTOCOL_VERSION, PROTOCOLS_SERVED

from .core import HOUSEKEEPING_SECONDS, LATE_FRACTION, SHARE_REFRESH_SECONDS, times_text, log
from .records import ASSIGNED, INTERRUPTED, LOST, ON_AGENT, RUNNING, AgentRecord, AgentState, Job, TaskTuple
from .reports import Start, check_attempts, check_count, check_results, check_starts
from .results import Results, unfinished_row
from .store import Journal
from .validate import shown


class Sessions(Results):
    """What agents call (register, take, report), and what judges them (leases, housekeeping)."""

    def register(self, info: Any, running: Any) -> dict[str, Any]:
        """An agent (re)joins; it says which (job id, attempt) pairs it still holds (running, or finished
        and not yet reported). The new session holds those of them this master gave that agent; every
        other attempt the master thought it ran goes back to the queue."""
        if not isinstance(info, dict) or not isinstance(info.get("name"), str) or not info["name"]:
            raise CorralError("register() needs the agent's info with a name")
        if info.get("protocol") not in PROTOCOLS_SERVED:
            raise ProtocolMismatch(f"agent speaks protocol {shown(info.get('protocol'))}, master {PROTOCOL_VERSION}"
                                   f" (it serves {', '.join(map(str, sorted(PROTOCOLS_SERVED)))})",
                                   "deploy the agent that matches this master")
        claimed = check_attempts(running, "register()")
        now = time.time()
        name = info["name"]
        with self.lock:
            old = self.agents.get(name)
            heard = self.clock()
            if (old is not None and not old.state.gone and heard - old.heard < self.lease_seconds
                    and old.info.get("instance") != info.get("instance")):
                raise NameTaken(f"an agent named {shown(name)} is already connected (pid {shown(old.info.get('pid'))}"
                                f" on {str(old.info.get('host') or '?')[:100]})", "give this one another --name")
            agent = AgentRecord(name, uuid.uuid4().hex, info, now, heard)
            # Every attempt this master believes runs on `name`: its last session's, or, for a master that
            # has restarted and knows them only from the journal, each running job's current attempt.
            ours = AgentRecord(name, "", {}, now)
            if old is not None:
                ours.running = dict(old.running)
            else:
                ours.running = {j.id: j.attempts for j in self.jobs.values() if j.state in ON_AGENT and j.agent == name}
            kept = {job_id for job_id, attempt in ours.running.items() if (job_id, attempt) in claimed}
            same = old is not None and old.info.get("instance") == info.get("instance")
            # The same agent process never received them (a reply lost with its connection): they count
            # nothing against the job. Another process under that name means the agent died with them.
            # First, as it writes: on JournalFailed the old session stands and the agent registers again later.
            self._requeue_lost(ours, keep=kept, reason=f"agent {name} came back without it", counts=not same)
            agent.running = ours.running  # what _requeue_lost left: the attempts the agent still holds
            agent.began = {j for j in agent.running if (job := self.jobs.get(j)) is not None and job.state == RUNNING}
            if old is not None:
                self.sessions.pop(old.session, None)  # superseded: a take parked for it returns nothing
                self.work.notify_all()
                agent.done, agent.failed, agent.times_lost = old.done, old.failed, old.times_lost
                agent.stale = old.stale & claimed  # still held there: may yet hand in a late success
            self.agents[name] = agent
            agent.on_heard = self._watch_lease
            self._watch_lease(agent)
            self.sessions[agent.session] = agent
        log.info("agent %s up: %d slots, tags %s", name, agent.slots, ",".join(sorted(agent.tags)) or "-")
        return {"session": agent.session, "lease": self.lease_seconds}

    def _fair_share(self, agent: AgentRecord) -> int:
        """How many jobs this agent may hold while a burst of short ones is queued: its slots' part of all
        the work on hand, queued or held by agents (ceil(active jobs × its slots / the slots of all agents
        up)), never less than one per slot.

        An agent asks for ~100 ms of work (agent/pacing.py): thousands of tiny jobs. Served as asked,
        the first few agents to take would hold a whole burst while the rest of a crowd stays idle;
        capped at a share, every free slot gets its part. The agents' slots are counted again at most
        every SHARE_REFRESH_SECONDS (O(agents), not per call)."""
        now = time.monotonic()
        if now - self._slots_counted > SHARE_REFRESH_SECONDS:
            self._slots_up = sum(a.slots for a in self.agents.values() if a.state is AgentState.UP)
            self._slots_counted = now
        on_hand = len(self.jobs)  # queued, running and held: O(1), and steady while a burst is handed out
        return max(agent.slots, -(-on_hand * agent.slots // max(1, self._slots_up)))

    def _serve_credit(self, agent: AgentRecord) -> tuple[list[TaskTuple], list[tuple[int, int]]]:
        """New work for the agent's credit (within its fair share of a burst), and its cancels.
        JournalFailed when the dispatch cannot be journaled: its jobs are queued still, its credit and
        cancels kept for the next call. Only an agent that is up, on its current session, gets work: not
        one draining, nor one lost (a take parked for it proves nothing), nor a superseded session."""
        limit = agent.credit
        if limit > agent.slots and self.queues:  # more than a job per slot: short jobs, maybe a burst
            limit = min(limit, self._fair_share(agent) - len(agent.running))
        serve = limit > 0 and agent.state is AgentState.UP and self.sessions.get(agent.session) is agent
        jobs = self._pop(agent, limit) if serve else []
        tasks = self._dispatch(agent, jobs) if jobs else []
        agent.credit -= len(jobs)
        return tasks, self._cancels(agent)

    @staticmethod
    def _cancels(agent: AgentRecord) -> list[tuple[int, int]]:
        """The attempts the agent is to kill, (job id, attempt) pairs, handed over once."""
        cancel = sorted(agent.cancel)
        agent.cancel.clear()
        return cancel

    def take(self, session: str, want: int, wait: float = 1.0) -> tuple[list[TaskTuple], list[tuple[int, int]]]:
        """Long poll for work: up to `want` tasks and any attempts to cancel, waiting up to `wait` seconds.

        `want` is the agent's credit; a report() meanwhile may raise it, and the parked take then
        serves the new credit as soon as work arrives (no waiting out the poll). A take parked for a
        session that a new registration has replaced returns nothing: that connection may be dead."""
        deadline = time.monotonic() + min(max(float(wait), 0.0), 5.0)
        with self.lock:
            agent = self._agent(session)
            agent.credit = max(0, int(want))
            while True:
                if self.sessions.get(session) is not agent:
                    return [], []  # replaced by a new registration: this connection may be dead
                try:
                    tasks, cancel = self._serve_credit(agent)
                except JournalFailed:
                    cancel = self._cancels(agent)  # kills need no write: they go out all the same
                    if not cancel:
                        raise
                    return [], cancel
                if tasks or cancel:
                    return tasks, cancel
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return [], []
                self.work.wait(remaining)

    def report(self, session: str, results: Any, running: Any, want: int = 0,
               live: Any = None, received: Any = None, began: Any = None
               ) -> tuple[list[TaskTuple], list[tuple[int, int]]]:
        """Results in, new work out, in one round trip; also the heartbeat. Returns (tasks, attempts to cancel).
        `running` is every (job id, attempt) the agent holds; `received`, how many tasks it has had this
        session: once it has had all the master sent, an attempt the master thinks it runs and it does not
        hold goes back to the queue, a new attempt that counts nothing against the job (reconciliation).
        `live` maps running job ids to their latest (stdout, stderr) tails, for the console to follow;
        `began` lists (job id, attempt, when) for each held attempt that has started: assigned until then."""
        # All of a report is checked, before any of it changes anything, and before the lock: a
        # malformed one costs dispatch nothing.
        checked = check_results(results) if results else []
        held = check_attempts(running)
        count = check_count(received)
        starts = check_starts(began) if began else []
        with self.lock:
            agent = self._agent(session)
            if starts:
                self._take_starts(agent, starts)
            if live:
                self._take_live_output(agent, live)
            if checked:
                if self.live_output:  # ended jobs' live tails go (rarely any)
                    for result in checked:
                        self.live_output.pop(result.job_id, None)
                self._apply_results(agent, checked)  # JournalFailed: none applied, the agent sends them again
                # Only a report that freed slots renews the credit: a bare heartbeat must not grant
                # a second credit for the slot a parked take() is already serving (priority order).
                agent.credit = max(0, int(want))
            if count is not None and count == agent.dispatched and self.sessions.get(session) is agent:
                try:
                    self._reconcile(agent, held)
                except JournalFailed:
                    pass  # nothing changed: the next heartbeat reconciles again
            try:
                return self._serve_credit(agent)
            except JournalFailed:
                # Its results are journaled, so this reply must go out: the new work waits for the journal.
                return [], self._cancels(agent)

    def _reconcile(self, agent: AgentRecord, held: set[tuple[int, int]]) -> None:
        """The agent has had every task sent to it and holds `held`: what the master thinks it runs beyond
        that goes back to the queue, counting nothing against the job (lock held)."""
        if agent.stale:
            agent.stale &= held  # superseded attempts it no longer holds will never report
        missing = [job_id for job_id, attempt in agent.running.items() if (job_id, attempt) not in held]
        if missing:
            gone = AgentRecord(agent.name, "", {}, 0.0)
            gone.running = {job_id: agent.running[job_id] for job_id in missing}
            # Journaled first: on JournalFailed nothing changed, and the next heartbeat tries again.
            self._requeue_lost(gone, keep=set(), reason=f"agent {agent.name} did not have it", counts=False)
            for job_id in missing:
                log.warning("agent %s does not hold job %d attempt %d: re-queued", agent.name, job_id,
                            agent.running.pop(job_id))

    def _take_starts(self, agent: AgentRecord, starts: list[Start]) -> None:
        """Jobs this agent has started: running from when it says (journaled first). Each report names
        every start, so one not journaled now (JournalFailed) is taken from the next report."""
        jobs = self.jobs
        fresh = [s for s in starts if (job := jobs.get(s.job_id)) is not None and job.state == ASSIGNED
                 and job.attempts == s.attempt and job.agent == agent.name]
        if not fresh:
            return
        try:
            self.journal.write([(Journal.START, [(s.when, s.job_id) for s in fresh])])
        except JournalFailed:
            return
        for s in fresh:
            job = jobs[s.job_id]
            job.state, job.started = RUNNING, s.when
            agent.began.add(s.job_id)
            self._changed(s.job_id)

    def _take_live_output(self, agent: AgentRecord, live: Any) -> None:
        """Keep (in memory only) the output tails (bytes) of jobs running on this agent; drop the malformed."""
        if type(live) is not dict:
            raise CorralError("malformed report: live output must map job ids to (stdout, stderr)")
        limit = OUTPUT_TAIL_BYTES
        for job_id, tails in live.items():
            job = self.jobs.get(job_id) if type(job_id) is int else None
            if (job is None or job.state not in ON_AGENT or job.agent != agent.name or type(tails) not in (tuple, list)
                    or len(tails) != 2 or not all(type(t) is bytes and len(t) <= limit for t in tails)):
                continue
            self.live_output[job_id] = (tails[0], tails[1])
            self._changed(job_id)  # the console reloads a job detail it shows when its job changed
        if len(self.live_output) > 10_000:  # jobs that left RUNNING by a path that did not clear theirs
            for stale in [j for j in self.live_output if (self.jobs.get(j) is None or self.jobs[j].state not in ON_AGENT)]:
                del self.live_output[stale]

    def _requeue_lost(self, agent: AgentRecord, keep: set[int], reason: str, how: str = LOST,
                      counts: bool = True) -> None:
        """Attempts an agent held and no longer runs go back to the queue (or end `lost` past max_lost).
        Each such attempt stays in the job's history, `how` it ended (lost, or interrupted when the
        agent was stopped on purpose), with `reason`. Journaled first: on JournalFailed nothing changed,
        and the caller tries again later. `counts`: the agent was lost with them (the job's lost count
        rises); else the job is not to blame. Each attempt taken away stays in the agent's stale set: if it
        still runs there, its result may yet be handed in (a late success wins)."""
        requeue_rows: list[tuple[Any, ...]] = []
        finish_rows: list[tuple[Any, ...]] = []
        history: list[tuple[Any, ...]] = []
        moves: list[tuple[Job, bool]] = []  # (job, whether it ends lost)
        now = time.time()
        for job_id in sorted(set(agent.running) - keep):
            attempt = agent.running[job_id]
            job = self.jobs.get(job_id)
            if job is None or job.state not in ON_AGENT or job.agent != agent.name or job.attempts != attempt:
                continue
            lost = job.lost + 1 if counts else job.lost
            final = lost > self.max_lost
            # The attempt that makes the job final is the one its outcome comes from: counted.
            history.append(unfinished_row(job_id, job.attempts, agent.name, how, job.started, now, reason,
                                           int(final)))
            if final:
                finish_rows.append((lost, now, f"its agent was lost {times_text(lost)} ({reason})", job_id))
            else:
                requeue_rows.append((job.attempts, job.failures, lost, job_id))
            moves.append((job, final))
        if moves:
            self.journal.write([(Journal.ATTEMPT, history), (Journal.REQUEUE, requeue_rows),
                                (Journal.LOST, finish_rows)])
        for job, ends in moves:
            agent.stale.add((job.id, job.attempts))
            if counts:
                job.lost += 1
            self._changed(job.id)
            if ends:
                del self.jobs[job.id]
                self._final(job.id, LOST)
                log.info("lost %d: its agent was lost %s", job.id, times_text(job.lost))
            else:
                self._requeued(job)
                log.info("requeued %d: %s", job.id, reason)
        agent.running = {job_id: attempt for job_id, attempt in agent.running.items() if job_id in keep}
        if moves:
            self.work.notify_all()
            self.finished.notify_all()

    def drain_agent(self, name: str) -> bool:
        """Give this agent no more work (it is being drained over SSH); False if no such agent is up."""
        with self.lock:
            agent = self.agents.get(name)
            if agent is None or agent.state.gone:
                return False
            agent.state = AgentState.DRAINING
        log.info("agent %s draining", name)
        return True

    def retire_agent(self, name: str, reason: str) -> None:
        """The agent was stopped on purpose: what it still held goes back to the queue now, not after a lease."""
        with self.lock:
            agent = self.agents.get(name)
            if agent is None:
                return
            # JournalFailed: nothing changed, and its lease expiry tries again
            self._requeue_lost(agent, keep=set(), reason=reason, how=INTERRUPTED)
            self.sessions.pop(agent.session, None)
            agent.state = AgentState.STOPPED
        log.info("agent %s stopped: %s", name, reason)

    def housekeeping(self) -> None:
        """The master's own tick (server.py calls it every HOUSEKEEPING_SECONDS): leases, then expiry.

        If this tick comes late (the master was stopped or starved: the gap since the last one exceeds
        its period by more than LATE_FRACTION of a lease), the master heard nobody meanwhile through no
        fault of theirs: every lease is extended by the gap before anyone is judged. The gap is measured
        on the monotonic clock, so a step of the wall clock changes nothing."""
        with self.lock:
            now = self.clock()
            late = now - self.last_tick - HOUSEKEEPING_SECONDS
            self.last_tick = now
            if late > self.lease_seconds * LATE_FRACTION:
                for agent in self.agents.values():
                    agent.heard += late
                if self.orphans_since:
                    self.orphans_since += late
                log.warning("the master's housekeeping was %.1fs late (stopped or starved): every lease extended"
                            " by that much", late)
        self.expire_leases()

    def expire_leases(self) -> None:
        """Agents silent past their lease are lost and their jobs re-queued; jobs left running by a
        previous master whose agent never came back are re-queued too (monotonic clock throughout).
        JournalFailed (housekeeping logs it): what was not journaled stays as it was, for the next call."""
        with self.lock:
            now = self.clock()
            leases = self._leases
            while leases and now - leases[0][0] > self.lease_seconds:
                heard, _, agent = leases[0]
                if agent.heard != heard or agent.state.gone or self.agents.get(agent.name) is not agent:
                    heapq.heappop(leases)  # heard since (a later entry stands for it), lost already, or replaced
                    continue
                # Re-queued first: if the journal refuses, the agent is not marked lost and its entry
                # stays on top, so the next call sees it silent still and tries again.
                silent = now - heard
                self._requeue_lost(agent, keep=set(), reason=f"agent {agent.name} lost: silent for {silent:.1f}s")
                heapq.heappop(leases)
                agent.state = AgentState.LOST
                agent.times_lost += 1
                log.info("agent %s lost: silent for %.1fs", agent.name, silent)
            if self.orphans_since and now - self.orphans_since > self.lease_seconds:
                held: dict[str, dict[int, int]] = {}
                for job in self.jobs.values():
                    if job.state in ON_AGENT:
                        owner = self.agents.get(job.agent or "")
                        if owner is None or owner.running.get(job.id) != job.attempts:
                            held.setdefault(job.agent or "?", {})[job.id] = job.attempts
                for name, attempts in held.items():
                    ghost = AgentRecord(name, "", {}, 0.0)
                    ghost.running = attempts
                    self._requeue_lost(ghost, keep=set(),
                                       reason=f"agent {name} did not come back after the master restarted")
                self.orphans_since = 0.0  # all of them journaled: done (on JournalFailed, the next call tries again)
