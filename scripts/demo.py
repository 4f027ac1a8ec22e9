"""Deterministic jobs written into a journal before a master starts: for screenshots, snapshot tests and the bench."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from corral.console.master.store import Journal, encode_env, encode_tags

EPOCH = 1_800_000_000.0  # 2027-01-15 08:00:00 UTC: every demo time is this plus a fixed offset

COMMANDS = (
    "make test",
    "pytest -q tests/unit",
    "./render.sh scene-{i:04d}",
    "rsync -a /data/shard-{i} /backup/",
    "python train.py --epoch {i}",
    "ffmpeg -i in/{i}.mov -c:v libx264 out/{i}.mp4",
    "gzip -9 logs/day-{i}.log",
    "curl -fsS https://example.com/health",
)
NAMES = {5: "nightly-backup", 12: "thumbnails", 33: "report"}
AGENTS = ("alpha", "beta", "gamma")


def demo_command(i: int) -> str:
    return COMMANDS[i % len(COMMANDS)].format(i=i)


# Explicit columns, not Journal's own statements: those change with the scheduler, the schema rarely.
INSERT_JOB = (
    "INSERT INTO jobs (id, name, command, func, payload, env, cwd, priority, timeout, retries, tags, state,"
    " attempts, failures, lost, agent, submitted, started, ended, exit_code, value, error)"
    " VALUES (?,?,?,NULL,NULL,?,NULL,?,?,?,?,?,?,?,0,?,?,?,?,?,NULL,?)"
)
INSERT_ATTEMPT = (
    "INSERT INTO attempts (job_id, attempt, agent, state, started, ended, exit_code, stdout, stderr, error,"
    " traceback, counted) VALUES (?,?,?,?,?,?,?,?,?,?,'',1)"
)


def write_demo_journal(path: Path, finished: int = 60, queued: int = 25, epoch: float = EPOCH) -> None:
    """`finished` final jobs (mostly done; some failed, timed out, cancelled) then `queued` waiting ones,
    submitted from `epoch` on, 7 seconds apart."""
    journal = Journal(path)  # creates the schema
    try:
        jobs: list[tuple[Any, ...]] = []
        attempts: list[tuple[Any, ...]] = []
        for i in range(1, finished + queued + 1):
            tags = encode_tags(("gpu",) if i % 9 == 0 else ())
            spec = (i, NAMES.get(i, ""), demo_command(i), encode_env({}), (i % 3) * 5,
                    600.0 if i % 13 == 0 else None, 1 if i % 7 == 0 else 0, tags)
            submitted = epoch + i * 7
            if i > finished:
                jobs.append((*spec, "queued", 0, 0, None, submitted, None, None, None, None))
                continue
            agent = AGENTS[i % len(AGENTS)]
            started = submitted + 0.5
            ended = started + (i * 37 % 50) / 10 + 0.05
            state, stderr = "done", ""
            code: int | None = 0
            error: str | None = None
            if i % 17 == 0:
                state, code, error = "cancelled", None, "cancelled by the operator"
            elif i % 13 == 0:
                state, code, error = "timeout", None, "timed out after 600s"
            elif i % 7 == 0:
                state, code, stderr = "failed", 1, f"error: shard {i} is missing\n"
            jobs.append((*spec, state, 1, int(state == "failed"), agent, submitted, started, ended, code, error))
            attempts.append((i, 1, agent, state, started, ended, code, f"step {i}: ok\nwrote out/{i}\n", stderr,
                             error or ""))
        journal.write([(INSERT_JOB, jobs), (INSERT_ATTEMPT, attempts)])
    finally:
        journal.close()
