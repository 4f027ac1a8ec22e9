"""`python -m bench.scale`: one master and a crowd of loopback agents (join time, strays, master cost per agent, W1),
then a journal of a million finished jobs (bench/journal_scale.py): one command, its tables."""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Set

from . import Deadline, Params, machine_info, rss_mb
from .corral_runs import INC, CorralCluster, Watchdog, _descendants

# Targets of issue 13 for the agents part: (bound, "min" = at least / "max" = at most).
TARGETS: Dict[str, tuple[float, str]] = {
    "join_s": (60.0, "max"),
    "stranded": (0.0, "max"),
    "idle_cpu_pct": (5.0, "max"),
    "w1_ratio": (2.0, "max"),  # W1 with 2 agents / W1 with N agents
}
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


@dataclass
class MasterCost:
    """What the master process holds, read from /proc."""

    threads: int
    fds: int
    rss_mb: float

    @classmethod
    def of(cls, pid: int) -> "MasterCost":
        threads = 0
        with open(f"/proc/{pid}/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("Threads:"):
                    threads = int(line.split()[1])
        return cls(threads, len(os.listdir(f"/proc/{pid}/fd")), rss_mb(pid))


@dataclass
class CrowdFigures:
    """The agents part of the table (one run)."""

    agents: int
    join_s: float = 0.0  # from starting them all together to the last one up
    never_joined: int = 0
    declared_lost: Dict[str, float] = field(default_factory=dict)  # agent seen `lost` -> when (s from start)
    w1_began: float = 0.0  # seconds from the start of the agents to the start of W1
    idle: Optional[MasterCost] = None  # with no agent
    crowd: Optional[MasterCost] = None  # with all N up, idle
    idle_cpu_pct: float = 0.0  # master CPU, % of one core, N agents up and no work
    w1_two: float = 0.0  # jobs/s with 2 one-slot agents
    w1_crowd: float = 0.0  # jobs/s with N one-slot agents
    w1_cpu: Dict[str, float] = field(default_factory=dict)  # CPU seconds during W1 with N agents: master, agents, ...
    w1_seconds: float = 0.0

    @property
    def stranded(self) -> int:
        return self.never_joined + len(self.declared_lost)

    def per_agent(self, what: str) -> float:
        assert self.idle is not None and self.crowd is not None
        return (getattr(self.crowd, what) - getattr(self.idle, what)) / self.agents


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process, in seconds."""
    with open(f"/proc/{pid}/stat", encoding="ascii") as stat:
        fields = stat.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


class LostWatcher:
    """Polls the master's agent list through the run and remembers every agent ever seen `lost`."""

    def __init__(self, cluster: CorralCluster, interval: float = 0.5) -> None:
        self.cluster = cluster
        self.interval = interval
        self.lost: Dict[str, float] = {}  # name -> seconds into the run it was first seen lost
        self.up: Set[str] = set()
        self.began = time.monotonic()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="lost-watcher", daemon=True)

    def __enter__(self) -> "LostWatcher":
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(10)

    def _run(self) -> None:
        client = self.cluster.client()
        try:
            while not self._stop.wait(self.interval):
                try:
                    agents = client.agents()
                except Exception:  # noqa: BLE001 - a missed poll is retried on a new connection
                    client.close()
                    client = self.cluster.client()
                    continue
                for agent in agents:
                    if agent["state"] == "up":
                        self.up.add(agent["name"])
                    elif agent["state"] == "lost":
                        self.lost.setdefault(agent["name"], time.monotonic() - self.began)
        finally:
            client.close()


def tree_cpu(pids: List[int]) -> float:
    """CPU seconds of these processes and all their descendants (those alive now)."""
    total = 0.0
    for pid in set(pids) | _descendants(pids):
        try:
            total += cpu_seconds(pid)
        except OSError:
            pass
    return total


