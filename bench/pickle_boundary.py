"""The pickle boundary's cost: the master's bounded decoding (decode.plain_loads: a scan of the opcodes for
what they would build, then PlainDataUnpickler) against plain pickle.loads, per message and per job, on
the messages agents and clients really send.

    /work/venv/bin/python -m bench.pickle_boundary [--json PATH]

Each message is built as the sender builds it (the managers' request tuple around the same records
the agent and the Client put in it) and pickled with multiprocessing's ForkingPickler, which is what
goes over the wire. Each decoder then reads the same bytes many times; the figure is the best of
fifteen batches, the two decoders taking turns (the machine is shared: the
minimum is the least disturbed).
"""

from __future__ import annotations

import argparse
import json
import pickle
import sys
import time
import timeit
from multiprocessing.reduction import ForkingPickler
from pathlib import Path
from typing import Any, Callable, Dict, List, Tuple

from corral.agent.protocol import (JobResult, JobSpec, pack_attempts, pack_results, pack_specs, pack_starts,
                                   unpack_specs)
from corral.console.master.decode import plain_loads
from corral.console.master.reports import check_results
from corral.console.master.validate import check

IDENT = "7f3a2c41d2b0"  # an object id, as the server hands them out
SESSION = "9c1e0f7a6b5d4c3b2a1908f7e6d5c4b3"


def _results(rows: int, shell: bool) -> List[JobResult]:
    now = time.time()
    if shell:
        return [JobResult(1000 + i, 1, "done", 0, None, f"built target {i}\n".encode(), started=now, ended=now + 0.05,
                          stdout_total=len(f"built target {i}\n")) for i in range(rows)]
    return [JobResult(1000 + i, 1, "done", None, pickle.dumps(i + 1), started=now, ended=now + 0.0001)
            for i in range(rows)]


def report(rows: int, shell: bool, packed: bool = True) -> Tuple[Any, int]:
    """An agent's report(), as agent/runner.py makes it: `rows` results (callables with a pickled value,
    or shell jobs with a line of output), the 8 attempts it still holds, which of them have started,
    its credit. `packed=False`: as protocol 3 sent it (a tuple per result, lists of pairs and triples)."""
    now = time.time()
    results = _results(rows, shell)
    held = [(5000 + i, 1) for i in range(8)]
    began = [(job_id, attempt, now) for job_id, attempt in held]
    if packed:
        args = (SESSION, pack_results(results), pack_attempts(held), 100, None, 4000, pack_starts(began))
    else:
        args = (SESSION, [tuple(r) for r in results], held, 100, None, 4000, began)
    return (IDENT, "report", args, {}), rows


def submit(jobs: int, packed: bool = True) -> Tuple[Any, int]:
    """A Client's submit(): shell jobs with a name, env and a tag, packed as Client.submit packs them
    (pack_specs of the checked specs); `packed=False`: as plain dicts (JobSpec.to_wire(), what any other
    sender may still send)."""
    specs = [JobSpec(command=f"make -C /src/part{i} test", name=f"part{i}", env={"CI": "1"}, tags=("linux",),
                     timeout=600.0) for i in range(jobs)]
    wire = pack_specs([check(spec) for spec in specs]) if packed else [spec.to_wire() for spec in specs]
    return (IDENT, "submit", (wire,), {}), jobs


def submit_map(jobs: int) -> Tuple[Any, int]:
    """Client.map's submit_map(): one template, one pickled (args, kwargs) payload per job."""
    template = JobSpec(func="mypkg.tasks:square").to_wire()
    payloads = [pickle.dumps(((i,), {})) for i in range(jobs)]
    return (IDENT, "submit_map", (template, payloads, 1.0), {}), jobs


def take() -> Tuple[Any, int]:
    """An agent's long-poll take(): no job in it, counted as one message."""
    return (IDENT, "take", (SESSION, 8, 1.0), {}), 1


