"""`python -m bench.console_bench`: the console's responsiveness with 100,000 jobs in the journal and ~2,000 jobs/s flowing.

Method (also in bench/README.md, "Console responsiveness"):
- A fresh CORRAL_HOME gets 100,000 finished jobs written into its journal (scripts/demo.py), then the real
  start-up path starts a master (no local agent) and the bench starts 2 agents x 2 slots, cwd and PYTHONPATH
  the repo root so their pool workers import bench.jobs.
- A feeder *process* submits `bench.jobs:inc` callables at the target rate (--rate per second, in batches
  every 50 ms) for the whole run, so its CPU is not the console's. The achieved rate is the master's count
  of finished jobs over the measuring window.
- Headless: the real CorralApp runs in this process at 120x36 (Textual's headless driver: everything but the
  terminal write). Key latency: a `down`/`up` key event is handed to the driver as a terminal would, and the
  clock stops when the Finished table's cursor has moved and the screen has repainted (call_after_refresh);
  --keys samples, one every 100 ms. CPU: this process's CPU time (time.process_time) over --seconds of flow
  with a key every 200 ms, divided by wall time: the fraction of one core. The master, agents and feeder
  are other processes.
- Real terminal: `corral --no-local-agent` attached to the same master in a 120x36 tmux pane. Key latency:
  `?` sent with send-keys until capture-pane shows the help, then `q` until it is gone (so the figure
  includes tmux's own send/capture round trips: an upper bound). The floor: the same keys, the same
  way, answered by a raw-mode program that just prints a word. CPU: utime+stime of the corral process
  from /proc over --seconds, divided by wall time.
Targets (issue 3): p99 key latency < 100 ms, CPU < 0.5 core.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Dict, List

from . import REPO_ROOT, BenchTimeout, Deadline, machine_info, percentile

SIZE = (120, 36)
JOURNAL_JOBS = 100_000
LATENCY_TARGET_MS = 100.0
CPU_TARGET = 0.5

FEEDER = r"""
import pickle, sys, time
from corral.agent.protocol import JobSpec
from corral.console.client import Client
rate, batch = float(sys.argv[1]), int(sys.argv[2])
with Client() as client:
    i, start = 0, time.monotonic()
    while True:
        client.submit([JobSpec(func="bench.jobs:inc", payload=pickle.dumps(((i + k,), {}))) for k in range(batch)])
        i += batch
        time.sleep(max(0.0, start + i / rate - time.monotonic()))