def w1(client: Any, jobs: int) -> float:
    """W1 (as bench/corral_runs.py): jobs/s for `jobs` trivial callables through Client.map, after a warm-up."""
    client.map(INC, range(200))
    began = time.perf_counter()
    values = client.map(INC, range(jobs))
    elapsed = time.perf_counter() - began
    if len(values) != jobs or sum(values) != sum(i + 1 for i in range(jobs)):
        raise RuntimeError(f"W1: {len(values)} values summing to {sum(values)}")
    return jobs / elapsed


def _up(client: Any) -> int:
    return sum(1 for a in client.agents() if a["state"] == "up")


def two_agents(params: Params, home: Path, jobs: int, step: Callable[[str], None]) -> float:
    """W1 with 2 one-slot agents, on a master of its own."""
    step("2 agents × 1 slot: W1")
    cluster = CorralCluster(params, home)
    try:
        with Watchdog(cluster, params.start_budget + params.w1_budget, "W1 with 2 agents"):
            cluster.start_master()
            cluster.start_agents(2, 1)
            client = cluster.client()
            deadline = Deadline(params.start_budget, "2 agents to register")
            while _up(client) < 2:
                cluster.check_alive()
                deadline.check()
                time.sleep(0.1)
            rate = w1(client, jobs)
            client.close()
            return rate
    finally:
        cluster.close()


def crowd(params: Params, home: Path, count: int, jobs: int, idle_seconds: float, join_budget: float,
          step: Callable[[str], None]) -> CrowdFigures:
    """N one-slot agents started together against one master: join time, strays, cost per agent, W1."""
    figures = CrowdFigures(count)
    cluster = CorralCluster(replace(params, start_budget=join_budget), home)
    try:
        cluster.start_master()
        assert cluster.master_pid is not None
        pid = cluster.master_pid
        time.sleep(1.0)
        figures.idle = MasterCost.of(pid)
        client = cluster.client()
        step(f"{count} agents × 1 slot, started together")
        began = time.monotonic()
        cluster.start_agents(count, 1)
        with LostWatcher(cluster) as watcher:
            deadline = Deadline(join_budget, f"{count} agents to register")
            while (up := _up(client)) < count and not deadline.expired():
                time.sleep(0.2)
            figures.join_s = time.monotonic() - began
            figures.never_joined = count - up
            step(f"{up}/{count} up after {figures.join_s:.1f}s; idle for {idle_seconds:g}s")
            time.sleep(2.0)  # let the last registrations' pools settle
            figures.crowd = MasterCost.of(pid)
            cpu0, t0 = cpu_seconds(pid), time.monotonic()
            time.sleep(idle_seconds)
            figures.idle_cpu_pct = 100.0 * (cpu_seconds(pid) - cpu0) / (time.monotonic() - t0)
            step(f"W1 with {count} agents")
            figures.w1_began = time.monotonic() - began
            agent_pids = [agent.pid for agent in cluster.agents]
            before = {"master": cpu_seconds(pid), "agents": tree_cpu(agent_pids), "this client": time.process_time()}
            w1_start = time.monotonic()
            with Watchdog(cluster, params.w1_budget, f"W1 with {count} agents"):
                figures.w1_crowd = w1(client, jobs)
            figures.w1_seconds = time.monotonic() - w1_start
            after = {"master": cpu_seconds(pid), "agents": tree_cpu(agent_pids), "this client": time.process_time()}
            figures.w1_cpu = {what: after[what] - before[what] for what in before}
            time.sleep(2.0)
        figures.declared_lost = dict(sorted(watcher.lost.items(), key=lambda item: item[1]))
        client.close()
    finally:
        cluster.close()
    return figures


def _verdict(key: str, value: float) -> str:
    bound, kind = TARGETS[key]
    ok = value >= bound if kind == "min" else value <= bound
    return "met" if ok else "**missed**"


