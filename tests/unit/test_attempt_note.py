"""An attempt's note (what its agent noted beyond the outcome: processes killed at its end) is carried by the
report, journaled in the attempt's row (an older journal gains the column on open) and shown with the attempt."""

from __future__ import annotations

import sqlite3
from pathlib import Path

from corral.agent.protocol import JobSpec
from corral.console.cli.render import job_detail
from corral.console.master.views import Views
from corral.console.master.scheduler import Scheduler
from corral.console.master.store import Journal

from .agentcalls import register, result, take

NOTE = "2 processes left running at its end were killed: sleep (pid 41), sleep (pid 42)"

# The attempts table as corral wrote it before attempts had a `note` column.
OLD_ATTEMPTS = """
CREATE TABLE attempts (
    job_id INTEGER NOT NULL, attempt INTEGER NOT NULL, agent TEXT NOT NULL, state TEXT NOT NULL,
    started REAL, ended REAL, exit_code INTEGER, stdout TEXT NOT NULL, stderr TEXT NOT NULL,
    error TEXT NOT NULL, traceback TEXT NOT NULL, counted INTEGER NOT NULL,
    PRIMARY KEY (job_id, attempt, agent)
) WITHOUT ROWID;
INSERT INTO attempts VALUES (7, 1, 'old', 'failed', 1.0, 2.0, 1, '', '', 'exit code 1', '', 1);
"""


def run_one(s: Scheduler, note: str) -> int:
    [job] = s.submit([JobSpec(command="true").to_wire()])
    session = register(s)
    [task] = take(s, session)
    s.report(session, [result(task, note=note)], [], 0)
    return job


def test_a_clean_run_with_a_note_keeps_it_in_its_attempt_record(tmp_path: Path) -> None:
    s = Scheduler(Journal(tmp_path / "corral.db"))
    try:
        noted, clean = run_one(s, NOTE), run_one(s, "")
        record = Views(s).job(noted)
        [attempt] = record["attempt_list"]
        assert (attempt["state"], attempt["counted"], attempt["note"]) == ("done", 1, NOTE)
        assert f"    note: {NOTE}" in job_detail(record)
        assert [a["note"] for a in Views(s).job(clean)["attempt_list"]] == [""]
        assert "note:" not in job_detail(Views(s).job(clean))
    finally:
        s.journal.close()


def test_an_older_journal_gains_the_note_column(tmp_path: Path) -> None:
    path = tmp_path / "old.db"
    db = sqlite3.connect(path)
    db.executescript(OLD_ATTEMPTS)
    db.commit()
    db.close()
    journal = Journal(path)
    try:
        [old] = journal.attempts(7)
        assert (old.agent, old.error, old.note) == ("old", "exit code 1", "")
    finally:
        journal.close()
