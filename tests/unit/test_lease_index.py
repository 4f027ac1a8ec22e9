"""Leases of a crowd: the master's lease check looks at the agents whose lease may have run out, not at all of them."""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

import pytest

from corral.console.master.records import AgentState
from corral.console.master.scheduler import Scheduler
from corral.console.master.store import Journal

from .agentcalls import register
from .test_attempts import Clock

AGENTS = 300
LEASE = 10.0


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def s(tmp_path: Path, clock: Clock) -> Iterator[Scheduler]:
    sched = Scheduler(Journal(tmp_path / "corral.db"), lease_seconds=LEASE, clock=clock)
    try:
        yield sched
    finally:
        sched.journal.close()


def test_only_the_silent_are_lost_and_the_index_stays_bounded(s: Scheduler, clock: Clock) -> None:
    sessions = {f"a{i}": register(s, f"a{i}", slots=1) for i in range(AGENTS)}
    silent = {"a7", "a150", "a299"}
    for second in range(60):  # a minute of heartbeats, one a second, from all but the silent ones
        clock.now += 1.0
        for name, session in sessions.items():
            if name not in silent or second < 5:
                s.report(session, [], [])
        s.housekeeping()
        # One entry per hearing, each dropped once it is a lease old: never more than a lease of them.
        assert len(s._leases) <= AGENTS * (LEASE + 2)
    lost = {a.name for a in s.agents.values() if a.state is AgentState.LOST}
    assert lost == silent


def test_an_agent_heard_again_after_its_loss_is_judged_again(s: Scheduler, clock: Clock) -> None:
    early, late = register(s, "early", slots=1), register(s, "late", slots=1)
    clock.now += LEASE + 1
    s.report(late, [], [])
    s.expire_leases()  # (housekeeping would take a tick this late for the master's own stall)
    assert s.agents["early"].state is AgentState.LOST and s.agents["late"].state is AgentState.UP
    s.report(early, [], [])  # back: up, and on the index again
    assert s.agents["early"].state is AgentState.UP
    clock.now += LEASE + 1
    s.expire_leases()
    assert {a.state for a in s.agents.values()} == {AgentState.LOST}


def test_a_lease_shortened_by_hand_is_seen(s: Scheduler) -> None:
    """Tests (and the lateness extension) set `heard` directly; the index follows every change."""
    register(s, "first", slots=1)
    register(s, "second", slots=1)
    s.agents["second"].heard -= LEASE + 1  # behind the first, which is fresh
    s.expire_leases()
    assert s.agents["second"].state is AgentState.LOST and s.agents["first"].state is AgentState.UP