"""


def _summary(seconds: List[float]) -> Dict[str, float]:
    return {"p50_ms": percentile(seconds, 50) * 1e3, "p99_ms": percentile(seconds, 99) * 1e3,
            "max_ms": max(seconds) * 1e3, "n": len(seconds)}


def _cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class Flow:
    """Master, agents and feeder for one run, all in sessions of their own under a private CORRAL_HOME."""

    def __init__(self, home: Path, rate: float) -> None:
        from corral.console.state import StateDir

        self.home = home
        self.rate = rate
        self.state = StateDir(home)
        self.procs: List[subprocess.Popen] = []
        self.env = dict(os.environ, CORRAL_HOME=str(home), PYTHONPATH=str(REPO_ROOT))

    def start(self) -> None:
        from corral.console.client import Client
        from corral.console.local import attach_or_start
        from scripts.demo import write_demo_journal

        self.home.mkdir(mode=0o700, parents=True)
        write_demo_journal(self.home / "corral.db", finished=JOURNAL_JOBS, queued=0,
                           epoch=float(int(time.time()) - JOURNAL_JOBS * 7 - 60))
        attach_or_start(self.state, local_agent=False)
        for n in range(2):
            self._spawn([sys.executable, "-m", "corral.agent", "--name", f"bench-{n}", "--slots", "2"], f"agent-{n}.log")
        deadline = Deadline(60, "agents to register")
        with Client(home=self.home) as client:
            while sum(a["state"] == "up" for a in client.agents()) < 2:
                deadline.check()
                time.sleep(0.05)
        self._spawn([sys.executable, "-c", FEEDER, str(self.rate), str(max(1, int(self.rate / 20)))], "feeder.log")

    def _spawn(self, args: List[str], log: str) -> None:
        with open(self.state.log_dir / log, "ab") as out:
            self.procs.append(subprocess.Popen(args, env=self.env, cwd=REPO_ROOT, stdin=subprocess.DEVNULL,
                                               stdout=out, stderr=subprocess.STDOUT, start_new_session=True))

    def cpu_seconds(self) -> float:
        """CPU time so far of the master, the agents with their pool workers, and the feeder."""
        pids = [p.pid for p in self.procs] + [int(self.state.master_record().get("pid", 0))]
        children: Dict[int, List[int]] = {}
        for entry in os.listdir("/proc"):
            if entry.isdigit():
                try:
                    with open(f"/proc/{entry}/stat") as f:
                        children.setdefault(int(f.read().rsplit(")", 1)[1].split()[1]), []).append(int(entry))
                except (OSError, IndexError):
                    continue
        total, todo, seen = 0.0, [p for p in pids if p], set()
        while todo:
            pid = todo.pop()
            if pid in seen:
                continue
            seen.add(pid)
            todo += children.get(pid, [])
            try:
                total += _cpu_seconds(pid)
            except (OSError, IndexError):
                pass  # it just exited
        return total

    def finished(self) -> int:
        from corral.console.client import Client

        with Client(home=self.home) as client:
            counts = client.snapshot(0, {})["counts"]
        return sum(counts[s] for s in ("done", "failed", "timeout", "cancelled", "lost"))

    def stop(self) -> None:
        from corral.console.local import stop_embedded

        for proc in reversed(self.procs):
            if proc.poll() is None:
                proc.send_signal(signal.SIGKILL)
            proc.wait(timeout=30)
        stop_embedded(self.state)


async def _headless(flow: Flow, keys: int, seconds: float, step: Callable[[str], None]) -> Dict[str, Any]:
    from textual import events

    from corral.console.tui.app import CorralApp
    from corral.console.tui.screens.help import HelpScreen

    app = CorralApp(home=flow.home)
    loop = asyncio.get_running_loop()
    async with app.run_test(size=SIZE) as pilot:
        table = app.main.finished_pane  # the big one: 100,000 rows and more
        deadline = Deadline(60, "the console's first snapshot")
        while not (table.loaded and table.total >= JOURNAL_JOBS):
            deadline.check()
            await pilot.pause(0.05)
        table.focus()
        await pilot.pause(2.0)  # settle: the flow is steady, the windows are fetched

        cpu_spent: Dict[str, List[float]] = {"move": [], "help": []}

        async def press(key: str, answered: Callable[[], bool], kind: str = "") -> float:
            start, cpu = time.perf_counter(), time.thread_time()
            app._driver.send_message(events.Key(key, None))  # what the terminal driver does on input
            limit = Deadline(10, f"the console to answer {key}")
            while not answered():
                limit.check()
                await asyncio.sleep(0.0005)
            painted: asyncio.Future[float] = loop.create_future()
            app.screen.call_after_refresh(lambda: painted.set_result(time.perf_counter()))
            took = await asyncio.wait_for(painted, 10) - start
            if kind:  # the event loop's thread: the console's own work for this key (and whatever it queued behind)
                cpu_spent[kind].append(time.thread_time() - cpu)
            return took

        async def move(key: str) -> float:
            before = table.cursor
            return await press(key, lambda: table.cursor != before, "move")

        step(f"headless: {keys} cursor moves, then {keys // 10} help opens and closes")
        samples = []
        for i in range(keys):
            samples.append(await move("down" if i % 2 == 0 else "up"))
            await asyncio.sleep(0.1)
        help_samples = []
        for i in range(keys // 10 + 1):
            opened = await press("question_mark", lambda: isinstance(app.screen, HelpScreen), "help" if i else "")
            await asyncio.sleep(0.1)
            closed = await press("q", lambda: not isinstance(app.screen, HelpScreen), "help" if i else "")
            if i:  # the first builds the help screen: not counted, as in the terminal half
                help_samples += [opened, closed]
            await asyncio.sleep(0.1)
        step(f"headless: CPU over {seconds:g}s of flow")
        done0, wall0, cpu0, flow0 = flow.finished(), time.monotonic(), time.process_time(), flow.cpu_seconds()
        presses = 0
        while time.monotonic() - wall0 < seconds:
            await move("down" if presses % 2 == 0 else "up")
            presses += 1
            await asyncio.sleep(0.2)
        cpu, wall = time.process_time() - cpu0, time.monotonic() - wall0
        flow_cores = (flow.cpu_seconds() - flow0) / wall
        achieved = (flow.finished() - done0) / wall
        held = {"dispatched": len(app.main.dispatched_pane.rows), "finished": len(table.rows)}
        totals = {"dispatched": app.main.dispatched_pane.total, "finished": table.total}
        app.exit("detach")
    return {"latency": _summary(samples), "help_latency": _summary(help_samples),
            "cpu_per_key_ms": {kind: percentile(v, 50) * 1e3 for kind, v in cpu_spent.items() if v},
            "cpu_cores": cpu / wall, "achieved_per_s": achieved, "flow_cores": flow_cores,
            "rows_held": held, "rows_total": totals}


# The floor for the tmux figures: a raw-mode program that answers the same keys with a one-word screen.
# What it takes is tmux's send-keys and capture-pane round trips and the machine's scheduling, not corral.
RESPONDER = r"""
import os, sys, tty
tty.setraw(0)
os.write(1, b"\x1b[2J\x1b[Hready")
tabs = 0
while True:
    key = os.read(0, 1)
    tabs += key == b"\t"
    answer = b"Everywhere" if key == b"?" else b"tab %d" % tabs if key == b"\t" else b"gone"
    os.write(1, b"\x1b[2J\x1b[H" + answer)
