"""A job's output is bytes end to end: captured as the job wrote it (shell and callable), journaled as
bytes with how much each stream produced, decoded with replacement only for display."""

from __future__ import annotations

import pickle
import sqlite3
from pathlib import Path

from corral.agent import execute
from corral.agent.protocol import OUTPUT_TAIL_BYTES, JobSpec, Task
from corral.console.cli.render import job_detail, jsonable, tail_note, truncation_notes
from corral.console.master.scheduler import Scheduler
from corral.console.master.store import Journal

from .agentcalls import register, result, take


def shell(command: str) -> Task:
    return Task(1, 1, command, None, None, {}, None, None)


def call(func: str, *args: object) -> Task:
    return Task(1, 1, None, func, pickle.dumps((args, {})), {}, None, None)


def test_a_shell_jobs_bytes_come_back_as_written() -> None:
    r = execute.execute(shell(r"printf 'a\377\376b\n'; printf '\033[2Jerr\200' >&2"))
    assert (r.state, r.stdout, r.stderr) == ("done", b"a\xff\xfeb\n", b"\x1b[2Jerr\x80")
    assert (r.stdout_total, r.stderr_total) == (5, 8)


def test_a_long_output_is_its_tail_and_says_how_long_it_was() -> None:
    r = execute.execute(shell("head -c 200000 /dev/zero | tr '\\0' x; printf END"))
    assert len(r.stdout) == OUTPUT_TAIL_BYTES and r.stdout.endswith(b"xxEND")
    assert r.stdout_total == 200_003 and r.stderr_total == 0


def test_a_callables_prints_and_bytes_are_kept_as_bytes() -> None:
    r = execute.execute(call("tests.unit.agent_jobs:write_bytes"))
    assert r.state == "done", r.error
    # Text as UTF-8, bytes through sys.stdout.buffer as they are, surrogateescape'd bytes back to
    # themselves, and a lone surrogate that stands for no byte as "?" (the print does not fail).
    assert r.stdout == "héllo\n".encode() + b"\xff\x00raw\n" + b"name \xfe\n" + b"odd ?\n"
    assert r.stderr == b"warn\n" and r.stdout_total == len(r.stdout)


def test_the_journal_keeps_bytes_and_reads_old_text_as_bytes(tmp_path: Path) -> None:
    s = Scheduler(Journal(tmp_path / "corral.db"))
    (job_id,) = s.submit([JobSpec(command="x").to_wire()])
    session = register(s)
    (task,) = take(s, session)
    s.report(session, [result(task, stdout=b"\xff\xfe" * 10, stdout_total=90_000, stderr=b"e")], [], 0)
    (attempt,) = s.job(job_id)["attempt_list"]
    assert (attempt["stdout"], attempt["stdout_total"], attempt["stderr"], attempt["stderr_total"]) == (
        b"\xff\xfe" * 10, 90_000, b"e", 1)
    s.journal.close()
    # A journal written before output was bytes holds it as TEXT (and has no totals): read as bytes.
    db = sqlite3.connect(str(tmp_path / "corral.db"))
    db.execute("UPDATE attempts SET stdout='old text é', stdout_total=0")
    db.commit()
    db.close()
    (old,) = Journal(tmp_path / "corral.db").attempts(job_id)
    assert old.stdout == "old text é".encode() and old.stderr == b"e"


def test_an_older_journal_gets_the_total_columns(tmp_path: Path) -> None:
    path = tmp_path / "old.db"
    db = sqlite3.connect(str(path))
    db.execute("CREATE TABLE attempts (job_id INTEGER NOT NULL, attempt INTEGER NOT NULL, agent TEXT NOT NULL,"
               " state TEXT NOT NULL, started REAL, ended REAL, exit_code INTEGER, stdout TEXT NOT NULL,"
               " stderr TEXT NOT NULL, error TEXT NOT NULL, traceback TEXT NOT NULL, counted INTEGER NOT NULL,"
               " PRIMARY KEY (job_id, attempt, agent)) WITHOUT ROWID")
    db.execute("INSERT INTO attempts VALUES (1, 1, 'a', 'done', 1, 2, 0, 'hi', '', '', '', 1)")
    db.commit()
    db.close()
    (row,) = Journal(path).attempts(1)
    assert (row.stdout, row.stdout_total, row.stderr_total) == (b"hi", 0, 0)


def attempt(**fields: object) -> dict[str, object]:
    base: dict[str, object] = {"attempt": 1, "agent": "a", "state": "done", "started": 1.0, "ended": 2.0,
                               "exit_code": 0, "stdout": b"", "stderr": b"", "error": "", "traceback": "",
                               "counted": 1, "stdout_total": 0, "stderr_total": 0}
    base.update(fields)
    return base


def test_display_decodes_with_replacement_and_says_when_it_is_a_tail() -> None:
    tail = attempt(stdout=b"ok \xff\n", stdout_total=1_258_291, stderr=b"e\n", stderr_total=2)
    assert truncation_notes(7, tail) == ["corral: job 7 attempt 1: stdout shown is the last 5 bytes of 1.2 MiB it wrote"]
    assert tail_note(tail, "stdout") == " (last 5 bytes of 1.2 MiB)" and tail_note(tail, "stderr") == ""
    assert truncation_notes(7, attempt(stdout=b"whole", stdout_total=5)) == []
    record = {"id": 7, "name": "", "command": "x", "func": None, "state": "done", "error": None, "priority": 0,
              "timeout": None, "retries": 0, "tags": [], "cwd": None, "env": {}, "submitted": 1.0, "exit_code": 0,
              "value": None, "attempt_list": [tail]}
    text = job_detail(record)
    assert "--- stdout (last 5 bytes of 1.2 MiB) ---" in text and "ok \ufffd" in text
    (shown,) = jsonable(record)["attempts_detail"]
    assert (shown["stdout"], shown["stdout_total"], shown["stderr"]) == ("ok \ufffd\n", 1_258_291, "e\n")
