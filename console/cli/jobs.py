"""The job commands: submit, call, jobs, show, cancel, requeue and wait."""

from __future__ import annotations

import argparse
import json
import pickle
import shlex
import sys
from typing import Any, Sequence

from corral.agent.errors import CorralError
from corral.agent.protocol import JobSpec, JobState

from ..client import Client
from ..escape import one_line
from . import render
from .render import EXIT_TIMEOUT, EXIT_USAGE


def _specs(args: argparse.Namespace, base: dict[str, Any]) -> list[JobSpec]:
    env = dict(args.env)
    specs = []
    for index in range(args.count):
        job_env = dict(env, CORRAL_INDEX=str(index)) if args.count > 1 else env
        specs.append(JobSpec(name=args.name, env=job_env, cwd=args.cwd, priority=args.priority,
                             timeout=args.timeout, retries=args.retries, tags=tuple(args.tag), **base))
    return specs


def _submit(args: argparse.Namespace, base: dict[str, Any]) -> int:
    """Submit --count jobs; print their ids, or with --wait their output, and exit as the worst of them."""
    with Client(home=args.home_path) as client:
        code = _ship(client, args)
        ids = client.submit(_specs(args, dict(base, code=code) if code else base))
        if not args.wait:
            print("\n".join(map(str, ids)))
            return 0
        return _wait_and_print(client, ids, None)


def _ship(client: Client, args: argparse.Namespace) -> str | None:
    """--ship DIR: the folders' code goes to the master as one bundle; its digest is the jobs' `code`."""
    if not args.ship:
        return None
    from .. import ship

    bundle = ship.build(ship.named_sources(args.ship))
    if bundle is None:
        return None
    client.ship(bundle)
    return bundle.digest


def cmd_submit(args: argparse.Namespace) -> int:
    words = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not words or not " ".join(words).strip():
        raise CorralError("no command given", "put it after --, e.g. corral submit -- echo hello")
    command = words[0] if len(words) == 1 else shlex.join(words)
    return _submit(args, {"command": command})


def cmd_call(args: argparse.Namespace) -> int:
    values = []
    for text in args.args:
        try:
            values.append(json.loads(text))
        except ValueError:
            raise CorralError(f"argument {text!r} is not JSON", "quote strings as JSON: '\"text\"'") from None
    return _submit(args, {"func": args.func, "payload": pickle.dumps((tuple(values), {}))})


def _wait_and_print(client: Client, ids: Sequence[int], timeout: float | None) -> int:
    """Wait for the jobs, then print each one's last counted output (stdout to stdout, stderr to stderr)."""
    states = client.wait(ids, timeout)
    worst = 0
    for job_id in ids:
        if job_id not in states:
            print(f"corral: job {job_id} still not finished after {timeout:g}s", file=sys.stderr)
            worst = max(worst, EXIT_TIMEOUT)
            continue
        record = client.job(job_id)
        counted = [a for a in record["attempt_list"] if a["counted"]]
        last = counted[-1] if counted else None
        if last is not None:
            _print_output(job_id, last)
        if record["func"] and record["state"] == JobState.DONE.value and record["value"] is not None:
            print(render.value_repr(record["value"]))
        if record["state"] != JobState.DONE.value:
            print(one_line(f"corral: job {job_id} {record['state']}: {record['error']}"), file=sys.stderr)
        worst = max(worst, render.job_exit_code(record))
    sys.stdout.flush()
    return worst


def cmd_wait(args: argparse.Namespace) -> int:
    with Client(home=args.home_path) as client:
        return _wait_and_print(client, args.ids, args.timeout)


def cmd_jobs(args: argparse.Namespace) -> int:
    with Client(home=args.home_path) as client:
        records = client.jobs(args.state, args.limit, args.before)
    if args.json:
        print(render.to_json([render.jsonable(r) for r in records]))
    else:
        print(render.jobs_table(records))
        if len(records) == args.limit and records[-1]["id"] > 1:
            # A full page: there may be more, older ones (stderr, so a pipe gets the table alone).
            more = " ".join([*(f"--state {state}" for state in args.state or ()), f"--limit {args.limit}"])
            print(f"older jobs: corral jobs {more} --before {records[-1]['id']}", file=sys.stderr)
    return 0


def _print_output(job_id: int, attempt: dict[str, Any], raw: bool = False) -> None:
    """One attempt's output to stdout and stderr (render.write_output); a line on stderr for each stream
    that is only the tail of what the job wrote."""
    render.write_output(sys.stdout, attempt["stdout"], raw)
    render.write_output(sys.stderr, attempt["stderr"], raw)
    for note in render.truncation_notes(job_id, attempt):
        print(note, file=sys.stderr)


def cmd_show(args: argparse.Namespace) -> int:
    with Client(home=args.home_path) as client:
        record = client.job(args.id)
    if args.raw:
        # The last attempt's (the counted one's, when there is one): the output the job's outcome came with.
        attempts = record["attempt_list"]
        counted = [a for a in attempts if a["counted"]]
        last = (counted or attempts)[-1] if attempts else None
        if last is not None:
            _print_output(args.id, last, raw=True)
        sys.stdout.flush()
        return 0
    if args.json:
        print(render.to_json(render.jsonable(record)))
        return 0
    print(render.job_detail(record))
    for attempt in record["attempt_list"]:
        for note in render.truncation_notes(args.id, attempt):
            print(note, file=sys.stderr)
    return 0


def cmd_cancel(args: argparse.Namespace) -> int:
    if bool(args.ids) == bool(args.batch):  # a malformed command line, as argparse would report it
        print("corral cancel: give job ids or --batch NAME, not both (see corral cancel --help)", file=sys.stderr)
        return EXIT_USAGE
    with Client(home=args.home_path) as client:
        if args.batch:
            return _cancel_batch(client, args.batch)
        outcome = client.cancel(args.ids)
    for job_id in args.ids:
        print(f"{job_id}: {outcome[job_id]}")
    return 0


def _cancel_batch(client: Client, name: str) -> int:
    outcome = client.cancel_batch(name)
    if not outcome:
        raise CorralError(f"no queued or running job belongs to batch {name!r}",
                          "its jobs are named NAME [i/n]; see `corral jobs`")
    counts = {what: sum(1 for v in outcome.values() if v == what) for what in ("cancelled", "cancelling")}
    print(f"{name}: {counts['cancelled']} cancelled, {counts['cancelling']} running ones cancelling")
    return 0


def cmd_requeue(args: argparse.Namespace) -> int:
    with Client(home=args.home_path) as client:
        new_ids = client.requeue(args.ids)
    for old, new in zip(args.ids, new_ids):
        print(f"{old} → {new}")
    return 0
