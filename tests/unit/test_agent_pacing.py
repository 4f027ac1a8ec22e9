"""The agent's pacing: duration estimates per job kind, the credit it asks for, what it keeps, how it chunks."""

from __future__ import annotations

from collections import deque

import pytest

from corral.agent.pacing import BATCH_HORIZON_SECONDS, CHUNK_SECONDS, MAX_KINDS, MAX_TAKE, Pacing, kind_of
from corral.agent.protocol import Task


def task(job_id: int, func: str | None = "m:tiny", command: str | None = None, timeout: float | None = None) -> Task:
    return Task(job_id, 1, command, None if command else func, None, {}, None, timeout)


def test_a_kind_is_its_callable_or_its_command() -> None:
    assert kind_of(task(1, func="m:f")) == "m:f"
    assert kind_of(task(1, command="sleep 1")) == "sleep 1"


def test_an_unknown_kind_has_no_estimate_until_one_finishes() -> None:
    pacing = Pacing(slots=2)
    assert pacing.estimate(task(1)) is None
    pacing.learn([("m:tiny", 0.002)])
    assert pacing.estimate(task(2)) == pytest.approx(0.002)


def test_the_estimate_is_a_moving_average_of_each_batch_mean() -> None:
    pacing = Pacing(slots=1)
    pacing.learn([("m:tiny", 1.0), ("m:tiny", 3.0)])  # one batch: its mean, 2.0
    assert pacing.estimate(task(1)) == pytest.approx(2.0)
    pacing.learn([("m:tiny", 4.0)])
    assert pacing.estimate(task(1)) == pytest.approx(0.7 * 2.0 + 0.3 * 4.0)


def test_the_oldest_kind_learned_is_forgotten_past_the_cap() -> None:
    pacing = Pacing(slots=1)
    pacing.learn([(f"m:f{i}", 1.0) for i in range(MAX_KINDS)])
    pacing.learn([("m:f0", 1.0)])  # learned again: now the newest
    pacing.learn([("m:new", 1.0)])
    assert pacing.estimate(task(1, func="m:f0")) is not None
    assert pacing.estimate(task(1, func="m:f1")) is None
    assert pacing.estimate(task(1, func="m:new")) is not None


def test_credit_is_one_per_free_slot_for_unknown_or_long_kinds() -> None:
    pacing = Pacing(slots=4)
    assert pacing.wanted(held=0) == 4
    assert pacing.wanted(held=3) == 1
    assert pacing.wanted(held=9) == 0  # never negative
    pacing.learn([("m:slow", 5.0)])
    pacing.admit([task(1, func="m:slow")], held=0, waiting=())
    assert pacing.wanted(held=1) == 3


def test_credit_for_tiny_jobs_fills_the_horizon_up_to_the_cap() -> None:
    pacing = Pacing(slots=2)
    pacing.learn([("m:tiny", 0.001)])
    pacing.admit([task(1)], held=0, waiting=())  # the kind received last sets the pace
    per_slot = int(BATCH_HORIZON_SECONDS / 0.001)
    assert pacing.wanted(held=10) == 2 * per_slot - 10
    pacing.learn([("m:instant", 0.0)] * 10)
    pacing.admit([task(2, func="m:instant")], held=0, waiting=())
    assert pacing.wanted(held=0) == MAX_TAKE


def test_unknown_jobs_are_kept_only_for_free_slots() -> None:
    pacing = Pacing(slots=2)
    kept, back = pacing.admit([task(i, func="m:unknown") for i in range(5)], held=1, waiting=())
    assert [t.job_id for t in kept] == [0]
    assert [t.job_id for t in back] == [1, 2, 3, 4]


def test_short_jobs_queue_here_within_the_horizon_long_ones_go_back() -> None:
    pacing = Pacing(slots=1)
    pacing.learn([("m:short", 0.03), ("m:long", 1.0)])
    pacing.learn([("m:long", 1.0)])
    short = [task(i, func="m:short") for i in range(10)]
    kept, back = pacing.admit(short, held=1, waiting=())  # the one slot is busy
    assert len(kept) == int(BATCH_HORIZON_SECONDS / 0.03)  # 0.1 s of work for the slot: 3 of them
    kept, back = pacing.admit([task(20, func="m:long")], held=1, waiting=())
    assert kept == [] and len(back) == 1


def test_work_already_waiting_counts_against_the_horizon() -> None:
    pacing = Pacing(slots=1)
    pacing.learn([("m:short", 0.03)])
    waiting = [task(i, func="m:short") for i in range(3)]  # 0.09 s queued already
    kept, back = pacing.admit([task(10, func="m:short")], held=4, waiting=waiting)
    assert kept == [] and len(back) == 1


def test_unknown_or_long_jobs_go_to_the_pool_one_each_one_per_slot() -> None:
    pacing = Pacing(slots=2)
    waiting = deque(task(i, func="m:unknown") for i in range(4))
    assert pacing.next_chunk(waiting, chunks_in_pool=0) == [task(0, func="m:unknown")]
    assert pacing.next_chunk(waiting, chunks_in_pool=1) == [task(1, func="m:unknown")]
    assert pacing.next_chunk(waiting, chunks_in_pool=2) is None  # every slot has one
    assert len(waiting) == 2


def test_tiny_jobs_travel_in_chunks_of_about_the_chunk_time_two_per_slot() -> None:
    pacing = Pacing(slots=1)
    pacing.learn([("m:tiny", 0.001)])
    waiting = deque(task(i) for i in range(100))
    first = pacing.next_chunk(waiting, chunks_in_pool=0)
    assert first is not None and len(first) == round(CHUNK_SECONDS / 0.001)
    assert [t.job_id for t in first] == list(range(len(first)))  # in order
    assert pacing.next_chunk(waiting, chunks_in_pool=1) is not None
    assert pacing.next_chunk(waiting, chunks_in_pool=2) is None


def test_a_chunk_stops_at_an_unknown_job_and_a_timed_callable_runs_alone() -> None:
    pacing = Pacing(slots=1)
    pacing.learn([("m:tiny", 0.001)])
    waiting = deque([task(1), task(2), task(3, func="m:unknown"), task(4)])
    assert [t.job_id for t in pacing.next_chunk(waiting, 0) or []] == [1, 2]
    waiting = deque([task(1, timeout=5.0), task(2), task(3)])
    assert [t.job_id for t in pacing.next_chunk(waiting, 0) or []] == [1]
    assert [t.job_id for t in pacing.next_chunk(waiting, 0) or []] == [2, 3]
    waiting = deque([task(1), task(2, timeout=5.0)])
    assert [t.job_id for t in pacing.next_chunk(waiting, 0) or []] == [1]


def test_nothing_waiting_is_no_chunk() -> None:
    assert Pacing(slots=1).next_chunk(deque(), 0) is None
