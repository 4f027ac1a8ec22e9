"""The SQLite journal: schema, one transaction per scheduler call, recovery after a restart, and reads as named rows."""

from __future__ import annotations

import json
import logging
import os
import sqlite3
import threading
import time
from pathlib import Path
from typing import Any, Iterable, Iterator, NamedTuple, Sequence

from corral.agent.errors import CorralError, JournalFailed

from .records import FINAL
from .rows import FinishedRow

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
    error     TEXT,
    code      TEXT
);
CREATE TABLE IF NOT EXISTS attempts (
    job_id    INTEGER NOT NULL,
    attempt   INTEGER NOT NULL,
    agent     TEXT NOT NULL,
    state     TEXT NOT NULL,
    started   REAL,
    ended     REAL,
    exit_code INTEGER,
    stdout    BLOB NOT NULL,
    stderr    BLOB NOT NULL,
    error     TEXT NOT NULL,
    traceback TEXT NOT NULL,
    counted   INTEGER NOT NULL,
    note      TEXT NOT NULL DEFAULT '',
    stdout_total INTEGER NOT NULL DEFAULT 0,
    stderr_total INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (job_id, attempt, agent)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS submissions (
    token     TEXT PRIMARY KEY,
    first_id  INTEGER NOT NULL,
    total     INTEGER NOT NULL,
    submitted REAL NOT NULL
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS meta (
    key       TEXT PRIMARY KEY,
    value
) WITHOUT ROWID;
DROP INDEX IF EXISTS jobs_active;
"""

# Final jobs are most of a long-lived journal (a million is normal) and never change again, so two
# partial indexes cover them: a row enters them once, when it ends (only a final job has `ended`), and
# queued or running rows cost them nothing. `jobs_ended` orders the Finished pane and retention (oldest
# ended first); `jobs_ended_state` answers `corral jobs --state failed` and the count by state at
# start-up without reading the table. (Indexes whose WHERE names `state` cost ~10 us more per job: SQLite
# re-checks them at every state change.) SQLite uses a partial index only for a query whose WHERE repeats
# the index's term literally (ENDED_SQL); FINAL_SQL beside it keeps such a read exact regardless. Reads
# in `ended` order name jobs_ended (INDEXED BY): without statistics the planner would sort the table.
ENDED_SQL = "ended IS NOT NULL"
FINAL_SQL = "state IN (" + ",".join(f"'{state}'" for state in sorted(FINAL)) + ")"
INDEXES = f"""
CREATE INDEX IF NOT EXISTS jobs_ended ON jobs (ended) WHERE {ENDED_SQL};
CREATE INDEX IF NOT EXISTS jobs_ended_state ON jobs (state, id) WHERE {ENDED_SQL};
"""

# Columns added since a journal's first release: (table, column, its declaration). A journal written
# before them gets them on open (ALTER TABLE ... ADD COLUMN; old rows read as the default).
ADDED_COLUMNS = (
    ("jobs", "code", "TEXT"),  # the shipped code bundle (issue 12)
    ("attempts", "note", "TEXT NOT NULL DEFAULT ''"),  # what the agent noted: processes killed at its end (issue 9)
    # How many bytes each stream produced in all (issue 9); an older journal's output is TEXT, read as bytes.
    ("attempts", "stdout_total", "INTEGER NOT NULL DEFAULT 0"),
    ("attempts", "stderr_total", "INTEGER NOT NULL DEFAULT 0"),
)



class JobRow(NamedTuple):
    """One row of the jobs table, every column (JOB_COLUMNS)."""

    id: int
    name: str
    command: str | None
    func: str | None
    payload: bytes | None
    env: str  # JSON
    cwd: str | None
    priority: int
    timeout: float | None
    retries: int
    tags: str  # JSON list
    state: str
    attempts: int
    failures: int
    lost: int
    agent: str | None
    submitted: float
    started: float | None
    ended: float | None
    exit_code: int | None
    value: bytes | None
    error: str | None
    code: str | None  # the shipped code bundle's digest


class SummaryRow(NamedTuple):
    """A job as `corral jobs` lists it (SUMMARY_COLUMNS)."""

    id: int
    name: str
    command: str | None
    func: str | None
    priority: int
    tags: str  # JSON list
    state: str
    attempts: int
    agent: str | None
    submitted: float
    started: float | None
    ended: float | None
    exit_code: int | None
    error: str | None


class AttemptRow(NamedTuple):
    """One attempt of a job in its history (ATTEMPT_COLUMNS)."""

    attempt: int
    agent: str
    state: str
    started: float | None
    ended: float | None
    exit_code: int | None
    stdout: bytes  # the tail of the stream, as the job wrote it
    stderr: bytes
    error: str
    traceback: str
    counted: int
    note: str  # what the agent noted beyond the outcome (processes it left running, killed at its end)
    stdout_total: int  # bytes the stream produced in all: more than len(stdout) means stdout is a tail
    stderr_total: int


class Submission(NamedTuple):
    """A submission that came with a client's token: its jobs are ids first_id..first_id+total-1 (SUBMISSION_COLUMNS)."""

    token: str
    first_id: int
    total: int
    submitted: float


class Outcome(NamedTuple):
    """How a job ended, as Client.outcomes and map() get it."""

    id: int
    state: str
    exit_code: int | None
    value: bytes | None
    error: str | None


JOB_COLUMNS = ", ".join(JobRow._fields)
SUMMARY_COLUMNS = ", ".join(SummaryRow._fields)
ATTEMPT_COLUMNS = ", ".join(AttemptRow._fields)
OUTCOME_COLUMNS = ", ".join(Outcome._fields)
SUBMISSION_COLUMNS = ", ".join(Submission._fields)
# The Finished pane's row (rows.FinishedRow), computed by SQLite.
FINISHED_COLUMNS = ("id, CASE WHEN name != '' THEN name ELSE COALESCE(command, func || '()') END, state, agent,"
                    " exit_code, started, ended, COALESCE(error, ''), attempts")
# What a console filter matches in a final job (lower case, fields apart): as views.haystack for active ones.
FINISHED_HAYSTACK = ("(CAST(id AS TEXT) || char(31) || name || char(31) || COALESCE(command, '') || char(31)"
                     " || COALESCE(func, '') || char(31) || state || char(31) || COALESCE(agent, '')"
                     " || char(31) || COALESCE(error, ''))")
PRUNE_BATCH = 2000  # final jobs deleted per transaction by retention: one short hold of the writer at a time

log = logging.getLogger(__name__)

# A failing journal counts as healed once its file system has this much room again and a write goes through.
HEAL_FREE_BYTES = 1 << 20


class JournalHealth(NamedTuple):
    """Whether the journal's writes go through: what `corral status` and the console's header show."""

    ok: bool
    error: str | None  # the failing write's one line (JournalFailed's message)
    since: float | None  # when writes began to fail (time.time())
    refused: int  # writes refused since then

    def wire(self) -> dict[str, Any]:
        return self._asdict()


def journal_error(path: Path, exc: Exception) -> CorralError:
    return CorralError(
        f"the journal {path} cannot be opened: {exc}",
        "move it aside to start afresh, or restore it from a backup",
    )


WAL_SIZE_LIMIT = 64 * 1024 * 1024  # bytes the WAL file is cut back to once a checkpoint has emptied it


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
            # A burst between two checkpoints grows the WAL file; without a limit it keeps that size for
            # ever (reused, never shrunk): a disk a burst once filled would stay full. Reset, it is cut back.
            self.db.execute(f"PRAGMA journal_size_limit={WAL_SIZE_LIMIT}")
            self.db.executescript(SCHEMA)
            self._add_columns()
            self.db.executescript(INDEXES)
            self.reader = self._open(path)
        except sqlite3.Error as exc:
            raise journal_error(path, exc) from None
        self.read_lock = threading.Lock()
        self.health = JournalHealth(True, None, None, 0)

    @staticmethod
    def _open(path: Path) -> sqlite3.Connection:
        db = sqlite3.connect(str(path), isolation_level=None, check_same_thread=False)
        mode = db.execute("PRAGMA journal_mode=WAL").fetchone()[0]
        if mode.lower() != "wal":
            raise sqlite3.DatabaseError(f"cannot switch to WAL mode (got {mode})")
        db.execute("PRAGMA busy_timeout=5000")
        return db

    def _add_columns(self) -> None:
        """Bring a journal written by an older corral up to this schema (ADDED_COLUMNS), in one transaction."""
        missing = []
        for table, column, declaration in ADDED_COLUMNS:
            have = {row[1] for row in self.db.execute(f"PRAGMA table_info({table})")}
            if column not in have:
                missing.append(f"ALTER TABLE {table} ADD COLUMN {column} {declaration}")
        if missing:
            self.db.execute("BEGIN")
            try:
                for sql in missing:
                    self.db.execute(sql)
                self.db.execute("COMMIT")
            except BaseException:
                self.db.execute("ROLLBACK")
                raise

    def checkpoint(self) -> None:
        """Copy the WAL into the database without blocking writers (PASSIVE); JournalFailed if it cannot
        (the database file cannot grow on a full disk): housekeeping logs it and tries again."""
        try:
            with self.read_lock:
                self.reader.execute("PRAGMA wal_checkpoint(PASSIVE)")
        except sqlite3.Error as exc:
            raise JournalFailed(f"journal checkpoint failed: {exc} ({self.path})") from None

    def close(self) -> None:
        self.db.close()
        self.reader.close()

    # --writes (the scheduler holds its lock around each) ------------------------------

    def write(self, statements: Iterable[tuple[str, Sequence[Any]]]) -> None:
        """Run (sql, rows) pairs with executemany in one transaction, all or nothing. A refusal of the
        database or the disk (full, read-only, I/O error) is JournalFailed, after the rollback: the
        caller changes nothing in memory and says so in one line; the master serves on."""
        db = self.db
        try:
            db.execute("BEGIN")
            for sql, rows in statements:
                if rows:
                    db.executemany(sql, rows)
            db.execute("COMMIT")
        except sqlite3.Error as exc:
            self._rollback()
            raise self._failed(exc) from None
        except BaseException:
            self._rollback()
            raise
        if not self.health.ok:
            self._healed()

    def _rollback(self) -> None:
        # SQLite may have rolled the transaction back itself (SQLITE_FULL, SQLITE_IOERR): a ROLLBACK then
        # fails, and must not hide why the write failed.
        if self.db.in_transaction:
            try:
                self.db.execute("ROLLBACK")
            except sqlite3.Error as exc:
                log.warning("journal rollback failed: %s (%s)", exc, self.path)

    def _failed(self, exc: sqlite3.Error) -> JournalFailed:
        error = JournalFailed(f"journal write failed: {exc} ({self.path})",
                              "nothing was changed; free space or fix the file system, then try again")
        health = self.health
        if health.ok or health.error != error.message:
            log.warning("%s; the master serves on, refusing what needs a write until it heals", error.message)
        since = time.time() if health.ok else health.since
        self.health = JournalHealth(False, error.message, since, health.refused + 1)
        return error

    def _healed(self) -> None:
        health = self.health
        self.health = JournalHealth(True, None, None, 0)
        log.warning("journal writes work again (%d refused over %.1fs)", health.refused,
                    time.time() - (health.since or time.time()))

    def probe(self) -> bool:
        """While writes fail (housekeeping calls this): whether they work again. Only once the file system
        has room (HEAL_FREE_BYTES) and is writable, then by a small write of its own; a later write that
        fails all the same marks the journal failing again."""
        if self.health.ok:
            return True
        try:
            fs = os.statvfs(self.path.parent)
        except OSError:
            return False
        if fs.f_flag & os.ST_RDONLY or fs.f_bavail * fs.f_frsize < HEAL_FREE_BYTES:
            return False
        try:
            self.write([(self.PROBE, [("probe", time.time())])])
        except JournalFailed:
            return False
        return True

    INSERT_JOB = (
        "INSERT INTO jobs (id, name, command, func, payload, env, cwd, priority, timeout, retries, tags,"
        " state, submitted, code) VALUES (?,?,?,?,?,?,?,?,?,?,?,'queued',?,?)"
    )
    PROBE = "INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)"
    INSERT_SUBMISSION = "INSERT INTO submissions (token, first_id, total, submitted) VALUES (?,?,?,?)"
    # A job dispatched is assigned; it runs, and has a `started`, once its agent says its process started.
    DISPATCH = "UPDATE jobs SET state='assigned', attempts=?, agent=?, started=NULL WHERE id=?"
    START = "UPDATE jobs SET state='running', started=? WHERE id=?"
    REQUEUE = "UPDATE jobs SET state='queued', attempts=?, failures=?, lost=?, agent=NULL, started=NULL WHERE id=?"
    # attempts, agent and lost were set at dispatch or requeue (which clears `started`: a job cancelled
    # while queued has no run time); a finish writes only the outcome.
    FINISH = "UPDATE jobs SET state=?, failures=?, agent=?, ended=?, exit_code=?, value=?, error=? WHERE id=?"
    # A job that ended before its agent said it started (it ran in less than a report): when it did.
    STARTED = "UPDATE jobs SET started=? WHERE id=?"
    LOST = "UPDATE jobs SET state='lost', lost=?, ended=?, error=? WHERE id=?"
    ATTEMPT = (
        "INSERT OR REPLACE INTO attempts (job_id, attempt, agent, state, started, ended, exit_code,"
        " stdout, stderr, error, traceback, counted, note, stdout_total, stderr_total)"
        " VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)"
    )

    # --recovery -----------------------------------------------------------------------

    def active_jobs(self) -> Iterator[JobRow]:
        """Every job not yet final, in id order, for the scheduler to rebuild its queues."""
        try:
            for row in self.db.execute(
                f"SELECT {JOB_COLUMNS} FROM jobs WHERE state IN ('queued', 'assigned', 'running', 'held') ORDER BY id"
            ):
                yield JobRow._make(row)
        except sqlite3.Error as exc:
            raise journal_error(self.path, exc) from None

    def final_counts(self) -> dict[str, int]:
        """Final jobs by state, from jobs_ended_state alone (not the table): the scheduler's tally at start-up."""
        try:
            return dict(self.db.execute(f"SELECT state, COUNT(*) FROM jobs WHERE {ENDED_SQL} AND {FINAL_SQL} GROUP BY state"))
        except sqlite3.Error as exc:
            raise journal_error(self.path, exc) from None

    def submission(self, token: str) -> Submission | None:
        """The submission journaled under `token`, if any: on the writer's connection, for a caller holding
        the scheduler's lock (so a submission and its retry cannot both miss it)."""
        try:
            row = self.db.execute(f"SELECT {SUBMISSION_COLUMNS} FROM submissions WHERE token=?", (token,)).fetchone()
        except sqlite3.Error as exc:  # at run time, not at opening: the call fails, the master serves on
            raise CorralError(f"journal read failed: {exc} ({self.path})", "nothing was queued; try again") from None
        return None if row is None else Submission._make(row)

    def max_id(self) -> int:
        try:
            return int(self.db.execute("SELECT COALESCE(MAX(id), 0) FROM jobs").fetchone()[0])
        except sqlite3.Error as exc:
            raise journal_error(self.path, exc) from None

    def prune_finished(self, ended_before: float | None, excess: int) -> list[tuple[int, str]]:
        """Delete at most PRUNE_BATCH of the oldest final jobs, in one transaction: those that ended before
        `ended_before` and, beyond them, the `excess` oldest; with their attempts, and the submissions
        whose jobs are all gone. Returns the (id, state) of each job that went. For a caller holding the scheduler's
        lock; one batch is a short hold (an index range, not a scan)."""
        rows = self.db.execute(
            f"SELECT id, state, ended FROM jobs INDEXED BY jobs_ended WHERE {ENDED_SQL} AND {FINAL_SQL}"
            " ORDER BY ended LIMIT ?", (PRUNE_BATCH,)
        ).fetchall()
        # Both rules pick a prefix of the oldest-ended order: the longer prefix is the batch.
        doomed = [(job_id, state) for i, (job_id, state, ended) in enumerate(rows)
                  if i < excess or (ended_before is not None and ended < ended_before)]
        if not doomed:
            return []
        ids = [(job_id,) for job_id, _ in doomed]
        self.write([
            ("DELETE FROM jobs WHERE id=?", ids),
            ("DELETE FROM attempts WHERE job_id=?", ids),
            ("DELETE FROM submissions WHERE first_id + total <= (SELECT COALESCE(MIN(id), 1 << 62) FROM jobs)", [()]),
        ])
        return doomed

    # --reads (own connection: listings never hold up dispatch) -------------------------

    def counts(self) -> dict[str, int]:
        """Jobs by state: one GROUP BY over the whole table, beside dispatch (never under its lock)."""
        with self.read_lock:
            return dict(self.reader.execute("SELECT state, COUNT(*) FROM jobs GROUP BY state"))

    def job(self, job_id: int) -> JobRow | None:
        with self.read_lock:
            row = self.reader.execute(f"SELECT {JOB_COLUMNS} FROM jobs WHERE id=?", (job_id,)).fetchone()
        return None if row is None else JobRow._make(row)

    def attempts(self, job_id: int) -> list[AttemptRow]:
        with self.read_lock:
            rows = self.reader.execute(
                f"SELECT {ATTEMPT_COLUMNS} FROM attempts WHERE job_id=? ORDER BY attempt, started", (job_id,)
            ).fetchall()
        return [AttemptRow._make(row)._replace(stdout=_blob(row[6]), stderr=_blob(row[7])) for row in rows]

    def summaries(self, states: Sequence[str] | None, limit: int, before: int | None = None) -> list[SummaryRow]:
        """Jobs newest first (ids below `before`, when given), in any of `states` (all when None). Final
        states are read through jobs_ended_state, so a rare state costs its rows, not the table's."""
        terms, params = [], []  # type: tuple[list[str], list[Any]]
        if states:
            if set(states) <= FINAL:
                terms.append(ENDED_SQL)
            terms.append(f"state IN ({','.join('?' * len(states))})")
            params.extend(states)
        if before is not None:
            terms.append("id < ?")
            params.append(before)
        where = f"WHERE {' AND '.join(terms)}" if terms else ""
        with self.read_lock:
            rows = self.reader.execute(
                f"SELECT {SUMMARY_COLUMNS} FROM jobs {where} ORDER BY id DESC LIMIT ?", (*params, limit)
            ).fetchall()
        return [SummaryRow._make(row) for row in rows]

    def summaries_by_ids(self, ids: Sequence[int]) -> list[SummaryRow]:
        """These jobs' summaries, newest first (missing ones left out)."""
        out: list[SummaryRow] = []
        with self.read_lock:
            for start in range(0, len(ids), 500):
                part = ids[start : start + 500]
                out.extend(map(SummaryRow._make, self.reader.execute(
                    f"SELECT {SUMMARY_COLUMNS} FROM jobs WHERE id IN ({','.join('?' * len(part))})", part)))
        out.sort(key=lambda row: -row.id)
        return out

    def outcomes(self, ids: Sequence[int]) -> list[Outcome]:
        """How each of these jobs ended, in any order."""
        out: list[Outcome] = []
        with self.read_lock:
            for start in range(0, len(ids), 500):
                part = ids[start : start + 500]
                marks = ",".join("?" * len(part))
                out.extend(map(Outcome._make, self.reader.execute(
                    f"SELECT {OUTCOME_COLUMNS} FROM jobs WHERE id IN ({marks})", part)))
        return out

    def finished_by_ids(self, ids: Sequence[int]) -> list[FinishedRow]:
        """These final jobs' Finished rows, in the order of `ids` (missing ones left out)."""
        if not ids:
            return []
        with self.read_lock:
            found = {row.id: row for row in map(FinishedRow._make, self.reader.execute(
                f"SELECT {FINISHED_COLUMNS} FROM jobs WHERE id IN ({','.join('?' * len(ids))})", ids))}
        return [found[j] for j in ids if j in found]

    def finished_position(self, job_id: int, needle: str, invert: bool) -> int | None:
        """Where a final job stands in the Finished view (most recently ended first) under this filter:
        how many rows come before it; None when it is not in the view. Counts along jobs_ended, outside
        the scheduler's lock (the console anchors its window to the job its cursor is on)."""
        where, params = _finished_where(needle, invert)
        with self.read_lock:
            row = self.reader.execute(f"SELECT ended FROM jobs WHERE id = ? AND {where}", (job_id, *params)).fetchone()
            if row is None:
                return None
            ended = row[0]
            return int(self.reader.execute(
                f"SELECT COUNT(*) FROM jobs INDEXED BY jobs_ended WHERE {where} AND ended >= ?"
                " AND (ended > ? OR id > ?)", (*params, ended, ended, job_id)).fetchone()[0])

    def finished_page(self, needle: str, invert: bool, limit: int, offset: int,
                      known_total: int | None = None) -> tuple[int | None, list[FinishedRow]]:
        """Final jobs, most recently ended first, that match (or with `invert`, do not match) the
        lower-case `needle` (all of them when it is ''): (how many match, or None when not filtered;
        the `limit` rows from `offset`). `known_total`: how many final jobs there are (the scheduler's
        tally), for an unfiltered page."""
        where, params = _finished_where(needle, invert)
        total = None
        with self.read_lock:
            if needle:
                total = int(self.reader.execute(f"SELECT COUNT(*) FROM jobs WHERE {where}", params).fetchone()[0])
            count = total if total is not None else known_total
            # An OFFSET walks the index up to it: in the older half, walk from the oldest end instead
            # (so `end` on a million jobs costs a window, not a million steps), then put the rows newest first.
            from_oldest = count is not None and offset > count // 2
            if from_oldest:
                assert count is not None
                start = count - offset - limit
                limit, offset = (limit, start) if start >= 0 else (max(0, limit + start), 0)
            order = "ASC" if from_oldest else "DESC"
            rows = self.reader.execute(
                f"SELECT {FINISHED_COLUMNS} FROM jobs INDEXED BY jobs_ended WHERE {where}"
                f" ORDER BY ended {order}, id {order} LIMIT ? OFFSET ?",
                (*params, limit, offset)).fetchall()
        if from_oldest:
            rows.reverse()
        return total, [FinishedRow._make(row) for row in rows]


def _blob(output: bytes | str) -> bytes:
    """A stream's tail as bytes: a journal from before issue 9 holds it as (UTF-8) text."""
    return output.encode("utf-8", "replace") if isinstance(output, str) else output


def _finished_where(needle: str, invert: bool) -> tuple[str, list[Any]]:
    """The Finished view's WHERE clause and its parameters: final jobs, matching the lower-case `needle`
    (or with `invert`, not matching it; all of them when it is '')."""
    where = f"{ENDED_SQL} AND {FINAL_SQL}"
    if not needle:
        return where, []
    escaped = needle.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
    return where + f" AND {'NOT ' if invert else ''}{FINISHED_HAYSTACK} LIKE ? ESCAPE '\\'", [f"%{escaped}%"]


def encode_env(env: dict[str, str]) -> str:
    # ensure_ascii=False: the journal stores the text as counted (a \uXXXX escape is 6 bytes for 2 or 3).
    return json.dumps(env, separators=(",", ":"), ensure_ascii=False) if env else "{}"


def encode_tags(tags: Sequence[str]) -> str:
    return json.dumps(list(tags), separators=(",", ":"), ensure_ascii=False) if tags else "[]"
