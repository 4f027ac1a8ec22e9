"""Deterministic jobs written into a journal before a master starts: for screenshots, snapshot tests and the bench."""

from __future__ import annotations

from pathlib import Path

from ..master.store import Journal, encode_env, encode_tags

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


def write_demo_journal(path: Path, finished: int = 60, queued: int = 25) -> None:
    """`finished` final jobs (mostly done; some failed, timed out, cancelled) then `queued` waiting ones."""
    journal = Journal(path)
    try:
        inserts, dispatches, attempts, finishes = [], [], [], []
        for i in range(1, finished + queued + 1):
            tags = ("gpu",) if i % 9 == 0 else ()
            inserts.append((i, NAMES.get(i, ""), demo_command(i), None, None, encode_env({}), None, (i % 3) * 5,
                            600.0 if i % 13 == 0 else None, 1 if i % 7 == 0 else 0, encode_tags(tags),
                            EPOCH + i * 7))
            if i > finished:
                continue
            agent = AGENTS[i % len(AGENTS)]
            started = EPOCH + i * 7 + 0.5
            took = (i * 37 % 50) / 10 + 0.05
            state, code, error, stderr = "done", 0, "", ""
            if i % 17 == 0:
                state, code, error = "cancelled", None, "cancelled by the operator"
            elif i % 13 == 0:
                state, code, error = "timeout", None, "timed out after 600s"
            elif i % 7 == 0:
                state, code, error, stderr = "failed", 1, "", f"error: shard {i} is missing\n"
            ended = started + took
            dispatches.append((1, agent, started, i))
            attempts.append((i, 1, agent, state, started, ended, code, f"step {i}: ok\nwrote out/{i}\n", stderr,
                             error, "", 1))
            finishes.append((state, 1 if state == "failed" else 0, ended, code, None, error, i))
        journal.write([(Journal.INSERT_JOB, inserts), (Journal.DISPATCH, dispatches), (Journal.ATTEMPT, attempts),
                       (Journal.FINISH, finishes)])
    finally:
        journal.close()
