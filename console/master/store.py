"""The SQLite journal: schema, one transaction per scheduler call, recovery after a restart, and reads."""

from __future__ import annotations

import json
import sqlite3
import threading
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

from corral.agent.errors import CorralError

SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    id        INTEGER PRIMARY KEY,
    name      TEXT NOT NULL,
    command   TEXT,
    func      TEXT,
    payload   BLOB,
    env       TEXT NOT NULL,
    cwd       TEXT,
    priority  INTEGER NOT NULL,
    timeout   REAL,
    retries   INTEGER NOT NULL,
    tags      TEXT NOT NULL,
    state     TEXT NOT NULL,
    attempts  INTEGER NOT NULL DEFAULT 0,
    failures  INTEGER NOT NULL DEFAULT 0,
    lost      INTEGER NOT NULL DEFAULT 0,
    agent     TEXT,
    submitted REAL NOT NULL,
    started   REAL,
    ended     REAL,
    exit_code INTEGER,
    value     BLOB,
    error     TEXT
);
CREATE TABLE IF NOT EXISTS attempts (
    job_id    INTEGER NOT NULL,
    attempt   INTEGER NOT NULL,
    agent     TEXT NOT NULL,
    state     TEXT NOT NULL,
    started   REAL,
    ended     REAL,
    exit_code INTEGER,
    stdout    TEXT NOT NULL,
    stderr    TEXT NOT NULL,
    error     TEXT NOT NULL,
    traceback TEXT NOT NULL,
    counted   INTEGER NOT NULL,
    PRIMARY KEY (job_id, attempt, agent)
) WITHOUT ROWID;
DROP INDEX IF EXISTS jobs_active;
"""

JOB_COLUMNS = (
    "id, name, command, func, payload, env, cwd, priority, timeout, retries, tags, state,"
    " attempts, failures, lost, agent, submitted, started, ended, exit_code, value, error"
)
SUMMARY_COLUMNS = (
    "id, name, command, func, priority, tags, state, attempts, agent, submitted, started, ended, exit_code, error"
)


def journal_error(path: Path, exc: Exception) -> CorralError:
    return CorralError(
        f"the journal {path} cannot be opened: {exc}",
        "move it aside to start afresh, or restore it from a backup",
    )


class Journal:
    """All writes go through one connection, one transaction per call; reads use their own connection."""

    def __init__(self, path: Path, fsync: bool = False) -> None:
        self.path = path
        try:
            self.db = self._open(path)
            # NORMAL survives a killed process (WAL); FULL also survives a power cut, at a cost per commit.
            self.db.execute(f"PRAGMA synchronous={'FULL' if fsync else 'NORMAL'}")
            # Checkpoints (which fsync) run from the master's housekeeping loop, not inside a
            # scheduler call, so a submit never waits behind one.
            self.db.execute("PRAGMA wal_autocheckpoint=0")
            self.db.executescript(SCHEMA)
            self.reader = self._open(path)
        except sqlite3.Error as exc:
            raise journal_error(path, exc) from None
        self.read_lock = threading.Lock()

    @staticmethod
    def _open(path: Path) -> sqlite3.Connection:
        db = sqlite3.connect(str(path), isolation_level=None, check_same_thread=False)
        mode = db.execute("PRAGMA journal_mode=WAL").fetchone()[0]
        if mode.lower() != "wal":
            raise sqlite3.DatabaseError(f"cannot switch to WAL mode (got {mode})")
        db.execute("PRAGMA busy_timeout=5000")
        return db

    def checkpoint(self) -> None:
        """Copy the WAL into the database without blocking writers (PASSIVE)."""
        with self.read_lock:
            self.reader.execute("PRAGMA wal_checkpoint(PASSIVE)")

    def close(self) -> None:
        self.db.close()
        self.reader.close()

    # --writes (the scheduler holds its lock around each) ------------------------------

    def write(self, statements: Iterable[tuple[str, Sequence[Any]]]) -> None:
        """Run (sql, rows) pairs with executemany in one transaction."""
        db = self.db
        db.execute("BEGIN")
        try:
            for sql, rows in statements:
                if rows:
                    db.executemany(sql, rows)
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise

    INSERT_JOB = (
        "INSERT INTO jobs (id, name, command, func, payload, env, cwd, priority, timeout, retries, tags,"
        " state, submitted) VALUES (?,?,?,?,?,?,?,?,?,?,?,'queued',?)"
    )
    DISPATCH = "UPDATE jobs SET state='running', attempts=?, agent=?, started=? WHERE id=?"
    REQUEUE = "UPDATE jobs SET state='queued', attempts=?, failures=?, lost=?, agent=NULL WHERE id=?"
    # attempts, agent and lost were set at dispatch or requeue; a finish writes only the outcome.
    FINISH = "UPDATE jobs SET state=?, failures=?, agent=?, ended=?, exit_code=?, value=?, error=? WHERE id=?"
    LOST = "UPDATE jobs SET state='lost', lost=?, ended=?, error=? WHERE id=?"
    ATTEMPT = (
        "INSERT OR REPLACE INTO attempts (job_id, attempt, agent, state, started, ended, exit_code,"
        " stdout, stderr, error, traceback, counted) VALUES (?,?,?,?,?,?,?,?,?,?,?,?)"
    )

    # --recovery -----------------------------------------------------------------------

    def active_jobs(self) -> Iterator[tuple]:
        """Every job not yet final, in id order, for the scheduler to rebuild its queues."""
        try:
            yield from self.db.execute(
                f"SELECT {JOB_COLUMNS} FROM jobs WHERE state IN ('queued', 'running', 'held') ORDER BY id"
            )
        except sqlite3.Error as exc:
            raise journal_error(self.path, exc) from None

    def max_id(self) -> int:
        try:
            return self.db.execute("SELECT COALESCE(MAX(id), 0) FROM jobs").fetchone()[0]
        except sqlite3.Error as exc:
            raise journal_error(self.path, exc) from None

    def counts(self) -> dict[str, int]:
        return dict(self.db.execute("SELECT state, COUNT(*) FROM jobs GROUP BY state"))

    # --reads (own connection: listings never hold up dispatch) -------------------------

    def job(self, job_id: int) -> tuple | None:
        with self.read_lock:
            return self.reader.execute(f"SELECT {JOB_COLUMNS} FROM jobs WHERE id=?", (job_id,)).fetchone()

    def attempts(self, job_id: int) -> list[tuple]:
        with self.read_lock:
            return self.reader.execute(
                "SELECT attempt, agent, state, started, ended, exit_code, stdout, stderr, error, traceback, counted"
                " FROM attempts WHERE job_id=? ORDER BY attempt, started",
                (job_id,),
            ).fetchall()

    def summaries(self, states: Sequence[str] | None, limit: int, newest_first: bool) -> list[tuple]:
        order = "DESC" if newest_first else "ASC"
        with self.read_lock:
            if states:
                marks = ",".join("?" * len(states))
                return self.reader.execute(
                    f"SELECT {SUMMARY_COLUMNS} FROM jobs WHERE state IN ({marks}) ORDER BY id {order} LIMIT ?",
                    (*states, limit),
                ).fetchall()
            return self.reader.execute(
                f"SELECT {SUMMARY_COLUMNS} FROM jobs ORDER BY id {order} LIMIT ?", (limit,)
            ).fetchall()

    def outcomes(self, ids: Sequence[int]) -> list[tuple]:
        """(id, state, exit_code, value, error) for each id, in any order."""
        out: list[tuple] = []
        with self.read_lock:
            for start in range(0, len(ids), 500):
                part = ids[start : start + 500]
                marks = ",".join("?" * len(part))
                out.extend(
                    self.reader.execute(
                        f"SELECT id, state, exit_code, value, error FROM jobs WHERE id IN ({marks})", part
                    )
                )
        return out


def encode_env(env: dict[str, str]) -> str:
    return json.dumps(env, separators=(",", ":")) if env else "{}"


def encode_tags(tags: Sequence[str]) -> str:
    return json.dumps(list(tags), separators=(",", ":")) if tags else "[]"
