"""A submission with a token is idempotent: sent again (its reply was lost), the master answers with the jobs it
queued the first time, from its journal, and queues nothing; also after a restart."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from corral.agent.errors import BadJobSpec
from corral.agent.protocol import JobSpec
from corral.console.master.scheduler import Scheduler
from corral.console.master.store import Journal

from .agentcalls import register, result, take
from .conftest import Master

TEMPLATE = JobSpec(func="m:f", name="pool-1").to_wire()


def rows(s: Scheduler) -> int:
    return int(s.journal.db.execute("SELECT COUNT(*) FROM jobs").fetchone()[0])


def test_the_same_token_gets_the_same_jobs_once(master: Master) -> None:
    s = master.scheduler
    ids, _ = s.submit_map(dict(TEMPLATE, batch=[1, 3]), [b"a", b"b", b"c"], 0.0, "engine-1")
    assert ids == [1, 2, 3] and rows(s) == 3
    again, _ = s.submit_map(dict(TEMPLATE, batch=[1, 3]), [b"a", b"b", b"c"], 0.0, "engine-1")
    assert again == ids and rows(s) == 3 and s.next_id == 4
    other, _ = s.submit_map(TEMPLATE, [b"d"], 0.0, "engine-2")  # another token, another submission
    untokened = [s.submit_map(TEMPLATE, [b"e"])[0] for _ in range(2)]  # no token: each call is new
    assert other == [4] and untokened == [[5], [6]] and rows(s) == 6

    # The retry of a submission whose jobs have run since gets their outcomes, as the first reply would have.
    session = register(s)
    s.report(session, [result(t) for t in take(s, session) if t.job_id in ids], [], 0)
    again, finished = s.submit_map(TEMPLATE, [b"a", b"b", b"c"], 1.0, "engine-1")
    assert again == ids and sorted(o[0] for o in finished) == ids and rows(s) == 6

    restarted = master.restart()  # the token is in the journal, with the jobs
    assert restarted.submit_map(TEMPLATE, [b"a", b"b", b"c"], 0.0, "engine-1")[0] == ids
    assert restarted.next_id == 7 and rows(restarted) == 6


def test_a_token_is_checked_and_names_one_submission(scheduler: Scheduler) -> None:
    scheduler.submit_map(TEMPLATE, [b"a", b"b"], 0.0, "t-1")
    with pytest.raises(BadJobSpec, match="submission token 't-1' named a submission of 2 jobs, not 3"):
        scheduler.submit_map(TEMPLATE, [b"a", b"b", b"c"], 0.0, "t-1")
    for bad in ("", "x" * 65, "a b", "tab\there", "é", 7, b"t-2", ["t"]):
        with pytest.raises(BadJobSpec, match="^submit_map\\(\\): token must be 1 to 64 printable ASCII"):
            scheduler.submit_map(TEMPLATE, [b"a"], 0.0, bad)
    assert scheduler.next_id == 3


def test_a_journal_without_the_submissions_table_gains_it(tmp_path: Path) -> None:
    path = tmp_path / "old.db"
    Journal(path).close()
    db = sqlite3.connect(path)
    db.execute("DROP TABLE submissions")
    db.commit()
    db.close()
    s = Scheduler(Journal(path))
    try:
        assert s.submit_map(TEMPLATE, [b"a"], 0.0, "t")[0] == s.submit_map(TEMPLATE, [b"a"], 0.0, "t")[0] == [1]
    finally:
        s.journal.close()
