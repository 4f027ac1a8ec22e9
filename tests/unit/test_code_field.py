"""A job's shipped code is a field of its own: checked with the other rules, journaled in its own column (an older
journal gains it on open), carried by the master's Job and the agent's Task, kept by requeue and recovery."""

from __future__ import annotations

import hashlib
import json
import sqlite3
from pathlib import Path

import pytest

from corral.agent.errors import BadJobSpec
from corral.agent.protocol import JobSpec, Task
from corral.console.master.scheduler import Scheduler
from corral.console.master.store import Journal
from corral.console.master.validate import Invalid, check, code_rule, validate

from .agentcalls import register, take
from .conftest import Master

DIGEST = hashlib.sha256(b"some files").hexdigest()

# The jobs table as corral wrote it before jobs had a `code` column.
OLD_JOBS = """
CREATE TABLE jobs (
    id INTEGER PRIMARY KEY, name TEXT NOT NULL, command TEXT, func TEXT, payload BLOB, env TEXT NOT NULL,
    cwd TEXT, priority INTEGER NOT NULL, timeout REAL, retries INTEGER NOT NULL, tags TEXT NOT NULL,
    state TEXT NOT NULL, attempts INTEGER NOT NULL DEFAULT 0, failures INTEGER NOT NULL DEFAULT 0,
    lost INTEGER NOT NULL DEFAULT 0, agent TEXT, submitted REAL NOT NULL, started REAL, ended REAL,
    exit_code INTEGER, value BLOB, error TEXT
);
"""


def test_the_code_rule_takes_a_bundles_name_only() -> None:
    assert code_rule(DIGEST) == DIGEST
    for bad in ("../../etc", DIGEST.upper(), DIGEST[:-1], DIGEST + "0", "", 7, None, [DIGEST]):
        with pytest.raises(Invalid, match="^code must name a shipped code bundle"):
            code_rule(bad)
    assert check({"func": "m:f", "code": DIGEST}).code == DIGEST
    assert check({"command": "true"}).code is None
    assert validate(JobSpec(command="python -m m", code=DIGEST)) == JobSpec(command="python -m m", code=DIGEST)
    with pytest.raises(BadJobSpec, match=r"^job 3: code must name a shipped code bundle .*, not '\.\./x'"):
        check({"func": "m:f", "code": "../x"}, "job 3")


def test_code_goes_from_the_spec_to_the_journal_to_the_agents_task(master: Master) -> None:
    s = master.scheduler
    one = s.submit([JobSpec(func="m:f", code=DIGEST).to_wire(), JobSpec(command="true").to_wire()])
    many, _ = s.submit_map(JobSpec(func="m:g", code=DIGEST).to_wire(), [b"a", b"b"])
    for job_id in one[:1] + many:
        row = s.journal.job(job_id)
        assert row is not None and row.code == DIGEST and json.loads(row.env) == {}
    assert s.journal.job(one[1]).code is None  # type: ignore[union-attr]
    assert s.job(one[0])["code"] == DIGEST  # what `corral show --json` prints
    with pytest.raises(BadJobSpec, match="template: code must name"):
        s.submit_map({"func": "m:g", "code": "nope"}, [b"a"])

    again = master.restart()  # recovery reads the column back
    assert again.jobs[one[0]].code == DIGEST and again.jobs[one[1]].code is None
    tasks = {t.job_id: t for t in take(again, register(again))}
    assert {t.code for i, t in tasks.items() if i != one[1]} == {DIGEST} and tasks[one[1]].code is None
    assert isinstance(tasks[one[0]], Task) and tasks[one[0]].env == {}


def test_requeue_keeps_the_code(scheduler: Scheduler) -> None:
    job = scheduler.submit([JobSpec(func="m:f", code=DIGEST).to_wire()])[0]
    scheduler.cancel([job])
    new = scheduler.requeue([job])[0]
    assert scheduler.jobs[new].code == DIGEST


def test_a_journal_from_before_the_code_column_opens_and_keeps_its_jobs(tmp_path: Path) -> None:
    path = tmp_path / "old.db"
    db = sqlite3.connect(path)
    db.executescript(OLD_JOBS)
    db.execute("INSERT INTO jobs (id, name, command, env, priority, retries, tags, state, submitted)"
               " VALUES (1, 'old', 'echo old', '{}', 0, 0, '[]', 'queued', 1.0)")
    db.commit()
    db.close()

    s = Scheduler(Journal(path))
    try:
        assert s.jobs[1].command == "echo old" and s.jobs[1].code is None
        new = s.submit([JobSpec(func="m:f", code=DIGEST).to_wire()])[0]
        assert new == 2 and s.journal.job(2).code == DIGEST  # type: ignore[union-attr]
    finally:
        s.journal.close()
    s = Scheduler(Journal(path))  # and opens again, already migrated
    try:
        assert sorted(s.jobs) == [1, 2] and s.jobs[2].code == DIGEST
        columns = [row[1] for row in s.journal.db.execute("PRAGMA table_info(jobs)")]
        assert columns.count("code") == 1
    finally:
        s.journal.close()
