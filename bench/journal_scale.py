"""`python -m bench.journal_scale`: a master with a million finished jobs in its journal: start-up, RSS, status, listings and console keys.

Method (also in bench/README.md, "A million jobs"):
- A fresh CORRAL_HOME; a real `corral master` and one agent (2 slots). The journal is built THROUGH the
  master: `--jobs` trivial callables (bench.jobs:inc) in maps of 50,000, run and recorded as any job is.
- The master's RSS right after the build; then it is stopped (SIGTERM) and started again on that journal:
  start-up = from the spawn until its first `status` answers; RSS once it has.
- Latency, p50/p99 over --calls calls each, through the Python Client (one connection, as the console and
  the CLI use it): `status`, `jobs --limit 50`, `jobs --state failed --limit 50`, `show` of a random job.
  The `corral status` command's wall time (a new interpreter each time) is given apart: it is mostly
  Python's start-up.
- Console keys: the real CorralApp, headless at 120x36 (as bench/console_bench.py): the Finished pane
  focused, cursor moves down/up, page down, and `end` (the oldest of the million) then `home`; a key's
  time runs from the driver's event to the repaint after the cursor moved.
Targets (issue 13): status p99 < 100 ms and console keys p99 < 100 ms with 1 M jobs; RSS <= 300 MB.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Dict, List

from . import REPO_ROOT, Deadline, machine_info, percentile, rss_mb

SIZE = (120, 36)
BUILD_CHUNK = 50_000
LATENCY_TARGET_MS = 100.0
RSS_TARGET_MB = 300.0


class Master:
    """A `corral master` and its agent under one private CORRAL_HOME."""

    def __init__(self, home: Path) -> None:
        self.home = home
        home.mkdir(mode=0o700, parents=True, exist_ok=True)
        self.env = dict(os.environ, CORRAL_HOME=str(home), PYTHONPATH=str(REPO_ROOT))
        self.procs: Dict[str, subprocess.Popen] = {}

    def spawn(self, name: str, *args: str) -> subprocess.Popen:
        with open(self.home / f"{name}.log", "ab") as log:
            proc = subprocess.Popen([sys.executable, *args], cwd=REPO_ROOT, env=self.env, stdin=subprocess.DEVNULL,
                                    stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        self.procs[name] = proc
        return proc

    def start(self) -> float:
        """Start the master; seconds until its first status answered."""
        from corral.console.client import Client

        (self.home / "master.json").unlink(missing_ok=True)
        began = time.monotonic()
        proc = self.spawn("master", "-m", "corral", "master")
        deadline = Deadline(300, "the master to answer")
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"corral master exited {proc.returncode}: {(self.home / 'master.log').read_text()[-2000:]}")
            try:
                with Client(home=self.home) as client:
                    client.status()
                return time.monotonic() - began
            except Exception:  # noqa: BLE001 - not up yet; the deadline bounds it
                deadline.check()
                time.sleep(0.01)

    def stop_master(self) -> None:
        proc = self.procs.pop("master")
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=120)

    def close(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.kill()
            proc.wait(timeout=30)

    @property
    def pid(self) -> int:
        return self.procs["master"].pid


def latency_summary(seconds: List[float]) -> Dict[str, float]:
    return {"p50_ms": percentile(seconds, 50) * 1e3, "p99_ms": percentile(seconds, 99) * 1e3,
            "max_ms": max(seconds) * 1e3, "n": len(seconds)}


def timed(call: Callable[[], Any], calls: int) -> Dict[str, float]:
    samples = []
    for _ in range(calls):
        start = time.perf_counter()
        call()
        samples.append(time.perf_counter() - start)
    return latency_summary(samples)


def build(master: Master, jobs: int, step: Callable[[str], None]) -> float:
    """`jobs` finished jobs, through the master and one agent; returns jobs per second."""
    from corral.console.client import Client

    master.spawn("agent", "-m", "corral.agent", "--name", "builder", "--slots", "2")
    began = time.monotonic()
    with Client(home=master.home) as client:
        deadline = Deadline(60, "the agent to register")
        while not any(a["state"] == "up" for a in client.agents()):
            deadline.check()
            time.sleep(0.05)
        client.submit([{"command": "exit 3"} for _ in range(20)])  # a few failures among them, for --state failed
        done = 0
        while done < jobs:
            chunk = min(BUILD_CHUNK, jobs - done)
            for _ in client.map("bench.jobs:inc", range(chunk)):
                pass
            done += chunk
            step(f"built {done:,} of {jobs:,} ({done / (time.monotonic() - began):,.0f} jobs/s)")
    return jobs / (time.monotonic() - began)


async def console_keys(home: Path, jobs: int, keys: int) -> Dict[str, Any]:
    from textual import events

    from corral.console.tui.app import CorralApp

    app = CorralApp(home=home)
    loop = asyncio.get_running_loop()
    async with app.run_test(size=SIZE) as pilot:
        table = app.main.finished_pane
        started = time.perf_counter()
        deadline = Deadline(120, "the console's first snapshot")
        while not (table.loaded and table.total >= jobs):
            deadline.check()
            await pilot.pause(0.01)
        first_screen = time.perf_counter() - started
        table.focus()
        await pilot.pause(1.0)

        async def press(key: str) -> float:
            before = (table.cursor, table.selected())
            start = time.perf_counter()
            app._driver.send_message(events.Key(key, None))  # what the terminal driver does on input
            limit = Deadline(10, f"the console to answer {key}")
            # Moved, and the row under the cursor is there (a far jump waits for its window of rows).
            while (table.cursor, table.selected()) == before or table.selected() is None:
                limit.check()
                await asyncio.sleep(0.0005)
            painted: asyncio.Future[float] = loop.create_future()
            app.screen.call_after_refresh(lambda: painted.set_result(time.perf_counter()))
            return await asyncio.wait_for(painted, 10) - start

        moves: List[float] = []
        jumps: List[float] = []
        by_key: Dict[str, List[float]] = {"pagedown": [], "end": [], "home": []}
        for i in range(keys):
            moves.append(await press("down" if i % 2 == 0 else "up"))
            await asyncio.sleep(0.05)
        for _ in range(max(2, keys // 20)):
            for key, settle in (("pagedown", 0.05), ("end", 0.3), ("home", 0.3)):
                took = await press(key)
                jumps.append(took)
                by_key[key].append(round(took * 1e3, 1))
                await asyncio.sleep(settle)  # a far view is fetched and redrawn a few times
        app.exit("detach")
    return {"first_screen_s": first_screen, "moves": latency_summary(moves), "jumps": latency_summary(jumps),
            "jumps_ms_by_key": by_key}


def run(jobs: int, calls: int, keys: int, step: Callable[[str], None]) -> Dict[str, Any]:
    from corral.console.client import Client

    with tempfile.TemporaryDirectory(prefix="corral-journal-bench-") as tmp:
        master = Master(Path(tmp) / "home")
        try:
            master.start()
            step(f"building {jobs:,} finished jobs through the master")
            rate = build(master, jobs, step)
            out: Dict[str, Any] = {"jobs": jobs, "build_jobs_per_s": rate, "rss_after_build_mb": rss_mb(master.pid)}
            master.procs.pop("agent").kill()
            master.stop_master()
            step("restarting the master on the full journal")
            out["startup_s"] = master.start()
            out["rss_after_start_mb"] = rss_mb(master.pid)
            out["journal_mb"] = (master.home / "corral.db").stat().st_size / 1e6
            step(f"timing {calls} calls of each read")
            with Client(home=master.home) as client:
                out["status"] = timed(client.status, calls)
                out["jobs_limit_50"] = timed(lambda: client.jobs(limit=50), calls)
                out["jobs_failed_50"] = timed(lambda: client.jobs(["failed"], limit=50), calls)
                out["show"] = timed(lambda: client.job(random.randint(1, jobs)), calls)
            cli = []
            for _ in range(5):
                start = time.perf_counter()
                subprocess.run([sys.executable, "-m", "corral", "status"], env=master.env, cwd=REPO_ROOT,
                               capture_output=True, check=True, timeout=60)
                cli.append(time.perf_counter() - start)
            out["cli_status"] = latency_summary(cli)
            step(f"console: {keys} cursor keys and jumps on the Finished pane")
            out["console"] = asyncio.run(console_keys(master.home, jobs, keys))
            out["rss_after_reads_mb"] = rss_mb(master.pid)
        finally:
            master.close()
    return out


def _ok(value: float, target: float) -> str:
    return "ok" if value < target else "MISSED"


def report(r: Dict[str, Any]) -> str:
    lines = [f"a journal of {r['jobs']:,} finished jobs ({r['journal_mb']:,.0f} MB), built through the master"
             f" at {r['build_jobs_per_s']:,.0f} jobs/s",
             f"{'':44}{'p50':>9}{'p99':>9}   target"]
    rows = [("Client.status()", r["status"], True), ("Client.jobs(limit=50)", r["jobs_limit_50"], False),
            ("Client.jobs(['failed'], limit=50)", r["jobs_failed_50"], False), ("Client.job(id)", r["show"], False),
            ("`corral status` (a new interpreter)", r["cli_status"], False),
            ("console: cursor down/up -> repaint", r["console"]["moves"], True),
            ("console: pgdn, end, home -> rows -> repaint", r["console"]["jumps"], True)]
    for label, lat, judged in rows:
        target = f"p99 < {LATENCY_TARGET_MS:.0f} ms: {_ok(lat['p99_ms'], LATENCY_TARGET_MS)}" if judged else ""
        lines.append(f"{label:44}{lat['p50_ms']:>7.1f}ms{lat['p99_ms']:>7.1f}ms   {target}")
    lines.append(f"master start-up on the full journal: {r['startup_s']:.2f} s; console's first screen"
                 f" {r['console']['first_screen_s']:.2f} s")
    peak = max(r["rss_after_build_mb"], r["rss_after_start_mb"], r["rss_after_reads_mb"])
    lines.append(f"master RSS: {r['rss_after_build_mb']:.0f} MB after the build, {r['rss_after_start_mb']:.0f} MB after"
                 f" a restart, {r['rss_after_reads_mb']:.0f} MB after the reads; <= {RSS_TARGET_MB:.0f} MB:"
                 f" {_ok(peak, RSS_TARGET_MB + 0.001)}")
    return "\n".join(lines)


def main(argv: List[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.journal_scale", description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=1_000_000, help="finished jobs in the journal (default 1,000,000)")
    parser.add_argument("--calls", type=int, default=200, help="calls per read timed (default 200)")
    parser.add_argument("--keys", type=int, default=200, help="console cursor keys timed (default 200)")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args(argv)

    def step(text: str) -> None:
        print(f"[journal bench] {text}", file=sys.stderr, flush=True)

    results = run(args.jobs, args.calls, args.keys, step)
    print(report(results))
    if args.json:
        args.json.write_text(json.dumps({"machine": machine_info(), "results": results}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