def table(f: CrowdFigures) -> str:
    """The agents part of bench/README.md's scale table (markdown)."""
    assert f.idle is not None and f.crowd is not None
    ratio = f.w1_two / f.w1_crowd if f.w1_crowd else float("inf")
    rows = [
        ("all agents up", f"{f.join_s:.1f} s for {f.agents}", "≤ 60 s", _verdict("join_s", f.join_s)),
        ("never joined / declared lost", f"{f.never_joined} / {len(f.declared_lost)}", "0",
         _verdict("stranded", f.stranded)),
        ("master threads", f"{f.idle.threads} → {f.crowd.threads} ({f.per_agent('threads'):.2f} per agent)", "flat", ""),
        ("master fds", f"{f.idle.fds} → {f.crowd.fds} ({f.per_agent('fds'):.2f} per agent)", "flat", ""),
        ("master RSS", f"{f.idle.rss_mb:.1f} → {f.crowd.rss_mb:.1f} MB ({1000 * f.per_agent('rss_mb'):.0f} kB per agent)",
         "flat", ""),
        ("master idle CPU", f"{f.idle_cpu_pct:.1f} % of a core ({f.idle_cpu_pct / f.agents:.3f} % per agent)", "< 5 %",
         _verdict("idle_cpu_pct", f.idle_cpu_pct)),
        ("W1, 2 agents × 1 slot", f"{f.w1_two:,.0f} jobs/s", "", ""),
        (f"W1, {f.agents} agents × 1 slot", f"{f.w1_crowd:,.0f} jobs/s ({ratio:.2f}× slower)", "within 2×",
         _verdict("w1_ratio", ratio)),
    ]
    lines = ["| | figure | target | verdict |", "|---|---|---|---|"]
    lines += [f"| {a} | {b} | {c} | {d} |" for a, b, c, d in rows]
    return "\n".join(lines)


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.scale", description=__doc__)
    parser.add_argument("--agents", type=int, default=200, help="agents started together (default 200)")
    parser.add_argument("--jobs", type=int, default=20_000, help="W1's trivial jobs (default 20,000)")
    parser.add_argument("--idle-seconds", type=float, default=10.0, help="how long idle CPU is measured")
    parser.add_argument("--join-budget", type=float, default=180.0, help="give up waiting for agents after this")
    parser.add_argument("--journal-jobs", type=int, default=1_000_000,
                        help="finished jobs in the journal part (default 1,000,000; 0 skips it)")
    parser.add_argument("--json", metavar="FILE", help="also write the figures as JSON here")
    args = parser.parse_args(argv)
    began = time.monotonic()

    def step(text: str) -> None:
        print(f"[{time.monotonic() - began:6.1f}s] {text}", file=sys.stderr, flush=True)

    params = Params()
    with tempfile.TemporaryDirectory(prefix="corral-scale-") as tmp:
        for name in ("two", "crowd"):
            (Path(tmp) / name).mkdir(mode=0o700)
        w1_two = two_agents(params, Path(tmp) / "two", args.jobs, step)
        figures = crowd(params, Path(tmp) / "crowd", args.agents, args.jobs, args.idle_seconds, args.join_budget, step)
        figures.w1_two = w1_two
    print(table(figures))
    if figures.w1_cpu:
        spent = ", ".join(f"{what} {seconds:.1f} s" for what, seconds in figures.w1_cpu.items())
        print(f"\nCPU during W1 with {figures.agents} agents ({figures.w1_seconds:.1f} s of wall time, warm-up"
              f" included, 2 cores): {spent}")
    if figures.declared_lost:
        when = ", ".join(f"{name} at {at:.0f}s" for name, at in list(figures.declared_lost.items())[:10])
        print(f"\ndeclared lost (seconds from starting the agents; W1 began at {figures.w1_began:.0f}s): {when}")
    journal: Dict[str, Any] = {}
    if args.journal_jobs:
        from . import journal_scale

        journal = journal_scale.run(args.journal_jobs, 200, 200, step)
        print()
        print(journal_scale.report(journal))
    if args.json:
        Path(args.json).write_text(json.dumps({"machine": machine_info(), "agents": asdict(figures), "journal": journal},
                                              indent=2, default=str))
    return 0 if figures.stranded == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