MESSAGES: List[Tuple[str, Callable[[], Tuple[Any, int]]]] = [
    ("report, 1 callable result", lambda: report(1, shell=False)),
    ("report, 100 callable results", lambda: report(100, shell=False)),
    ("report, 100 shell results", lambda: report(100, shell=True)),
    ("(protocol 3) 100 callable results", lambda: report(100, shell=False, packed=False)),
    ("submit, 1 shell job", lambda: submit(1)),
    ("submit, 1,000 shell jobs", lambda: submit(1000)),
    ("(plain dicts) 1,000 shell jobs", lambda: submit(1000, packed=False)),
    ("submit_map, 1,000 payloads", lambda: submit_map(1000)),
    ("take (no jobs)", take),
]


def best_pair(first: Callable[[], Any], second: Callable[[], Any], batch_seconds: float = 0.02,
              repeats: int = 15) -> Tuple[float, float]:
    """Seconds per call of each: batches of at least `batch_seconds`, the two taking turns (so a
    noisy neighbour hits both alike), the best batch of each."""
    number = 1
    while timeit.timeit(first, number=number) < batch_seconds:
        number *= 2
    best = [float("inf"), float("inf")]
    for _ in range(repeats):
        for i, func in enumerate((first, second)):
            best[i] = min(best[i], timeit.timeit(func, number=number) / number)
    return best[0], best[1]


def measure() -> List[Dict[str, Any]]:
    out = []
    for name, build in MESSAGES:
        message, jobs = build()
        data = bytes(ForkingPickler.dumps(message))
        assert plain_loads(data) == pickle.loads(data) == message  # the same value, either way
        plain, guarded = best_pair(lambda: pickle.loads(data), lambda: plain_loads(data))
        out.append({
            "message": name, "bytes": len(data), "jobs": jobs,
            "pickle_us": plain * 1e6, "plain_data_us": guarded * 1e6,
            "extra_us_per_message": (guarded - plain) * 1e6, "extra_us_per_job": (guarded - plain) * 1e6 / jobs,
            "ratio": guarded / plain,
        })
    return out


def reading() -> List[Dict[str, Any]]:
    """What the master then does with the decoded records, packed or plain: check_results over a report's
    100 results, and unpack + check() over a submission's 1,000 specs (packing must not move the cost)."""
    out = []
    results = _results(100, shell=False)
    rows, packed = [tuple(r) for r in results], pack_results(results)
    specs = submit(1000, packed=False)[0][2][0]
    packed_specs = submit(1000)[0][2][0]
    for name, jobs, plain_way, packed_way in (
            ("check_results, 100 results", 100, lambda: check_results(rows), lambda: check_results(packed)),
            ("check() of 1,000 specs", 1000, lambda: [check(spec) for spec in specs],
             lambda: [check(spec) for spec in unpack_specs(packed_specs, 1000)])):
        assert plain_way() == packed_way()
        plain, guarded = best_pair(plain_way, packed_way)
        out.append({"step": name, "plain_us_per_job": plain * 1e6 / jobs, "packed_us_per_job": guarded * 1e6 / jobs})
    return out


def table(rows: List[Dict[str, Any]]) -> str:
    head = f"{'message':<30} {'bytes':>8} {'pickle.loads':>13} {'PlainData':>11} {'ratio':>6} {'extra/job':>10}"
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(f"{r['message']:<30} {r['bytes']:>8,} {r['pickle_us']:>10.2f} µs {r['plain_data_us']:>8.2f} µs"
                     f" {r['ratio']:>5.2f}x {r['extra_us_per_job']:>7.3f} µs")
    return "\n".join(lines)


def main(argv: List[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.pickle_boundary", description=__doc__.splitlines()[0])
    parser.add_argument("--json", metavar="PATH", help="also write the figures as JSON")
    args = parser.parse_args(argv)
    rows = measure()
    print(f"Python {sys.version.split()[0]}; best of 15, interleaved; extra = plain_loads (scan + PlainDataUnpickler)"
          " minus pickle.loads")
    print(table(rows))
    steps = reading()
    print("\nthe master reading the decoded records     plain/job   packed/job")
    for step in steps:
        print(f"{step['step']:<40} {step['plain_us_per_job']:>8.3f} µs {step['packed_us_per_job']:>8.3f} µs")
    if args.json:
        Path(args.json).write_text(json.dumps({"decode": rows, "reading": steps}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