"""


def _corral_focus(tabs: int) -> Callable[[str], bool]:
    """After `tabs` presses of tab from Dispatched: which pane's keys the key bar shows."""
    pane = tabs % 3  # Dispatched (c Cancel), Finished (r Requeue), Workers (neither)
    return lambda s: (("c Cancel" in s), ("r Requeue" in s)) == ((True, False), (False, True), (False, False))[pane]


def _floor_focus(tabs: int) -> Callable[[str], bool]:
    return lambda s: f"tab {tabs}" in s


def _tmux(flow: Flow, keys: int, seconds: float, step: Callable[[str], None]) -> Dict[str, Any]:
    corral = Path(sys.executable).with_name("corral")
    command = " ".join(["env", f"CORRAL_HOME={flow.home}", "LANG=C.UTF-8",
                        str(corral) if corral.exists() else f"{sys.executable} -m corral", "--no-local-agent"])
    floor = _tmux_session(flow, "floor", f"{sys.executable} -c '{RESPONDER}'", "ready", _floor_focus, keys, 0.0,
                          step)
    results = _tmux_session(flow, "corral", command, "Finished", _corral_focus, keys, seconds, step)
    results["floor"] = {"latency": floor["latency"], "help_latency": floor["help_latency"]}
    return results


def _tmux_session(flow: Flow, name: str, command: str, ready: str, focused: Callable[[int], Callable[[str], bool]],
                  keys: int, seconds: float, step: Callable[[str], None]) -> Dict[str, Any]:
    socket = flow.home / f"tmux-{name}.sock"

    def tmux(*args: str) -> str:
        return subprocess.run(["tmux", "-u", "-S", str(socket), *args], capture_output=True, text=True,
                              timeout=30, check=True).stdout

    def until(predicate: Callable[[str], bool], what: str) -> None:
        deadline = Deadline(30, what)
        while not predicate(tmux("capture-pane", "-p", "-t", "bench")):
            deadline.check()
            time.sleep(0.002)  # each capture is a tmux process: back to back, they would starve the pane

    def timed(key: str, predicate: Callable[[str], bool], what: str) -> float:
        start = time.perf_counter()
        tmux("send-keys", "-t", "bench", key)
        until(predicate, what)
        return time.perf_counter() - start

    try:
        tmux("new-session", "-d", "-s", "bench", "-x", str(SIZE[0]), "-y", str(SIZE[1]), command)
        pid = int(tmux("display-message", "-p", "-t", "bench", "#{pane_pid}").strip())
        until(lambda s: ready in s, f"{name} in tmux to be ready")
        time.sleep(2.0)
        step(f"tmux, {name}: {keys} tabs, then {keys} x (? then q) after one not counted (the help is built then)")
        samples = []
        for n in range(1, keys + 1):
            samples.append(timed("Tab", focused(n), "the focus to move"))
            time.sleep(0.1)
        help_samples = []
        for n in range(keys + 1):
            opened = timed("?", lambda s: "Everywhere" in s, "the help to show")
            closed = timed("q", lambda s: "Everywhere" not in s, "the help to close")
            if n:
                help_samples += [opened, closed]
            time.sleep(0.1)
        if not seconds:
            return {"latency": _summary(samples), "help_latency": _summary(help_samples)}
        step(f"tmux, {name}: CPU over {seconds:g}s of flow")
        cpu0, wall0 = _cpu_seconds(pid), time.monotonic()
        time.sleep(seconds)
        cpu, wall = _cpu_seconds(pid) - cpu0, time.monotonic() - wall0
        tmux("send-keys", "-t", "bench", "q")
        return {"latency": _summary(samples), "help_latency": _summary(help_samples), "cpu_cores": cpu / wall}
    finally:
        subprocess.run(["tmux", "-S", str(socket), "kill-server"], capture_output=True, timeout=30)


def run(rate: float, keys: int, seconds: float, use_tmux: bool) -> Dict[str, Any]:
    def step(text: str) -> None:
        print(f"[console bench] {text}", file=sys.stderr, flush=True)

    with tempfile.TemporaryDirectory(prefix="corral-console-bench-") as tmp:
        flow = Flow(Path(tmp) / "home", rate)
        try:
            step(f"writing {JOURNAL_JOBS:,} jobs into the journal, starting master, 2 agents, feeder at {rate:g}/s")
            flow.start()
            # Other work on the machine shows in every figure here: say how busy it was.
            load_before = os.getloadavg()[0]
            results: Dict[str, Any] = {"headless": asyncio.run(_headless(flow, keys, seconds, step))}
            if use_tmux:
                results["tmux"] = _tmux(flow, max(10, keys // 10), seconds, step)
            results["loadavg_1min"] = [round(load_before, 2), round(os.getloadavg()[0], 2)]
        finally:
            flow.stop()
    return results


def report(results: Dict[str, Any], rate: float) -> str:
    head = results["headless"]
    lines = [f"console responsiveness: {JOURNAL_JOBS:,} jobs in the journal, {rate:,.0f} jobs/s submitted,"
             f" {head['achieved_per_s']:,.0f} jobs/s finished while measuring",
             f"{'':34}{'p50':>9}{'p99':>9}{'max':>9}{'n':>6}   target"]
    rows = [("headless: ↓/↑ cursor → repaint", head["latency"], True),
            ("headless: ?/q help open/close", head["help_latency"], True)]
    if "tmux" in results:
        tmux, floor = results["tmux"], results["tmux"]["floor"]
        rows += [("tmux: tab focus → screen", tmux["latency"], True),
                 ("tmux: ?/q help open/close", tmux["help_latency"], True),
                 ("  floor: raw-mode echo, tab", floor["latency"], False),
                 ("  floor: raw-mode echo, ?/q", floor["help_latency"], False)]
    for label, lat, judged in rows:
        ok = ("ok" if lat["p99_ms"] < LATENCY_TARGET_MS else "MISSED") if judged else "(tmux + machine)"
        lines.append(f"{label:34}{lat['p50_ms']:>7.1f}ms{lat['p99_ms']:>7.1f}ms{lat['max_ms']:>7.1f}ms{lat['n']:>6}"
                     f"   {f'p99 < {LATENCY_TARGET_MS:.0f} ms: ' if judged else ''}{ok}")
    for label, part in (("console CPU, headless", head), ("console CPU, tmux", results.get("tmux"))):
        if part:
            ok = "ok" if part["cpu_cores"] < CPU_TARGET else "MISSED"
            lines.append(f"{label:34}{part['cpu_cores']:>8.2f} of a core{'':15}< {CPU_TARGET} core: {ok}")
    per_key = head["cpu_per_key_ms"]
    lines.append(f"console CPU per key (median, its own thread): cursor move {per_key['move']:.1f} ms,"
                 f" help open or close {per_key['help']:.1f} ms")
    lines.append(f"rows the console holds: {head['rows_held']} of {head['rows_total']}")
    before, after = results["loadavg_1min"]
    lines.append(f"1-minute load average of the {os.cpu_count()}-CPU machine: {before:.2f} at the start,"
                 f" {after:.2f} at the end; the flow (master, agents, pool workers, feeder) used"
                 f" {head['flow_cores']:.2f} cores")
    return "\n".join(lines)


def main(argv: List[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.console_bench", description=__doc__.splitlines()[0])
    parser.add_argument("--rate", type=float, default=2000.0, help="jobs submitted per second (default 2000)")
    parser.add_argument("--keys", type=int, default=300, help="headless key-latency samples (default 300)")
    parser.add_argument("--seconds", type=float, default=20.0, help="each CPU window (default 20)")
    parser.add_argument("--no-tmux", action="store_true", help="skip the real-terminal half")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args(argv)
    use_tmux = not args.no_tmux and shutil.which("tmux") is not None
    try:
        results = run(args.rate, args.keys, args.seconds, use_tmux)
    except BenchTimeout as exc:
        print(f"console bench: {exc}", file=sys.stderr)
        return 1
    print(report(results, args.rate))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"machine": machine_info(), "rate": args.rate, "results": results}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
